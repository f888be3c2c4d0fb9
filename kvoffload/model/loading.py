"""Checkpoint on disk -> ready model + tokenizer, with load time and peak RSS."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch

from kvoffload.config import EngineConfig, ModelConfig
from kvoffload.device import resolve_dtype
from kvoffload.dtypes import torch_dtype
from kvoffload.errors import ModelLoadError
from kvoffload.model.llama import Transformer
from kvoffload.model.loader.common import LoadedCheckpoint
from kvoffload.model.loader.gguf_loader import load_gguf, read_gguf_config
from kvoffload.model.loader.hf_loader import load_hf_dir, read_hf_config
from kvoffload.model.quant import quantize
from kvoffload.model.registry import resolve_model
from kvoffload.model.rope import Rope
from kvoffload.model.tokenizer import Tokenizer
from kvoffload.paths import set_cache_dir


@dataclass(frozen=True)
class LoadStats:
    source: str
    file_format: str
    weight_type: str          # how the file stores the layer weights
    dtype: str                # compute dtype in use (``auto`` resolved)
    quantization: str         # decode weight format in use (``auto`` resolved)
    seconds: float
    peak_rss_bytes: int
    weight_bytes: int


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_checkpoint(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    return load_hf_dir(path, dtype) if _is_hf_dir(path) else load_gguf(path, dtype)


def read_config(path: str) -> ModelConfig:
    """The architecture only (no weights read)."""
    return read_hf_config(path) if _is_hf_dir(path) else read_gguf_config(path)


def build_model(ckpt: LoadedCheckpoint, device: torch.device) -> Transformer:
    """Construct without initialising (meta device), then adopt the loaded tensors."""
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    res = model.load_state_dict(ckpt.state_dict, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not (ckpt.config.tie_embeddings and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ModelLoadError(f"{ckpt.source}: tensors missing {missing[:3]} / unexpected {res.unexpected_keys[:3]}")
    if ckpt.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rope = Rope(ckpt.config)                 # fp32 tables, computed for real
    return model.to(device).eval().requires_grad_(False)


def resolve_quantization(name: str, device: torch.device, dtype: str, ckpt: LoadedCheckpoint) -> str:
    if name != "auto":
        return name
    return "int4" if device.type == "cpu" and dtype == "bfloat16" and ckpt.four_bit else "none"


def load_model(cfg: EngineConfig, device: torch.device) -> tuple[Transformer, Tokenizer, LoadStats]:
    t0 = time.perf_counter()
    set_cache_dir(cfg.cache_dir)                 # assembled models and compiled kernels go there
    path = resolve_model(cfg.model, cfg.cache_dir)
    dtype = resolve_dtype(cfg.dtype, device)
    ckpt = read_checkpoint(path, torch_dtype(dtype))
    quant = resolve_quantization(cfg.quantization, device, dtype, ckpt)
    tokenizer = (Tokenizer.from_hf_dir(ckpt.tokenizer_source) if isinstance(ckpt.tokenizer_source, str)
                 else Tokenizer.from_gguf_metadata(ckpt.tokenizer_source))
    model = build_model(ckpt, device)
    file_format, weight_type = ckpt.file_format, ckpt.weight_type
    del ckpt
    if quant != "none":
        quantize(model, quant, torch_dtype(dtype), device, cfg.quant_max_rows)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = sum(t.nbytes for t in tensors.values()) - model.rope.cos.nbytes - model.rope.sin_signed.nbytes
    stats = LoadStats(path, file_format, weight_type, dtype, quant, time.perf_counter() - t0,
                      peak_rss_bytes(), weight_bytes)
    return model, tokenizer, stats


def model_summary(cfg: ModelConfig) -> dict[str, object]:
    return {
        "architecture": cfg.arch,
        "parameters": cfg.num_params,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "ffn": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "context_length": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else cfg.rope_scaling.kind,
        "tied_embeddings": cfg.tie_embeddings,
        "qkv_bias": cfg.qkv_bias,
        "kv_bytes_per_token_fp16": cfg.kv_bytes_per_token(2),
    }
