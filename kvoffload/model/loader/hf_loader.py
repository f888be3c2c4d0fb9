"""Hugging Face model directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from kvoffload.config import ModelConfig, RopeScaling
from kvoffload.errors import ModelLoadError
from kvoffload.model.loader.common import LoadedCheckpoint, build_state_dict, check_arch


def _rope_scaling(cfg: dict[str, Any], path: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
    raise ModelLoadError(f"{path}: unsupported rope scaling {kind!r} (supported: linear, llama3)")


def config_from_hf(cfg: dict[str, Any], path: str) -> ModelConfig:
    arch = cfg.get("model_type", "?")
    check_arch(arch, path)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope_scaling(cfg, path)
        return ModelConfig(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}/config.json lacks {e.args[0]!r}") from None


def read_hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
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
