"""The KV manager: what the engine, speculation and the API hold — the attention backend the
model calls (prefill / decode / verify, in model/interface.py) plus the lifetime of each
sequence's KV, speculation's commit / rollback, reading KV back, statistics and cleanup.
Both backends (contiguous in memory, tiered) implement all of it; nobody probes for methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.protocol import TierCounters
from kvoffload.model.interface import AttentionBackend
from kvoffload.sparse.base import SparseCounters

MiB = 2**20


@dataclass
class KVStats:
    """tiers: per tier (and ``tails``, the write-combining buffers) its cumulative byte
    counters; held: bytes each holds now; decode_tokens: tokens generated (one per sequence per
    decode step, accepted tokens when speculating); sparse: what sparse decode steps read
    (``None`` without a policy); pids: processes that hold KV (disk workers), for memory
    accounting; media: per tier what its bytes live on ("memory", "disk")."""

    tiers: dict[str, TierCounters] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    decode_tokens: int = 0
    sparse: SparseCounters | None = None
    pids: list[int] = field(default_factory=list)
    media: dict[str, str] = field(default_factory=dict)

    def read_by_medium(self) -> dict[str, int]:
        """Bytes read so far, summed by what the tiers' bytes live on ("memory", "disk", ...)."""
        out: dict[str, int] = {}
        for name, c in self.tiers.items():
            m = self.media.get(name, "memory")
            out[m] = out.get(m, 0) + c.read
        return out

    def per_token(self) -> dict[str, dict[str, float]]:
        n = max(1, self.decode_tokens)
        return {t: {k: v / n for k, v in vars(c).items()} for t, c in self.tiers.items()}

    def ahead_rate(self) -> dict[str, float]:
        """Per tier that read ahead: the share of the blocks it attended that were already read."""
        return {t: c.ahead / c.blocks for t, c in self.tiers.items() if c.ahead and c.blocks}

    def cached_rate(self) -> dict[str, float]:
        """Per tier with a block cache: the share of the blocks it attended found there."""
        return {t: c.cached / c.blocks for t, c in self.tiers.items() if c.cached and c.blocks}


def sparse_line(policy_name: str, budget: str, st: SparseCounters) -> str | None:
    if not st.steps:
        return None
    return (f"sparse {policy_name} at {budget}: attended {100 * st.attended / st.context:.1f}% of the KV of its "
            f"layers, read {100 * st.read_fraction:.1f}% (block-granular; amplification {st.amplification:.2f})")


def _traffic(per: dict[str, dict[str, float]]) -> str:
    reads = ", ".join(f"{t} {c['read'] / MiB:.2f}" for t, c in per.items())
    crossed = ", ".join(f"{t} {(c['to_worker'] + c['from_worker']) / 1024:.1f}" for t, c in per.items()
                        if c["to_worker"] or c["from_worker"])
    written = ", ".join(f"{t} {c['written'] / MiB:.3f}" for t, c in per.items() if t != "tails")
    return f"read MiB {reads}; q/o KiB to/from workers {crossed or 'none'}; blocks written MiB {written}"


def tier_line(stats: KVStats, prefill: dict[str, dict[str, int]] | None = None, prefill_tokens: int = 0) -> str:
    """What the tiers moved per generated token; with ``prefill`` (per tier, the counters'
    growth during the prompts' forwards), a line for the prefill (in total) first, and the
    decode's per generated token without it."""
    held = ", ".join(f"{t} {b / MiB:.1f}" for t, b in stats.held.items())
    ahead = "".join(f"; {t} blocks read ahead {100 * r:.0f}%" for t, r in stats.ahead_rate().items())
    ahead += "".join(f"; {t} blocks from its cache {100 * r:.0f}%" for t, r in stats.cached_rate().items())
    if prefill is None:
        return f"KV per generated token: {_traffic(stats.per_token())}; held now MiB {held}{ahead}"
    n = max(1, stats.decode_tokens)
    zero = dict.fromkeys(vars(TierCounters()), 0)
    pre = {t: {k: prefill.get(t, zero).get(k, 0) for k in zero} for t in stats.tiers}
    dec = {t: {k: (v - pre[t][k]) / n for k, v in vars(c).items()} for t, c in stats.tiers.items()}
    return (f"KV in prefill ({prefill_tokens} prompt tokens, in total): {_traffic(pre)}\n"
            f"KV per generated token (decode): {_traffic(dec)}; held now MiB {held}{ahead}")


class KVManager(AttentionBackend, Protocol):
    """An attention backend that owns each sequence's KV."""

    kv_dtype: torch.dtype           # what k/v are written in (a compressed KV: the compute dtype)
    layout: BlockLayout             # its blocks' layout (compressed for --kv-dtype int8 / int4): the slot format of read_slots / load_slots

    def allocate(self, seq_id: int, capacity: int) -> None:
        """Room for a sequence of up to ``capacity`` tokens."""
        ...

    def free(self, seq_id: int) -> None:
        """Release the sequence's KV (and its policy metadata)."""
        ...

    def commit(self, seq_id: int, n: int) -> None:
        """Keep the first ``n`` tokens of the sequence's last verify pass; roll back the rest."""
        ...

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens."""
        ...

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``."""
        ...

    def read_slots(self, seq_id: int, first: int, n: int) -> torch.Tensor:
        """``[layers, n, slot_elems]``: the sequence's full blocks ``first ..`` in the slot
        format of kv/layout.py (exact bytes, KV dtype)."""
        ...

    # Optional: ``slot_buffer(seq_id, first, n)``, a writable view ``[layers, n, slot_elems]`` of
    # where blocks ``first ..`` will live (None: not contiguous there), which the persistent
    # store fills directly before ``load_slots`` is handed that view.

    def load_slots(self, seq_id: int, first: int, slots: torch.Tensor) -> None:
        """Blocks ``[layers, n, slot_elems]`` become the sequence's blocks ``first ..`` (it holds
        exactly ``first`` full blocks and no partial one), as if its prefill had written them."""
        ...

    def share_prefix(self, seq_id: int, source: int, blocks: int) -> None:
        """The first ``blocks`` full blocks of live sequence ``source`` become those of ``seq_id``
        (allocated, holding nothing yet), as if its prefill had written them (prefix sharing:
        referenced where the store has block tables, else copied)."""
        ...

    def stats(self) -> KVStats: ...

    def report(self) -> list[str]:
        """Human-readable lines on what the KV cost (reads, memory, sparse reads); may be empty."""
        ...

    def close(self) -> None:
        """Stop workers and remove files now (also done at exit)."""
        ...
