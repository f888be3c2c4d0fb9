"""The seam between the model and whoever owns the KV cache.

The model computes q, k, v (after RoPE) and hands them, with a
:class:`ForwardBatch`, to an :class:`AttentionBackend`; it never sees the cache.
This module sits below both ``model`` and ``attention`` so neither imports the other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch


class Phase(enum.Enum):
    """Which kind of forward pass: set by the engine, never guessed from shapes. Its value
    names the :class:`AttentionBackend` method that serves it."""

    PREFILL = "prefill"  # one sequence, a chunk of prompt tokens, causal within the chunk
    DECODE = "decode"    # B sequences, one new token each, ragged KV lengths
    VERIFY = "verify"    # B sequences, L tokens each (the last one + the draft's), causal within
                         # them; their KV is staged until the engine commits the accepted ones


class Logits(enum.Enum):
    """Which positions need logits (the LM head is ~20% of a small model's FLOPs)."""

    NONE = "none"   # a non-final prefill chunk
    LAST = "last"   # the last position of each sequence (sampling)
    ALL = "all"     # every position (perplexity, teacher forcing, verification)


@dataclass(frozen=True)
class ForwardBatch:
    """What one forward pass computes.

    phase: :class:`Phase`.
    seq_ids: the sequences, one per batch row (``B`` of them).
    positions: ``[B, L]`` absolute positions of the input tokens (on the compute device).
    starts: per sequence, tokens already in its KV cache before this pass (host ints,
        so backends need no device sync); this pass writes positions ``starts[b] .. starts[b]+L-1``.
    logits: which positions the LM head runs on.
    concurrent: other forwards over the same backend may run at the same time (decode
        micro-batches, in threads): a backend then hands out no native hook that reads state
        another forward may change meanwhile.
    """

    phase: Phase
    seq_ids: tuple[int, ...]
    positions: torch.Tensor
    starts: tuple[int, ...]
    logits: Logits = Logits.LAST
    concurrent: bool = False

    @property
    def num_tokens(self) -> int:
        """L: tokens per sequence in this pass."""
        return self.positions.shape[1]


class AttentionBackend(Protocol):
    """Stores k/v of the new tokens for ``layer`` and returns the attention output.

    Shapes: q ``[B, H, L, D]``, k and v ``[B, H_kv, L, D]``; returns ``[B, L, H, D]``.
    """

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor: ...

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor: ...

    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """L query tokens per sequence over its committed KV and, causally, over each other;
        their k/v are staged, not stored, until ``commit`` (speculative decoding)."""
        ...

    # Optional: ``native_decode(layer, batch, dtype)``, a decode layer's attention as a native
    # hook (kernels/hook.py's AttnHook, kernels/kvo_hook.h) that a fused layer calls inside its
    # own native call, with the same result as ``decode``; None (or no such method): ``decode``.
    # Optional with it: ``native_done(layer, batch)``, called after a hooked layer's native call
    # (what ``decode`` does after its attention: e.g. a tail block that filled becomes a block).
