"""What identifies a model's KV: the content of its weight files (xxh3-128 over every byte),
remembered per (path, size, mtime) under the cache root so a file is read once."""

from __future__ import annotations

import json
import os

from kvoffload.paths import cache_root

_CHUNK = 8 << 20


def _files(path: str) -> list[str]:
    """A GGUF file itself; for a Hugging Face directory its config, tokenizer-independent weight
    and config files (``*.json`` besides the tokenizer's, ``*.safetensors``, ``*.bin``)."""
    if not os.path.isdir(path):
        return [path]
    names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin"))
                   or (n.endswith(".json") and not n.startswith("tokenizer")))
    return [os.path.join(path, n) for n in names]


def _content_hash(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(path: str) -> str:
    """Hex digest of the model's files' content (their names within a directory too)."""
    import xxhash

    memo_path = os.path.join(cache_root(), "fingerprints.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    total = xxhash.xxh3_128()
    changed = False
    for fp in _files(path):
        st = os.stat(fp)
        ident = f"{os.path.realpath(fp)}:{st.st_size}:{st.st_mtime_ns}"
        digest = memo.get(ident)
        if not isinstance(digest, str):
            digest = memo[ident] = _content_hash(fp)
            changed = True
        total.update(f"{os.path.basename(fp)}={digest};".encode())
    if changed:
        try:
            os.makedirs(os.path.dirname(memo_path), exist_ok=True)
            tmp = f"{memo_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
        except OSError:
            pass                          # only the memo is lost: the next run hashes again
    return total.hexdigest()
