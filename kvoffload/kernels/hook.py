"""ctypes side of ``kvo_hook.h``: a decode layer's attention as a native hook (a C function and
its context), which a fused layer (``decode.c``'s kvo_layer_decode) calls inside its own native
call. Made by the in-memory backend's prepared calls (kernels/paged.py: a dense layer) and sparse
steps (kernels/select.py)."""

from __future__ import annotations

import ctypes

from kvoffload.dtypes import DTYPES
from kvoffload.kernels.build import load


class AttnHook(ctypes.Structure):
    """kvo_hook.h's kvo_attn_hook: the function and its context."""
    _fields_ = [("fn", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]

    @classmethod
    def of(cls, lib: ctypes.CDLL, fn: str, ctx: ctypes.Structure, owner: object) -> AttnHook:
        """The hook calling ``lib``'s ``fn`` with ``ctx``. It keeps ``owner`` (what holds
        ``ctx`` and the buffers it points to) alive: whoever holds the hook through a native
        call holds everything the call reads (another thread may drop the owner meanwhile)."""
        hook = cls(ctypes.cast(getattr(lib, fn), ctypes.c_void_p).value, ctypes.addressof(ctx))
        hook.owner = owner
        return hook


class _Convert(ctypes.Structure):
    """kvo_hook.h's kvo_convert (the same fields in the same order)."""
    _fields_ = [("inner", AttnHook), ("cvt", ctypes.c_void_p), ("rows", ctypes.c_int32), ("n", ctypes.c_int32),
                ("itemsize", ctypes.c_int32), ("buf", ctypes.c_void_p)]


class KVConvert:
    """Hooks whose new tokens' k/v arrive in the activation dtype and are appended in another KV
    dtype (fp32 compute with bf16 / fp16 KV, where no bf16 arithmetic is native): paged_attn.c's
    kvo_convert_hook rounds them as ``.to(kv_dtype)`` does in the backends' ``decode``, then
    calls the backend's own hook, so the layer stays one native call with the same bits."""

    def __init__(self, kv: str, n: int) -> None:
        """kv: the KV dtype's name (kvoffload/dtypes.py); n: elements of a token's k (H_kv x D)."""
        self.kv, self.n, self.itemsize = DTYPES[kv], n, DTYPES[kv].itemsize
        self._cvt: dict[str, int] = {}                  # activation dtype -> its kvo_cvt_* function

    def wrap(self, inner: AttnHook, act: str, rows: int) -> AttnHook:
        """``inner`` behind the conversion of up to ``rows`` new tokens of dtype ``act``: a
        context and buffer of its own (decode micro-batches' forwards may run at once), kept
        alive by the hook."""
        lib = load("paged_attn")
        cvt = self._cvt.get(act)
        if cvt is None:
            fn = getattr(lib, f"kvo_cvt_{DTYPES[act].kernel}_{self.kv.kernel}")
            cvt = self._cvt[act] = ctypes.cast(fn, ctypes.c_void_p).value
        buf = (ctypes.c_char * (2 * rows * self.n * self.itemsize))()
        ctx = _Convert(inner, cvt, rows, self.n, self.itemsize, ctypes.addressof(buf))
        return AttnHook.of(lib, "kvo_convert_hook", ctx, (inner, ctx, buf))
