"""ctypes binding of ``qweights.c``: GGUF blocks -> fp32 rows, and the decode weight formats
-> dense rows (the prefill's scratch). Each function has a reference (``gguf.quants`` for the
GGUF types, PyTorch in :mod:`kvoffload.model.quant` for the decode formats) that the tests
compare bit for bit; without the native library the reference runs.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from kvoffload.kernels.build import load

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def _lib():
    lib = load("qweights")
    if lib is not None and not getattr(lib, "_typed", False):
        lib.kvo_gguf_supported.argtypes = [_I]
        lib.kvo_gguf_gather.argtypes = [_I, _P, _L, _P, _L, _L, _P, _I]
        lib.kvo_int4pack_dequant_t.argtypes = [_P, _P, _I, _L, _L, _I, _L, _L, _P, _I, _I]
        lib.kvo_int8_dequant.argtypes = [_P, _P, _I, _L, _L, _L, _P, _I, _I]
        lib.kvo_q4_pack.argtypes = [_I, _P, _L, _L, _P, _P, _I]
        lib.kvo_gguf_to_int8.argtypes = [_I, _P, _L, _L, _P, _P, _I]
        lib.kvo_q5_pack.argtypes = [_P, _L, _L, _P, _P, _P, _I]
        lib.kvo_q5_dequant_t.argtypes = [_P, _P, _P, _L, _L, _L, _L, _P, _I, _I]
        lib._typed = True
    return lib


def native_gguf(qtype: int) -> bool:
    """Whether the native kernel dequantises this ggml type."""
    lib = _lib()
    return lib is not None and bool(lib.kvo_gguf_supported(qtype))


def gguf_reference(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """``gguf.quants``' dequantisation of ``raw`` ``[rows, row_bytes]`` -> fp32 ``[rows, cols]``."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, GGMLQuantizationType(qtype)), dtype=np.float32).reshape(len(raw), cols)


def gguf_dequant(raw: np.ndarray, qtype: int, cols: int, threads: int | None = None) -> np.ndarray:
    """``raw`` ``[rows, row_bytes]`` uint8 (rows may be strided, bytes contiguous) -> fp32 ``[rows, cols]``."""
    if not native_gguf(qtype) or raw.strides[1] != 1:
        return gguf_reference(raw, qtype, cols)
    out = np.empty((raw.shape[0], cols), np.float32)
    if raw.shape[0] and _lib().kvo_gguf_gather(qtype, raw.ctypes.data, raw.strides[0], None, raw.shape[0], cols,
                                               out.ctypes.data, threads or torch.get_num_threads()):
        raise ValueError(f"ggml type {qtype}: rows of {cols} are not whole blocks")
    return out


