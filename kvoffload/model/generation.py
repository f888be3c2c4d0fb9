"""A checkpoint's own default sampling settings, where it carries them: a Hugging Face
``generation_config.json`` (``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``) or a
GGUF's ``general.sampling.*`` keys (llama.cpp's ``temp``, ``top_p``, ``top_k``,
``penalty_repeat``, ``penalty_last_n``). Used by ``kvoffload serve`` for fields a request leaves
out (greedy stays the default of ``generate``, ``eval`` and ``bench``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# HF generation_config key / GGUF general.sampling key -> SamplingParams field
_HF = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
_GGUF = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "penalty_repeat": "repeat_penalty",
         "penalty_last_n": "repeat_last_n"}


def checkpoint_sampling_defaults(path: str) -> dict[str, Any]:
    """SamplingParams field -> value from the checkpoint at ``path`` (a GGUF file or an HF
    directory); fields it does not set are absent. HF's ``do_sample: false`` means greedy."""
    out: dict[str, Any] = {}
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as f:
                gen = json.load(f)
        except (OSError, ValueError):
            return out
        if not isinstance(gen, dict):
            return out
        for key, name in _HF.items():
            if _number(gen.get(key)):
                out[name] = gen[key]
        if gen.get("do_sample") is False:
            out["temperature"] = 0.0
    else:
        from kvoffload.model.loader.gguf_file import GGUFFile

        try:
            meta = GGUFFile(path).metadata
        except Exception:          # noqa: BLE001 - the loader reports an unreadable file itself
            return out
        for key, name in _GGUF.items():
            value = meta.get(f"general.sampling.{key}")
            if _number(value):
                out[name] = value
    for name in ("top_k", "repeat_last_n"):
        if name in out:
            out[name] = int(out[name])
    for name in ("temperature", "top_p", "repeat_penalty"):
        if name in out:
            out[name] = float(out[name])
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
