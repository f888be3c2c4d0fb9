"""Checkpoint-independent part of loading: canonical (HF-named) tensors -> our module's state dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kvoffload.config import ModelConfig
from kvoffload.errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
FOUR_BIT_PREFIXES = ("Q4_", "IQ4", "Q3_", "IQ3", "Q2_", "IQ2", "IQ1")
DENSE_TYPES = ("F32", "F16", "BF16", "F64")


def decode_format(weight_type: str) -> str:
    """The decode weight format that keeps a file's precision: ``int4`` for files at <= 4 bits
    (int4 re-packs them with next to no loss), ``int8`` for other quantised files (Q5_*, Q6_K,
    Q8_0: 4 bits would lose), ``none`` for dense files."""
    if weight_type.startswith(FOUR_BIT_PREFIXES):
        return "int4"
    return "none" if weight_type in DENSE_TYPES else "int8"

TensorGetter = Callable[[str], torch.Tensor | None]
"""Returns the fp32 tensor stored under a Hugging Face name, or None when absent."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a loader hands to the engine."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]   # our module names, in the requested dtype
    tokenizer_source: Mapping[str, object] | str   # GGUF metadata dict or HF directory path
    source: str                           # file or directory it came from
    file_format: str                      # "gguf" or "safetensors"
    weight_type: str                      # storage type of most layer weights: "Q4_1", "Q5_0", "F32", "BF16", ...
    modules: Mapping[str, nn.Module] = dataclasses.field(default_factory=dict)
    """modules built by the loader in their decode format (``"layers.0.attn.qkv_proj"``,
    ``"lm_head"``, ``"embed"``, ...): they replace the model's own, and their weights are
    not in ``state_dict``."""
    mapped_bytes: int = 0                 # weight bytes read from the file's map on use (not copied)


def check_arch(arch: str, path: str) -> None:
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")


def build_state_dict(cfg: ModelConfig, get: TensorGetter, dtype: torch.dtype,
                     source: str) -> dict[str, torch.Tensor]:
    """Fuse q/k/v and gate/up, rename, cast. ``get`` is called once per HF tensor name."""

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise ModelLoadError(f"{source}: tensor {name!r} is missing")
        return t

    sd: dict[str, torch.Tensor] = {
        "embed.weight": need("model.embed_tokens.weight").to(dtype),
        "norm.weight": need("model.norm.weight").to(dtype),
    }
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = need("lm_head.weight").to(dtype)
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        qkv = [need(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
        sd[o + "attn.qkv_proj.weight"] = torch.cat(qkv).to(dtype)
        if cfg.qkv_bias:
            sd[o + "attn.qkv_proj.bias"] = torch.cat([need(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]).to(dtype)
        sd[o + "attn.o_proj.weight"] = need(p + "self_attn.o_proj.weight").to(dtype)
        gate_up = [need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight")]
        sd[o + "mlp.gate_up_proj.weight"] = torch.cat(gate_up).to(dtype)
        sd[o + "mlp.down_proj.weight"] = need(p + "mlp.down_proj.weight").to(dtype)
        sd[o + "input_norm.weight"] = need(p + "input_layernorm.weight").to(dtype)
        sd[o + "post_attn_norm.weight"] = need(p + "post_attention_layernorm.weight").to(dtype)
    _check_shapes(cfg, sd, source)
    return sd


def _check_shapes(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    d, hd = cfg.hidden_size, cfg.head_dim
    expect = {
        "embed.weight": (cfg.vocab_size, d),
        "layers.0.attn.qkv_proj.weight": ((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, d),
        "layers.0.attn.o_proj.weight": (d, cfg.num_heads * hd),
        "layers.0.mlp.gate_up_proj.weight": (2 * cfg.intermediate_size, d),
        "layers.0.mlp.down_proj.weight": (d, cfg.intermediate_size),
    }
    for name, shape in expect.items():
        if name in sd and tuple(sd[name].shape) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(sd[name].shape)}, "
                                 f"config implies {shape}")


MISSING = object()


def header_value(raw: Mapping[str, Any], key: str, kind: type, where: str, default: Any = MISSING,
                 minimum: float | None = None, name: str | None = None) -> Any:
    """``raw[key]`` checked to be a ``kind`` (int or float; a JSON null or an absent key takes
    ``default``), at least ``minimum``; a one-line :class:`ModelLoadError` naming ``where`` and
    the field otherwise."""
    import math
    import numbers

    name = name or key
    value = raw.get(key) if isinstance(raw, Mapping) else None
    if value is None:
        if default is MISSING:
            raise ModelLoadError(f"{where} lacks {name!r}" if key not in raw else f"{where}: {name} is null")
        return default
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    if not ok:
        raise ModelLoadError(f"{where}: {name} must be {what}, got {value!r:.40}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise ModelLoadError(f"{where}: {name} must be >= {minimum:g}, got {value}")
    return value
