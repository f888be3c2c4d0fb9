"""Text <-> token ids for kvoffload, built on the Hugging Face ``tokenizers`` library.

A :class:`Tokenizer` is built either from the metadata of a GGUF file
(:meth:`Tokenizer.from_gguf_metadata`) or from a Hugging Face model directory
(:meth:`Tokenizer.from_hf_dir`). Both end up as a ``tokenizers.Tokenizer``
("backend") plus the few facts generation needs: the BOS id, the ids that end a
turn, whether to prepend BOS, and the chat template.

GGUF vocabularies supported (``tokenizer.ggml.model``):

* ``gpt2`` -- byte-level BPE. The split applied before BPE is chosen from
  ``tokenizer.ggml.pre`` through :data:`GGUF_PRE_TOKENIZERS`.
* ``llama`` -- SentencePiece BPE (Llama 2, Mistral). Merges are recovered from
  the token scores, unknown characters fall back to ``<0xXX>`` byte tokens, and
  ``tokenizer.ggml.add_space_prefix`` decides whether "▁" is prepended (to
  each stretch of text between special tokens, as llama.cpp and the Llama 2
  tokenizer.json do).

Tokens typed CONTROL in the GGUF become special tokens and USER_DEFINED ones
become plain added tokens, so both are matched whole in input text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from kvoffload.errors import KvoffloadError

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "GGUF_PRE_TOKENIZERS",
    "STOP_TOKEN_STRINGS",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
]


class TokenizerError(KvoffloadError, ValueError):
    """A tokenizer could not be built or used; the message names the problem."""


# --------------------------------------------------------------------------- tables

# llama.cpp token types, as stored in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6
_SPECIAL_TYPES = frozenset({TOKEN_UNKNOWN, TOKEN_CONTROL})

# Special tokens that end an assistant turn in common chat formats. Any of them
# that is a special token of the loaded vocabulary joins ``Tokenizer.eos_ids``.
STOP_TOKEN_STRINGS: frozenset[str] = frozenset(
    {
        "<|im_end|>",  # ChatML (Qwen, SmolLM)
        "<|eot_id|>",  # Llama 3
        "<|eom_id|>",  # Llama 3.1 tool calls
        "<|end_of_text|>",  # Llama 3
        "<|endoftext|>",  # GPT-2 family, Qwen, SmolLM
        "<|end|>",  # Phi-3
        "<end_of_turn>",  # Gemma
    }
)

# GGUF keys whose value is an id that ends generation.
_GGUF_STOP_ID_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)

# Pre-tokenizer split patterns (``tokenizers`` regex syntax, Oniguruma).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How byte-level text is cut before BPE runs.

    ``split_regex`` None means the GPT-2 pattern built into the ``ByteLevel``
    pre-tokenizer; ``individual_digits`` first isolates every Unicode digit
    (``\\p{N}``); ``nfc`` applies Unicode NFC normalization first.
    """

    split_regex: str | None = None
    individual_digits: bool = False
    nfc: bool = False


_GPT2 = PreTokenizerSpec()
_DIGITS_GPT2 = PreTokenizerSpec(individual_digits=True)
_LLAMA3 = PreTokenizerSpec(split_regex=_LLAMA3_SPLIT)
_QWEN2 = PreTokenizerSpec(split_regex=_QWEN2_SPLIT, nfc=True)

