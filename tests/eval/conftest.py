"""Tokenizers for the eval tests: byte-level (tiny models) and SmolLM2's real BPE."""

from __future__ import annotations

import pytest

from kvoffload.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def byte_tok(tiny_hf) -> Tokenizer:
    """The tiny models' tokenizer: one token per byte, ChatML template."""
    _, path = tiny_hf("qwen2")
    return Tokenizer.from_hf_dir(path)


@pytest.fixture(scope="session")
def smol_tok(smollm2_gguf) -> Tokenizer:
    import gguf

    meta = {k: f.contents() for k, f in gguf.GGUFReader(smollm2_gguf).fields.items()
            if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(params=["bytes", "smollm2"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue("byte_tok" if request.param == "bytes" else "smol_tok")