def gguf_gather(raw: np.ndarray, qtype: int, cols: int, idx: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Rows ``idx`` of ``raw`` ``[rows, row_bytes]`` dequantised -> fp32 ``[len(idx), cols]``."""
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if not native_gguf(qtype) or raw.strides[1] != 1:
        return gguf_reference(raw[idx], qtype, cols)
    if idx.size and (idx.min() < 0 or idx.max() >= raw.shape[0]):
        raise IndexError(f"row index out of range [0, {raw.shape[0]})")
    out = np.empty((idx.size, cols), np.float32)
    if idx.size and _lib().kvo_gguf_gather(qtype, raw.ctypes.data, raw.strides[0], idx.ctypes.data, idx.size, cols,
                                           out.ctypes.data, threads or torch.get_num_threads()):
        raise ValueError(f"ggml type {qtype}: rows of {cols} are not whole blocks")
    return out


def int4pack_dequant_t(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, n0: int, n1: int,
                       out: torch.Tensor, threads: int | None = None) -> bool:
    """Rows ``n0:n1`` of an int4 weight (:func:`kvoffload.model.quant.int4_pack`'s layout), transposed, into ``out`` ``[K, n1-n0]``
    (bf16 or fp32): the prefill GEMM's ``W[n0:n1]^T``. False (nothing written) when the native
    kernel is unavailable or the layout is not one it reads."""
    lib = _lib()
    K, N = packed.shape[1] * 2, scale_zero.shape[1]
    if (lib is None or packed.dim() != 2 or packed.shape[0] != N or N % 64 or n0 % 64 or n1 % 64
            or out.dtype not in (torch.bfloat16, torch.float32) or scale_zero.dtype not in (torch.bfloat16, torch.float32)
            or not (packed.is_contiguous() and scale_zero.is_contiguous() and out.is_contiguous())
            or tuple(out.shape) != (K, n1 - n0)):
        return False
    return lib.kvo_int4pack_dequant_t(packed.data_ptr(), scale_zero.data_ptr(), int(scale_zero.dtype == torch.float32),
                                      N, K, group, n0, n1, out.data_ptr(), int(out.dtype == torch.float32),
                                      threads or torch.get_num_threads()) == 0


def int8_dequant(q: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, out: torch.Tensor,
                 threads: int | None = None) -> bool:
    """Rows ``n0:n1`` of a per-row int8 weight (``q`` ``[N, K]``, ``scale`` ``[N]``) into ``out``
    ``[n1-n0, K]`` (bf16 or fp32), as ``torch.mul(q[n0:n1], scale[n0:n1, None])`` (bit-identical);
    False (nothing written) when the native kernel is unavailable or a layout is not one it reads."""
    lib = _lib()
    if (lib is None or q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],)
            or out.dtype not in (torch.bfloat16, torch.float32) or scale.dtype not in (torch.bfloat16, torch.float32)
            or not (q.is_contiguous() and scale.is_contiguous() and out.is_contiguous())
            or not 0 <= n0 <= n1 <= q.shape[0] or tuple(out.shape) != (n1 - n0, q.shape[1])):
        return False
    return lib.kvo_int8_dequant(q.data_ptr(), scale.data_ptr(), int(scale.dtype == torch.float32), q.shape[1],
                                n0, n1, out.data_ptr(), int(out.dtype == torch.float32),
                                threads or torch.get_num_threads()) == 0


def q4_pack(qtype: int, rows: np.ndarray, K: int, threads: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q4_0 / Q4_1 rows (``rows[n]``: the address of output row n's blocks) -> (the int4 layout
    (:func:`kvoffload.model.quant.int4_pack`) ``[N, K/2]`` uint8, scale_zero ``[K/32, N, 2]`` fp32), the codes kept as they are;
    None when the native kernel is unavailable or N is not a multiple of 64."""
    lib, N = _lib(), len(rows)
    if lib is None or N % 64 or K % 32:
        return None
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    scale_zero = torch.empty(K // 32, N, 2)
    if lib.kvo_q4_pack(qtype, rows.ctypes.data, N, K, packed.data_ptr(), scale_zero.data_ptr(),
                       threads or torch.get_num_threads()):
        return None
    return packed, scale_zero


def gguf_to_int8(qtype: int, rows: np.ndarray, q: torch.Tensor, scale: torch.Tensor, threads: int | None = None) -> bool:
    """GGUF rows (``rows[n]``: the address of output row n's blocks) -> int8 codes ``q`` ``[N, K]``
    and fp32 scales ``scale`` ``[N]`` (contiguous), per row as
    :func:`kvoffload.model.quant.int8_rows` (bit-identical); False (nothing written) when the
    native kernel does not read this type."""
    if not native_gguf(qtype) or not (q.is_contiguous() and scale.is_contiguous()):
        return False
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return not _lib().kvo_gguf_to_int8(qtype, rows.ctypes.data, len(rows), q.shape[1], q.data_ptr(), scale.data_ptr(),
                                       threads or torch.get_num_threads())


def q5_pack(rows: np.ndarray, K: int, threads: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GGUF Q5_0 rows (``rows[n]``: the address of output row n's blocks) -> the q5 layout of
    :class:`kvoffload.model.quant.Q5Linear` (codes ``[N/32, K/4, 64]`` uint8, hbits ``[N/32, K/4, 2]``
    int64, scale ``[K/32, N]`` fp16), the file's codes and scales as they are; None when the
    native kernel is unavailable or N, K are not multiples of 32."""
    lib, N = _lib(), len(rows)
    if lib is None or N % 32 or K % 32:
        return None
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    codes = torch.empty(N // 32, K // 4, 64, dtype=torch.uint8)
    hbits = torch.empty(N // 32, K // 4, 2, dtype=torch.int64)
    scale = torch.empty(K // 32, N, dtype=torch.float16)
    if lib.kvo_q5_pack(rows.ctypes.data, N, K, codes.data_ptr(), hbits.data_ptr(), scale.data_ptr(),
                       threads or torch.get_num_threads()):
        return None
    return codes, hbits, scale


def q5_dequant_t(codes: torch.Tensor, hbits: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, out: torch.Tensor,
                 threads: int | None = None) -> bool:
    """Rows ``n0:n1`` (multiples of 32) of a q5 weight, transposed, into ``out`` ``[K, n1-n0]``
    (bf16 or fp32), bit-identical to :meth:`kvoffload.model.quant.Q5Linear.reference_rows`;
    False (nothing written) when the native kernel is unavailable or a layout is not one it reads."""
    lib = _lib()
    K, N = scale.shape[0] * 32, scale.shape[1]
    if (lib is None or scale.dtype != torch.float16 or codes.dtype != torch.uint8 or hbits.dtype != torch.int64
            or tuple(codes.shape) != (N // 32, K // 4, 64) or tuple(hbits.shape) != (N // 32, K // 4, 2)
            or out.dtype not in (torch.bfloat16, torch.float32) or n0 % 32 or n1 % 32 or not 0 <= n0 <= n1 <= N
            or not (codes.is_contiguous() and hbits.is_contiguous() and scale.is_contiguous() and out.is_contiguous())
            or tuple(out.shape) != (K, n1 - n0)):
        return False
    return lib.kvo_q5_dequant_t(codes.data_ptr(), hbits.data_ptr(), scale.data_ptr(), N, K, n0, n1, out.data_ptr(),
                                int(out.dtype == torch.float32), threads or torch.get_num_threads()) == 0