# ``tokenizer.ggml.pre`` -> pre-tokenizer, for ``tokenizer.ggml.model == "gpt2"``.
GGUF_PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = MappingProxyType({
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": _DIGITS_GPT2,  # SmolLM/SmolLM2 tokenizer.json: Digits(individual) + ByteLevel
    "starcoder": _DIGITS_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,  # Qwen2 / Qwen2.5 tokenizer.json: NFC, split, ByteLevel
    "deepseek-r1-qwen": _QWEN2,
})

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# ChatML, used when a model ships no chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """A text tokenizer with the extra facts needed for chat generation.

    Attributes:
        backend: the underlying ``tokenizers.Tokenizer``.
        bos_id: beginning-of-sequence id, or None when the vocabulary has none.
        eos_id: the primary end-of-sequence id (rendered as ``eos_token`` in
            chat templates), or None.
        eos_ids: every id that should stop generation: ``eos_id`` plus end-of-turn
            specials such as ``<|im_end|>`` / ``<|eot_id|>`` / ``<|endoftext|>``.
        add_bos: whether :meth:`encode` prepends ``bos_id`` by default.
        chat_template: the model's Jinja chat template, or None.
        vocab_size: number of ids, added tokens included.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        """Wrap ``backend``; the first of ``eos_ids`` is the primary EOS id."""
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        eos_list = list(dict.fromkeys(int(i) for i in eos_ids))
        for token_id in ([bos_id] if bos_id is not None else []) + eos_list:
            self._check_id(token_id)
        self.bos_id = bos_id
        self.eos_id: int | None = eos_list[0] if eos_list else None
        self.eos_ids: frozenset[int] = frozenset(eos_list) | _stop_token_ids(backend)
        self.add_bos: bool = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})"
        )

    # ----------------------------------------------------------------- builders

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, object]) -> Tokenizer:
        """Build from GGUF metadata (key -> ``ReaderField.contents()``)."""
        kind = _require(meta, "tokenizer.ggml.model", str)
        builder = _GGUF_BUILDERS.get(kind)
        if builder is None:
            raise TokenizerError(
                f"unsupported GGUF tokenizer model {kind!r}; supported: {sorted(_GGUF_BUILDERS)}"
            )
        backend = builder(meta)
        stop_ids = [int(meta[key]) for key in _GGUF_STOP_ID_KEYS if meta.get(key) is not None]
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_id=int(bos_id) if bos_id is not None else None,
            eos_ids=stop_ids,
            add_bos=bool(add_bos),
            chat_template=str(template) if template is not None else None,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model directory.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (bos/eos
        tokens, ``add_bos_token``, ``chat_template``), ``chat_template.jinja``
        (preferred over the config's template) and ``generation_config.json``
        (extra ``eos_token_id`` values). When ``add_bos_token`` is absent, BOS is
        added iff the tokenizer.json post-processor starts with the BOS token.
        """
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {root}")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"cannot load {tokenizer_file}: {exc}") from exc
        post_processor = _read_json(tokenizer_file).get("post_processor")
        config = _read_json(root / "tokenizer_config.json", missing_ok=True)
        generation = _read_json(root / "generation_config.json", missing_ok=True)

        bos_id = _token_id(backend, config.get("bos_token"))
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        eos_ids = [i for i in [_token_id(backend, config.get("eos_token"))] if i is not None]
        eos_ids += _as_int_list(generation.get("eos_token_id"))
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and _post_processor_starts_with(post_processor, bos_id)
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=_hf_chat_template(root, config),
        )

    # ----------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for ``text``; special tokens written in the text are parsed.

        ``add_bos`` None means ``self.add_bos``. BOS is not doubled when the text
        itself already starts with the BOS token.
        """
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos requested but this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for ``ids``; ``skip_special`` drops special (control) tokens."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id`` (byte-level spelling), or None."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary string ``token``, or None."""
        return self.backend.token_to_id(token)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer over this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    # ----------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        **context: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template.

        Rendering matches Hugging Face: a sandboxed Jinja environment with
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``,
        a ``tojson`` filter and the ``loopcontrols`` extension; ``bos_token`` and
        ``eos_token`` hold the token strings. Extra keyword arguments (``tools``,
        ``date_string``...) are passed to the template. Without a template,
        :data:`FALLBACK_CHAT_TEMPLATE` (ChatML) is used.
        """
        variables = {
            "bos_token": self._token_text(self.bos_id),
            "eos_token": self._token_text(self.eos_id),
            **context,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled_template().render(**variables)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc

    # ----------------------------------------------------------------- helpers

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            source = self.chat_template or FALLBACK_CHAT_TEMPLATE
            try:
                self._template = _jinja_env().from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"chat template does not parse: {exc}") from exc
        return self._template

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"special token id {token_id} outside vocabulary of {self.vocab_size}")


