"""Batched CPU decode attention through the native kernel (``kernels/decode_attn.c``).

One call per layer covers every sequence of the decode batch: it appends the new
token's k/v to each cache and returns ``(out, lse)`` — the near-data attention
primitive: q and the new k/v go in, the output and its log-sum-exp come out.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch

from kvoffload.kernels.build import load

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_ARGTYPES = [_I, _I, _I, _I, _I, _P, _L, _P, _L, _P, _L, _P, _P, _P, _P, ctypes.c_float, _P, _P, _I]
_FUNCS = {torch.float32: "kvo_decode_attn_f32", torch.bfloat16: "kvo_decode_attn_bf16"}


class NativeDecode:
    """Bound to one KV dtype; ``None`` from :meth:`create` when the kernel can't be used."""

    def __init__(self, fn, H_kv: int, G: int, D: int) -> None:
        self.fn, self.H_kv, self.G, self.D = fn, H_kv, G, D
        self.scale = 1.0 / math.sqrt(D)

    @classmethod
    def create(cls, kv_dtype: torch.dtype, device: torch.device, H_kv: int, G: int, D: int,
               act_dtype: torch.dtype | None = None) -> NativeDecode | None:
        """The kernel computes with activations in the KV dtype; other pairings use PyTorch."""
        if device.type != "cpu" or kv_dtype not in _FUNCS or G > 32 or D > 256:
            return None
        if act_dtype is not None and act_dtype != kv_dtype:
            return None
        lib = load("decode_attn")
        if lib is None:
            return None
        fn = getattr(lib, _FUNCS[kv_dtype])
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
        return cls(fn, H_kv, G, D)

    def __call__(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 k_bases: np.ndarray, v_bases: np.ndarray, caps: np.ndarray, lens: np.ndarray,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[B, H, D]``, k_new/v_new ``[B, H_kv, D]`` (the cache's dtype; heads contiguous,
        any batch stride) -> out ``[B, H, D]`` (same dtype), lse ``[B, H]`` (fp32).

        ``lens[b]`` counts the new token; it is written at position ``lens[b] - 1``.
        """
        B = q.shape[0]
        for t in (q, k_new, v_new):
            if t.stride(-1) != 1 or t.stride(-2) != self.D:
                raise ValueError("native decode needs heads contiguous (stride D) in q, k_new, v_new")
        out = torch.empty(B, self.H_kv * self.G, self.D, dtype=q.dtype)
        lse = torch.empty(B, self.H_kv * self.G)
        rc = self.fn(B, self.H_kv, self.G, self.D, layer, q.data_ptr(), q.stride(0), k_new.data_ptr(), k_new.stride(0),
                     v_new.data_ptr(), v_new.stride(0), k_bases.ctypes.data, v_bases.ctypes.data,
                     caps.ctypes.data, lens.ctypes.data, self.scale, out.data_ptr(), lse.data_ptr(),
                     torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("native decode attention rejected its arguments")
        return out, lse
