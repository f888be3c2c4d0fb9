"""Checkpoint on disk -> ready model + tokenizer, with load time and peak RSS."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from kvoffload import hugepages
from kvoffload.config import EngineConfig, ModelConfig
from kvoffload.device import resolve_dtype
from kvoffload.dtypes import torch_dtype
from kvoffload.errors import ConfigError, ModelLoadError
from kvoffload.model.fused import fuse_layers, fused_available, q5_native
from kvoffload.model.llama import Transformer
from kvoffload.model.loader.common import LoadedCheckpoint, decode_format
from kvoffload.model.loader.gguf_file import GGUFFile
from kvoffload.model.loader.gguf_loader import (
    layer_weight_type,
    load_gguf,
    read_gguf_config,
)
from kvoffload.model.loader.hf_loader import load_hf_dir, read_hf_config
from kvoffload.model.quant import quantize, weight_formats
from kvoffload.model.registry import resolve_model
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
    weight_bytes: int         # resident weight tensors + bytes read from the file's map on use
    weight_formats: str = ""  # decode formats of the linear layers and their counts ("int8 25, q5 60")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_checkpoint(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    """Dense weights in ``dtype`` (the exact path; see :func:`load_model` for the decode formats)."""
    return load_hf_dir(path, dtype) if _is_hf_dir(path) else load_gguf(path, dtype)


def read_config(path: str) -> ModelConfig:
    """The architecture only (no weights read)."""
    return read_hf_config(path) if _is_hf_dir(path) else read_gguf_config(path)


@contextlib.contextmanager
def _uninitialised():
    """Linear and Embedding modules constructed without initialising their weights (allocated,
    never written, so never resident: the checkpoint's replace them). Not the meta device:
    creating tensors under its mode imports ``torch._dynamo`` (~3 s of start-up)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def build_model(ckpt: LoadedCheckpoint, device: torch.device) -> Transformer:
    """Construct without initialising, then adopt the loaded tensors."""
    with _uninitialised():
        model = Transformer(ckpt.config)
    for name, module in ckpt.modules.items():      # built by the loader in their decode format
        model.set_submodule(name, module)
    res = model.load_state_dict(ckpt.state_dict, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not (ckpt.config.tie_embeddings and k == "lm_head.weight")
               and not k.startswith(tuple(ckpt.modules))]
    if missing or res.unexpected_keys:
        raise ModelLoadError(f"{ckpt.source}: tensors missing {missing[:3]} / unexpected {res.unexpected_keys[:3]}")
    if ckpt.config.tie_embeddings and "lm_head" not in ckpt.modules:
        model.lm_head.weight = model.embed.weight
    return model.to(device).eval().requires_grad_(False)


def resolve_quantization(name: str, device: torch.device, dtype: str, weight_type: str, fused: bool = False) -> str:
    """``auto``: on the CPU, the decode format of the file's weight type
    (:func:`~kvoffload.model.loader.common.decode_format`) with bf16 activations, or with fp32
    ones where the fused native decode layer runs (``fused``: CPUs without native bf16, e.g.
    AVX2 ones, where fp32 is the compute dtype: SmolLM2 decodes 6.9x faster in int4 than from
    dense fp32 weights, Qwen2.5-Coder-0.5B 5.1x in int8); else none."""
    if name != "auto":
        return name
    if device.type == "cpu" and (dtype == "bfloat16" or (dtype == "float32" and fused)):
        return decode_format(weight_type)
    return "none"


def load_model(cfg: EngineConfig, device: torch.device) -> tuple[Transformer, Tokenizer, LoadStats]:
    t0 = time.perf_counter()
    set_cache_dir(cfg.cache_dir)                 # assembled models and compiled kernels go there
    path = resolve_model(cfg.model, cfg.cache_dir)
    dtype = resolve_dtype(cfg.dtype, device)
    fused = device.type == "cpu" and cfg.decode_kernel == "native" and fused_available()
    if _is_hf_dir(path):
        ckpt = load_hf_dir(path, torch_dtype(dtype))
        quant = resolve_quantization(cfg.quantization, device, dtype, ckpt.weight_type, fused)
    else:
        f = GGUFFile(path)
        quant = resolve_quantization(cfg.quantization, device, dtype, layer_weight_type(f), fused)
        if quant != "none" and device.type != "cpu":
            raise ConfigError(f"{quant} weights use a CPU kernel; on CUDA run without --quantization")
        ckpt = load_gguf(f, torch_dtype(dtype), quant, cfg.quant_max_rows,
                         q5=cfg.decode_kernel == "native" and q5_native())
    tokenizer = (Tokenizer.from_hf_dir(ckpt.tokenizer_source) if isinstance(ckpt.tokenizer_source, str)
                 else Tokenizer.from_gguf_metadata(ckpt.tokenizer_source))
    model = build_model(ckpt, device)
    file_format, weight_type, mapped = ckpt.file_format, ckpt.weight_type, ckpt.mapped_bytes
    prebuilt = bool(ckpt.modules)
    del ckpt
    if quant != "none" and not prebuilt:
        quantize(model, quant, torch_dtype(dtype), device, cfg.quant_max_rows)
    if device.type == "cpu":
        hugepages.move_module_tensors(model)     # before the fused layers record addresses
    if quant != "none" and cfg.decode_kernel == "native":
        fuse_layers(model, cfg.threads or torch.get_num_threads())
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = (sum(t.nbytes for t in tensors.values()) - model.rope.cos.nbytes - model.rope.sin_signed.nbytes
                    + mapped)
    stats = LoadStats(path, file_format, weight_type, dtype, quant, time.perf_counter() - t0,
                      peak_rss_bytes(), weight_bytes, weight_formats(model))
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