# --------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Incremental detokenizer for generated tokens.

    ``push(token_id)`` returns only newly completed text: it holds back output
    while the decoded tail ends in U+FFFD (an incomplete UTF-8 sequence, e.g. an
    emoji whose bytes span several byte-level or ``<0xXX>`` tokens) and it
    decodes a short window of previous tokens so leading-space handling matches
    a full decode. ``flush()`` returns whatever is still held back. The
    concatenation of all returned strings equals ``tokenizer.decode(all_ids)``
    (always for byte-level BPE; for SentencePiece byte fallback whenever the
    byte tokens form valid UTF-8 -- ``ByteFallback`` replaces a whole invalid
    run with U+FFFD, which a stream cannot foresee).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []  # window: already-emitted context + pending tokens
        self._read = 0  # tokens of the window whose text has been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Return held-back text (may contain U+FFFD) and reset the stream."""
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special) if ids else ""


# --------------------------------------------------------------------------- GGUF builders


def _build_byte_level(meta: Mapping[str, object]) -> Backend:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``)."""
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    spec = GGUF_PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise TokenizerError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(GGUF_PRE_TOKENIZERS)}"
        )
    tokens = _require_list(meta, "tokenizer.ggml.tokens")
    types = _token_types(meta, len(tokens))
    vocab_strings = [_byte_level_spelling(t, ty) for t, ty in zip(tokens, types)]
    # gguf's writer drops empty arrays, so a vocabulary without merges has no key.
    merges = [_split_merge(m) for m in meta.get("tokenizer.ggml.merges") or []]  # type: ignore[union-attr]
    backend = Backend(_bpe(_unique_vocab(vocab_strings), merges))
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(spec)
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, types)
    return backend


def _build_sentencepiece(meta: Mapping[str, object]) -> Backend:
    """SentencePiece BPE with byte fallback (``tokenizer.ggml.model == "llama"``).

    Spaces become "▁" and, with ``add_space_prefix``, every stretch of text
    between special/added tokens gets a leading "▁" -- as SentencePiece,
    llama.cpp and Llama 2's own tokenizer.json do (transformers' "legacy" mode).
    """
    tokens = _require_list(meta, "tokenizer.ggml.tokens")
    types = _token_types(meta, len(tokens))
    scores = [float(s) for s in _require_list(meta, "tokenizer.ggml.scores")]
    if len(scores) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    merges = _merges_from_scores(tokens, scores, types)
    backend = Backend(_bpe(_unique_vocab(tokens), merges, unk_token=unk, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = _spm_normalizer(add_prefix)
    backend.decoder = _spm_decoder(add_prefix)
    _add_typed_tokens(backend, tokens, types)
    return backend


def _spm_normalizer(add_prefix: bool) -> normalizers.Normalizer:
    """Spaces -> "▁", optionally with a "▁" in front of each stretch of text."""
    escape = normalizers.Replace(" ", _SPM_SPACE)
    return normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape]) if add_prefix else escape


def _spm_decoder(add_prefix: bool) -> decoders.Decoder:
    """Decode "▁" as a space and ``<0xXX>`` tokens as bytes; drop the added leading space."""
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


_GGUF_BUILDERS = {"gpt2": _build_byte_level, "llama": _build_sentencepiece}


def _bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    unk_token: str | None = None,
    byte_fallback: bool = False,
) -> models.BPE:
    try:
        return models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_token,
            fuse_unk=byte_fallback,
            byte_fallback=byte_fallback,
        )
    except Exception as exc:
        raise TokenizerError(f"invalid BPE vocabulary/merges: {exc}") from exc


def _byte_level_pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spec.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split_regex is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _add_typed_tokens(backend: Backend, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Register CONTROL/UNKNOWN tokens as special and USER_DEFINED ones as added tokens.

    Either way they are matched whole in input text, as llama.cpp does.
    """
    size = backend.get_vocab_size(with_added_tokens=True)
    pairs = [(t, ty) for t, ty in zip(tokens, types) if t]
    special = [AddedToken(t, special=True, normalized=False) for t, ty in pairs if ty in _SPECIAL_TYPES]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in pairs if ty == TOKEN_USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(added)
    if backend.get_vocab_size(with_added_tokens=True) != size:
        raise TokenizerError("a CONTROL/USER_DEFINED token did not map onto its own vocabulary id")


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    Every NORMAL token that splits into two NORMAL tokens yields a merge ranked
    by the merged token's score (higher first); ties go to the longer left piece,
    then the longer right piece, then vocabulary order -- the same order Hugging
    Face uses when converting Llama tokenizers.
    """
    ids = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_NORMAL}
    ranked: list[tuple[float, int, int, int, int, int]] = []
    for merged, merged_id in ids.items():
        for cut in range(1, len(merged)):
            left_id = ids.get(merged[:cut])
            right_id = ids.get(merged[cut:])
            if left_id is not None and right_id is not None:
                ranked.append((-scores[merged_id], -cut, cut - len(merged), merged_id, left_id, right_id))
    ranked.sort()
    return [(tokens[entry[4]], tokens[entry[5]]) for entry in ranked]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_spelling(token: str, token_type: int) -> str:
    """The model-vocabulary key for a byte-level GGUF token.

    Normal tokens are already spelled in the byte alphabet; a normal token that
    is not (a raw string from some converters) is respelled. CONTROL and
    USER_DEFINED tokens keep their raw text so added-token matching finds them.
    """
    if token_type in _SPECIAL_TYPES or token_type == TOKEN_USER_DEFINED:
        return token
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    if all(ch in alphabet for ch in token):
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


def _unique_vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            raise TokenizerError(f"duplicate token {token!r} at ids {vocab[token]} and {index}")
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    parts = str(merge).split(" ")
    if len(parts) != 2:
        raise TokenizerError(f"malformed merge {merge!r} (expected 'left right')")
    return parts[0], parts[1]


def _token_types(meta: Mapping[str, object], count: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [TOKEN_NORMAL] * count
    result = [int(t) for t in types]  # type: ignore[union-attr]
    if len(result) != count:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(result)} entries for {count} tokens")
    return result


def _require(meta: Mapping[str, object], key: str, kind: type) -> Any:
    value = meta.get(key)
    if value is None:
        raise TokenizerError(f"GGUF metadata lacks {key}")
    if not isinstance(value, kind):
        raise TokenizerError(f"GGUF metadata {key} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _require_list(meta: Mapping[str, object], key: str) -> list[Any]:
    value = _require(meta, key, Sequence)
    if isinstance(value, str):
        raise TokenizerError(f"GGUF metadata {key} is a string, expected a list")
    return list(value)


# --------------------------------------------------------------------------- shared helpers


def _stop_token_ids(backend: Backend) -> frozenset[int]:
    """Ids of special added tokens whose text is in :data:`STOP_TOKEN_STRINGS`."""
    return frozenset(
        token_id
        for token_id, added in backend.get_added_tokens_decoder().items()
        if added.special and added.content in STOP_TOKEN_STRINGS
    )


@lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment chat templates are rendered in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _token_id(backend: Backend, token: object) -> int | None:
    """Id of a tokenizer_config token entry (a string or ``{"content": ...}``)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str) or not token:
        return None
    return backend.token_to_id(token)


def _as_int_list(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _hf_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else the config's (default) template."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _post_processor_starts_with(processor: object, token_id: int) -> bool:
    """Whether a tokenizer.json post-processor prepends ``token_id`` to single inputs."""
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        return any(_post_processor_starts_with(p, token_id) for p in processor.get("processors", []))
    if processor.get("type") != "TemplateProcessing":
        return False
    single = processor.get("single") or []
    first = single[0].get("SpecialToken") if single and isinstance(single[0], dict) else None
    if not first:
        return False
    entry = (processor.get("special_tokens") or {}).get(first.get("id"), {})
    return list(entry.get("ids", []))[:1] == [token_id]
