"""Hugging Face model directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from kvoffload.config import ModelConfig, RopeScaling
from kvoffload.errors import ConfigError, ModelLoadError
from kvoffload.model.loader.common import (
    LoadedCheckpoint,
    build_state_dict,
    check_arch,
    header_value,
)


def _rope_scaling(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(v, dict):
            raise ModelLoadError(f"{where}: {key} must be an object, got {v!r:.40}")
    theta = header_value(params, "rope_theta", float, where, header_value(cfg, "rope_theta", float, where, 10000.0),
                         minimum=1e-9)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=header_value(scaling, "factor", float, where, minimum=1e-9,
                                                                name="rope_scaling.factor"))
    if kind == "llama3":
        def f(key: str, default: Any, kind: type = float) -> Any:
            return header_value(scaling, key, kind, where, default, minimum=0, name=f"rope_scaling.{key}")
        return theta, RopeScaling(
            "llama3", factor=header_value(scaling, "factor", float, where, minimum=1e-9, name="rope_scaling.factor"),
            low_freq_factor=f("low_freq_factor", 1.0), high_freq_factor=f("high_freq_factor", 4.0),
            original_max_position=f("original_max_position_embeddings", 8192, int))
    raise ModelLoadError(f"{where}: unsupported rope scaling {kind!r:.40} (supported: linear, llama3)")


def config_from_hf(cfg: dict[str, Any], path: str) -> ModelConfig:
    """config.json -> ModelConfig, each field checked (type, range) and named in the error."""
    where = f"{path}/config.json"
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{where}: expected a JSON object, got a {type(cfg).__name__}")
    arch = cfg.get("model_type", "?")
    check_arch(arch if isinstance(arch, str) else repr(arch), path)

    def get(key: str, kind: type = int, **kw) -> Any:
        return header_value(cfg, key, kind, where, **kw)

    heads = get("num_attention_heads", minimum=1)
    hidden = get("hidden_size", minimum=1)
    theta, scaling = _rope_scaling(cfg, where)
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=get("vocab_size", minimum=1),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", minimum=1),
            num_layers=get("num_hidden_layers", minimum=1),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", default=heads, minimum=1),
            head_dim=get("head_dim", default=hidden // heads, minimum=1),
            rms_eps=get("rms_norm_eps", float, default=1e-6, minimum=0),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=get("max_position_embeddings", default=4096, minimum=2),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except ConfigError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def read_hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{cfg_path}: unreadable ({e})") from None
    return config_from_hf(raw, path)


def load_hf_dir(path: str, dtype: torch.dtype) -> LoadedCheckpoint:
    from safetensors import safe_open

    cfg = read_hf_config(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    handles, where = [], {}
    try:
        for fname in files:
            h = safe_open(fname, framework="pt")
            handles.append(h)
            for key in h.keys():
                where[key] = h
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt safetensors file ({e})") from None

    def get(name: str) -> torch.Tensor | None:
        h = where.get(name)
        return None if h is None else h.get_tensor(name).float()

    sd = build_state_dict(cfg, get, dtype, path)
    stored = where["model.layers.0.mlp.down_proj.weight"].get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() \
        if "model.layers.0.mlp.down_proj.weight" in where else "F32"
    return LoadedCheckpoint(cfg, sd, path, path, "safetensors", stored)
