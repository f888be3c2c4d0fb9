"""ctypes side of ``kvo_hook.h``: a decode layer's attention as a native hook (a C function and
its context), which a fused layer (``decode.c``'s kvo_layer_decode) calls inside its own native
call. Made by the in-memory backend's prepared calls (kernels/paged.py: a dense layer) and sparse
steps (kernels/select.py)."""

from __future__ import annotations

import ctypes


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
