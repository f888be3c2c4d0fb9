"""One round of self-speculative decoding for a batch of sequences:

1. **draft** — gamma decode steps of the target model over its draft cache (fast memory);
2. **verify** — one forward of the target over the full KV (``Phase.VERIFY``): the last token
   and the gamma drafts as an L-token query block per sequence, every sequence at once;
3. **accept** — speculative sampling per sequence (:func:`kvoffload.sampling.speculative_accept`);
4. **commit** — the target's store keeps the accepted tokens' k/v and rolls back the rest
   (``kv.commit``); the draft cache and its policy's metadata get the same exact k/v;
5. **rebuild** — a draft cache gone stale (its window full, every N rounds, or acceptance below
   a threshold, per :class:`~kvoffload.config.SpecConfig`) is chosen again from the full KV.

The model sees the target's store through :class:`TargetTap`, which passes every call on and
keeps what the draft side needs (the k/v and queries of the pass).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from kvoffload.attention.backend import KVManager
from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.sampling import draft_token, speculative_accept
from kvoffload.sparse import policy_class
from kvoffload.speculative.draft import DraftCache


class TargetTap:
    """The target's store as the model sees it while speculating. Prefill chunks feed the
    draft policy's metadata and leave each layer's last query (a rebuild's scoring query); a
    verify pass leaves its k/v and queries, per layer, for the commit that follows."""

    def __init__(self, kv: KVManager, draft: DraftCache) -> None:
        self.kv, self.draft = kv, draft
        L = draft.model.num_layers
        self.last_q: dict[int, list[torch.Tensor | None]] = {}      # seq -> per layer [H, D]
        self.k: list[torch.Tensor | None] = [None] * L               # per layer [B, H_kv, L, D]
        self.v: list[torch.Tensor | None] = [None] * L
        self.q: list[torch.Tensor | None] = [None] * L               # per layer [B, H, L, D]

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        o = self.kv.prefill(layer, q, k, v, batch)
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            self.draft.policy.append(layer, sid, start, k[b], v[b])
            self.last_q.setdefault(sid, [None] * len(self.k))[layer] = q[b, :, -1].clone()
        return o

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise RuntimeError("speculative decoding verifies; it never decodes one token on the target")

    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        o = self.kv.verify(layer, q, k, v, batch)
        self.k[layer], self.v[layer], self.q[layer] = k, v, q
        return o


@dataclass
class SpecStats:
    """Cumulative over every sequence's rounds."""

    rounds: int = 0              # verifications (one per sequence per round)
    drafted: int = 0             # draft tokens proposed
    accepted: int = 0            # of which accepted
    emitted: int = 0             # tokens produced (accepted + one per verification)
    rebuilds: dict[str, int] = field(default_factory=lambda: {"start": 0, "window": 0, "interval": 0, "acceptance": 0})
    draft_s: float = 0.0
    verify_s: float = 0.0
    rebuild_s: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verification."""
        return self.accepted / max(1, self.rounds)

    def line(self) -> str:
        r = ", ".join(f"{k} {v}" for k, v in self.rebuilds.items() if v)
        return (f"speculation: {self.rounds} verifications, acceptance {100 * self.acceptance:.1f}%, "
                f"{self.mean_accepted:.2f} draft tokens accepted per verification "
                f"({self.emitted / max(1, self.rounds):.2f} tokens each); time draft {self.draft_s:.2f}s, "
                f"verify {self.verify_s:.2f}s, rebuild {self.rebuild_s:.2f}s; rebuilds: {r or 'none'}")


@dataclass
class _Track:
    rounds_since: int = 0
    recent: deque = field(default_factory=deque)      # acceptance of recent rounds


class SelfSpeculator:
    def __init__(self, model: Any, kv: KVManager, config: EngineConfig, device: torch.device) -> None:
        """The draft cache takes the target store's KV dtype and the model's activation dtype."""
        self.model, self.kv, self.spec, self.device = model, kv, config.spec, device
        model_cfg, kv_dtype, act_dtype = model.cfg, kv.kv_dtype, model.norm.weight.dtype
        # the draft policy takes its parameters from the --sparse-* flags; no layer stays dense
        # (every layer of the draft cache holds the same tokens count); its budget is the spec's
        scfg = dataclasses.replace(config.sparse, sparse_policy=config.spec.spec_draft_policy, sparse_dense_layers=())
        policy = policy_class(scfg.sparse_policy)(scfg, model_cfg, config.kv.block_size, device)
        self.draft = DraftCache(model_cfg, config.spec, policy, device, kv_dtype, act_dtype, config.kv.block_size)
        self.tap = TargetTap(kv, self.draft)
        self.stats = SpecStats()
        self.track: dict[int, _Track] = {}

    # ---- sequence lifecycle ----
    def allocate(self, seq_id: int, capacity: int) -> None:
        self.draft.allocate(seq_id, capacity)
        self.track[seq_id] = _Track()

    def free(self, seq_id: int) -> None:
        self.draft.free(seq_id)
        self.tap.last_q.pop(seq_id, None)
        self.track.pop(seq_id, None)

    def reseed(self, seq_id: int, capacity: int, length: int) -> None:
        """Start the sequence's draft side again from the target store's first ``length``
        tokens (after the store was truncated to them): its policy metadata is read back
        (``gather``); the next :meth:`prefilled` chooses its draft cache."""
        self.free(seq_id)
        self.allocate(seq_id, capacity)
        if length == 0:
            return
        cfg = self.draft.model
        index = torch.arange(length).expand(cfg.num_layers, cfg.num_kv_heads, length)
        k, v = self.kv.gather(seq_id, index)                                              # [layers, H_kv, T, D]
        for layer in range(cfg.num_layers):
            self.draft.policy.append(layer, seq_id, 0, k[layer], v[layer])

    def prefilled(self, seq_id: int, length: int) -> None:
        """The prompt is in the target's store: choose the first draft cache."""
        self._rebuild(seq_id, length, self.tap.last_q.pop(seq_id), "start")

    def _rebuild(self, seq_id: int, length: int, q: list[torch.Tensor], why: str) -> None:
        t0 = time.perf_counter()
        self.draft.rebuild(seq_id, length, q, self.kv)
        self.track[seq_id] = _Track()
        self.stats.rebuilds[why] += 1
        self.stats.rebuild_s += time.perf_counter() - t0

    # ---- one round ----
    @torch.inference_mode()
    def round(self, seq_ids: tuple[int, ...], last: list[int], cached: list[int], room: int,
              params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[list[int]]:
        """Sequences ``seq_ids`` with ``cached`` tokens in their KV and ``last`` (sampled, not yet
        in the KV) -> per sequence the tokens it gets this round (1 .. gamma+1). ``room``: KV
        slots every sequence still has past ``cached`` (gamma is cut to fit)."""
        B = len(seq_ids)
        g = max(0, min(self.spec.num_speculative_tokens, room - 1))
        t0 = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in range(B)]
        probs: list[list[torch.Tensor | None]] = [[] for _ in range(B)]
        cur = list(last)
        slots = [self.draft.slot(sid) for sid in seq_ids]
        for i in range(g):
            tokens = torch.tensor(cur, device=self.device)[:, None]                           # [B, 1]
            positions = torch.tensor([c + i for c in cached], device=self.device)[:, None]    # [B, 1]
            batch = ForwardBatch(Phase.DECODE, seq_ids, positions, tuple(s + i for s in slots))
            logits = self.model(tokens, batch, self.draft.store)                             # [B, V]
            for b in range(B):
                tok, q = draft_token(logits[b], params[b], generators[b])
                drafts[b].append(tok)
                probs[b].append(q)
                cur[b] = tok
        t1 = time.perf_counter()
        L = g + 1
        tokens = torch.tensor([[last[b], *drafts[b]] for b in range(B)], device=self.device)  # [B, L]
        positions = torch.tensor(cached, device=self.device)[:, None] + torch.arange(L, device=self.device)
        logits = self.model(tokens, ForwardBatch(Phase.VERIFY, seq_ids, positions, tuple(cached), Logits.ALL),
                            self.tap)                                                         # [B, L, V]
        t2 = time.perf_counter()
        out = []
        for b, sid in enumerate(seq_ids):
            toks = speculative_accept(logits[b], drafts[b], probs[b], params[b], generators[b])
            n = len(toks)                        # the last token and the n - 1 accepted drafts stay
            self._commit(b, sid, n)
            self._account(sid, g, n - 1)
            self._maybe_rebuild(b, sid, cached[b] + n, n)
            out.append(toks)
        self.stats.draft_s += t1 - t0
        self.stats.verify_s += t2 - t1
        return out

    def _commit(self, b: int, sid: int, n: int) -> None:
        self.kv.commit(sid, n)
        k = torch.stack([x[b, :, :n] for x in self.tap.k])                                  # [layers, H_kv, n, D]
        v = torch.stack([x[b, :, :n] for x in self.tap.v])
        start = self.draft.seqs[sid].length
        for layer in range(len(self.tap.k)):
            self.draft.policy.append(layer, sid, start, k[layer], v[layer])
        self.draft.append(sid, k, v)

    def _account(self, sid: int, drafted: int, accepted: int) -> None:
        s = self.stats
        s.rounds += 1
        s.drafted += drafted
        s.accepted += accepted
        s.emitted += accepted + 1
        t = self.track[sid]
        t.rounds_since += 1
        if drafted:
            t.recent.append(accepted / drafted)
            while len(t.recent) > self.spec.spec_rebuild_rounds:
                t.recent.popleft()

    def _maybe_rebuild(self, b: int, sid: int, length: int, n: int) -> None:
        spec, t = self.spec, self.track[sid]
        why = None
        if self.draft.full(sid):
            why = "window"
        elif spec.spec_rebuild_interval and t.rounds_since >= spec.spec_rebuild_interval:
            why = "interval"
        elif (spec.spec_rebuild_acceptance and len(t.recent) >= spec.spec_rebuild_rounds
              and sum(t.recent) / len(t.recent) < spec.spec_rebuild_acceptance):
            why = "acceptance"
        if why is not None:                      # scored with the newest committed token's query
            self._rebuild(sid, length, [q[b, :, n - 1] for q in self.tap.q], why)
