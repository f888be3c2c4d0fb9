"""The one table of the dtypes kvoffload computes and stores in (torch-free: disk worker
processes import it).

Each dtype is named as torch names it (``"bfloat16"``); the table says how many bytes an
element takes, which numpy dtype holds its bits (numpy has no bfloat16: its bits live in
``uint16``) and the suffix of the native kernels compiled for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """name: torch's name. itemsize: bytes per element. storage: the numpy dtype holding its
    bits. kernel: suffix of the native kernels for it (``kvo_paged_attn_<kernel>``)."""

    name: str
    itemsize: int
    storage: type
    kernel: str


DTYPES: dict[str, DType] = {
    "float32": DType("float32", 4, np.float32, "f32"),
    "bfloat16": DType("bfloat16", 2, np.uint16, "bf16"),
    "float16": DType("float16", 2, np.float16, "f16"),
}
NAMES: tuple[str, ...] = tuple(DTYPES)


@dataclass(frozen=True)
class QuantDType:
    """A compressed KV block format (kv/layout.py holds its byte layout): name as ``--kv-dtype``
    spells it; bits per code; kernel: suffix of its native paged kernel. Its blocks are stored
    as bytes (uint8) and computed over in full precision (the compute dtype)."""

    name: str
    bits: int
    kernel: str


QUANT: dict[str, QuantDType] = {
    "int8": QuantDType("int8", 8, "q8"),
    "int4": QuantDType("int4", 4, "q4"),
}
# what --kv-dtype accepts: a full-precision dtype or a compressed block format
KV_NAMES: tuple[str, ...] = NAMES + tuple(QUANT)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name].name)


def storage_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a KV slot of ``name`` is held in (a compressed block: its bytes, uint8)."""
    import torch

    return torch.uint8 if name in QUANT else torch_dtype(name)


def name_of(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    return name


def to_float32(bits: np.ndarray, name: str) -> np.ndarray:
    """An array of ``name``'s storage dtype -> float32 values (bfloat16: the top half of an fp32)."""
    if name == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.astype(np.float32)
