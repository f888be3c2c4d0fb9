"""ctypes side of ``kvo_hook.h``: a decode layer's attention as a native hook (a C function and
its context), which a fused layer (``decode.c``'s kvo_layer_decode) calls inside its own native
call. Made by the in-memory backend's prepared calls (kernels/paged.py: a dense layer) and sparse
steps (kernels/select.py)."""

from __future__ import annotations

import ctypes

from kvoffload.dtypes import NAMES


class AttnHook(ctypes.Structure):
    """kvo_hook.h's kvo_attn_hook: the function, its context, and the dtype of the k / v it
    takes (a code of :data:`kvoffload.dtypes.NAMES`: decode.c's fused layer rounds its
    activations' k / v to it where they differ)."""
    _fields_ = [("fn", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("kv_dtype", ctypes.c_int32)]

    @classmethod
    def of(cls, lib: ctypes.CDLL, fn: str, ctx: ctypes.Structure, owner: object, kv_dtype: str) -> AttnHook:
        """The hook calling ``lib``'s ``fn`` with ``ctx``, taking k / v in ``kv_dtype`` (a
        full-precision dtype's name). It keeps ``owner`` (what holds ``ctx`` and the buffers it
        points to) alive: whoever holds the hook through a native call holds everything the call
        reads (another thread may drop the owner meanwhile)."""
        hook = cls(ctypes.cast(getattr(lib, fn), ctypes.c_void_p).value, ctypes.addressof(ctx),
                   NAMES.index(kv_dtype))
        hook.owner = owner
        return hook
