"""GGUF checkpoints through the ``gguf`` package, dequantised to the compute dtype."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from kvoffload.config import ModelConfig, RopeScaling
from kvoffload.errors import ConfigError, ModelLoadError
from kvoffload.model.loader.common import (
    MISSING,
    LoadedCheckpoint,
    build_state_dict,
    check_arch,
    header_value,
)
from kvoffload.model.loader.gguf_file import GGUFFile

# GGUF per-layer tensor name -> Hugging Face name suffix
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's converter permutes q/k rows for interleaved RoPE on these architectures.
_PERMUTED_ARCHS = ("llama", "mistral")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict[str, Any], freq_factors: np.ndarray | None, path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: GGUF has no general.architecture")
    check_arch(arch, path)

    def g(key: str, kind: type = int, default: Any = MISSING, minimum: float | None = 1) -> Any:
        return header_value(meta, f"{arch}.{key}", kind, path, default, minimum)

    heads = g("attention.head_count")
    hidden = g("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, (list, tuple)) else 0)
    scaling = None
    scale_type = meta.get(f"{arch}.rope.scaling.type")
    if freq_factors is not None:
        scaling = RopeScaling("llama3", freq_factors=tuple(float(x) for x in freq_factors))
    elif scale_type == "linear":
        scaling = RopeScaling("linear", factor=g("rope.scaling.factor", float, minimum=1e-9))
    elif scale_type not in (None, "none"):
        raise ModelLoadError(f"{path}: unsupported rope scaling {scale_type!r:.40}")
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=header_value({"vocab_size": vocab}, "vocab_size", int, path, minimum=1, name=f"{arch}.vocab_size"),
            hidden_size=hidden,
            intermediate_size=g("feed_forward_length"),
            num_layers=g("block_count"),
            num_heads=heads,
            num_kv_heads=g("attention.head_count_kv", default=heads),
            head_dim=g("attention.key_length", default=hidden // heads),
            rms_eps=g("attention.layer_norm_rms_epsilon", float, 1e-5, minimum=0),
            rope_theta=g("rope.freq_base", float, 10000.0, minimum=1e-9),
            rope_scaling=scaling,
            max_position=g("context_length", default=4096, minimum=2),
            tie_embeddings=False,          # decided from the tensors below
            qkv_bias=False,
        )
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def model_config(f: GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` of an opened GGUF (metadata plus what the tensors imply)."""
    freq_factors = f.dequantize("rope_freqs.weight").reshape(-1) if "rope_freqs.weight" in f.tensors else None
    cfg = config_from_gguf(f.metadata, freq_factors, f.path)
    return dataclasses.replace(cfg, tie_embeddings="output.weight" not in f.tensors,
                               qkv_bias="blk.0.attn_q.bias" in f.tensors)


def read_gguf_config(path: str) -> ModelConfig:
    return model_config(GGUFFile(path))


def load_gguf(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    f = GGUFFile(path)
    cfg = model_config(f)
    by_hf = {h: name for name in f.tensors if (h := _hf_name(name)) is not None}

    def get(hf: str) -> torch.Tensor | None:
        name = by_hf.get(hf)
        if name is None:
            return None
        w = torch.from_numpy(f.dequantize(name))
        if w.shape[0] == 1:                      # 1-D tensors (norms, biases)
            w = w.reshape(-1)
        if cfg.arch in _PERMUTED_ARCHS and (".q_proj." in hf or ".k_proj." in hf):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
        return w

    sd = build_state_dict(cfg, get, dtype, path)
    return LoadedCheckpoint(cfg, sd, f.metadata, path, "gguf", _layer_weight_type(f))


def _layer_weight_type(f: GGUFFile) -> str:
    from collections import Counter

    from gguf.constants import GGMLQuantizationType

    types = Counter(t.qtype for name, t in f.tensors.items() if name.startswith("blk.") and name.endswith(".weight")
                    and len(t.shape) == 2)
    return GGMLQuantizationType(types.most_common(1)[0][0]).name if types else "F32"
