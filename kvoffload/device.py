"""Compute device and CPU threads."""

from __future__ import annotations

import torch

from kvoffload.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but this PyTorch build sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device type {dev.type!r} (use cpu or cuda)")
    return dev


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"
