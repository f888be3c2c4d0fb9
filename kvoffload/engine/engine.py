"""The engine loop: ``step() = update(execute(schedule()))``."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kvoffload.attention.backend import KVManager
from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.engine.scheduler import PrefillChunk, Scheduler, StepPlan
from kvoffload.engine.sequence import SeqStatus, Sequence, TokenLogprob
from kvoffload.errors import InputError
from kvoffload.kv.persist.prefix import PrefixStore
from kvoffload.kv.persist.store import chain_keys, namespace
from kvoffload.kv.sharing import LivePrefixes
from kvoffload.model.interface import AttentionBackend, ForwardBatch, Logits, Phase
from kvoffload.model.llama import Transformer
from kvoffload.sampling import make_generator, sample, token_logprobs


@dataclass(frozen=True)
class Executed:
    """What a step's forwards produced: ``logits`` ``[V]`` to sample, per sequence; ``tokens``:
    per sequence the tokens already chosen (speculation's accepted tokens and its last)."""

    logits: dict[int, torch.Tensor]
    tokens: dict[int, list[int]]


@dataclass(frozen=True)
class StepOutput:
    seq_id: int
    token: int
    text_delta: str
    finished: bool
    logprob: TokenLogprob | None = None       # when the request asked for logprobs


@dataclass
class StepTimes:
    """Cumulative wall time by phase of the step (for the per-token breakdown)."""

    schedule: float = 0.0
    prefill_forward: float = 0.0
    decode_forward: float = 0.0
    update: float = 0.0
    decode_steps: int = 0


class Engine:
    def __init__(self, model: Transformer, kv: KVManager, tokenizer: Any, config: EngineConfig,
                 device: torch.device, prefix: PrefixStore | None = None) -> None:
        self.model, self.kv, self.tokenizer, self.config, self.device = model, kv, tokenizer, config, device
        self.prefix = prefix              # the persistent KV store (None: every prompt is prefilled)
        # prefix sharing between live sequences (None: off), and the key chain's namespace
        self.live = LivePrefixes() if config.kv.prefix_sharing else None
        self._pinned: dict[int, list[bytes]] = {}   # seq -> its prompt's keys pinned in the store (admitted)
        self._finished: dict[int, Sequence] = {}    # finished in the last step, KV kept until the next admission
        self._ns = prefix.ns if prefix is not None else namespace("this process", kv.layout)
        self.kv_chunk_limit = self._kv_chunk_limit()
        self.scheduler = Scheduler(config.max_num_seqs, config.prefill_chunk, config.scheduling == "prefill-first",
                                   self.kv_chunk_limit, on_admit=self._admit, key_chunks=model.cfg.num_layers,
                                   after_admit=self._retire_finished)
        self.seqs: dict[int, Sequence] = {}
        self.times = StepTimes()
        self.driver: object | None = None    # the server loop that steps this engine (one at a time), if any
        self.prefill_kv: dict[str, dict[str, int]] = {}     # per tier, what its counters grew by in prompt forwards
        self.prefill_tokens = 0              # prompt tokens computed by prefill forwards
        self.shared_tokens = 0               # prompt tokens shared from live sequences instead
        self._next_id = 0
        self._context = model.cfg.max_position
        self._pool: ThreadPoolExecutor | None = None
        self.spec = None
        if config.spec.enabled:
            from kvoffload.speculative.speculator import SelfSpeculator

            self.spec = SelfSpeculator(model, kv, config, device)

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, int]:
        """The one-line :class:`InputError` ``add_request`` would raise, else the request's
        (KV capacity in tokens, KV chunks). Reads only the configuration: callable from any thread."""
        if not prompt_ids:
            raise InputError("empty prompt")
        if len(prompt_ids) >= self._context:
            raise InputError(f"prompt is {len(prompt_ids)} tokens; the model's context is {self._context} "
                             f"(at least one token must be left to generate)")
        bad = [t for t in prompt_ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (size {self.model.cfg.vocab_size})")
        if self.spec is not None and (params.logprobs is not None or params.prompt_logprobs is not None
                                      or params.penalized):
            raise InputError("logprobs and repetition penalties are not available with --speculate self "
                             "(speculation chooses tokens without the logits they would need)")
        for k in (params.logprobs, params.prompt_logprobs):
            if k is not None and k > self.model.cfg.vocab_size:
                raise InputError(f"{k} logprobs asked for; the vocabulary has {self.model.cfg.vocab_size} tokens")
        capacity = min(len(prompt_ids) + params.max_tokens, self._context)
        chunks = self.kv_chunks(capacity)
        if self.kv_chunk_limit is not None and chunks > self.kv_chunk_limit:
            raise InputError(f"this request does not fit in the KV tier budgets: it needs {chunks} KV chunks ({capacity} "
                             f"tokens: prompt + max_tokens) and they hold {self.kv_chunk_limit}; ask for fewer tokens "
                             f"or raise a budget")
        return capacity, chunks

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        capacity, chunks = self.check_request(prompt_ids, params)
        seq = Sequence(
            seq_id=self._next_id, prompt_ids=list(prompt_ids), params=params,
            capacity=capacity, stop_ids=self.tokenizer.eos_ids, detok=self.tokenizer.stream_decoder(),
            generator=make_generator(params, self.device), kv_chunks=chunks)
        self._next_id += 1
        if self.prefix is not None or self.live is not None:
            self._prefix_keys(seq)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def _prefix_keys(self, seq: Sequence) -> None:
        """The chain keys of the prompt's full blocks and, with prefix sharing, the keys the
        scheduler counts its shareable chunks by (the key of each whole chunk's last block, for
        the chunks before the block of the last prompt token, which is always computed)."""
        bs, cb = self.config.kv.block_size, self.config.kv.chunk_blocks
        seq.block_keys = chain_keys(self._ns, seq.prompt_ids, bs, seq.prompt_len // bs)
        if self.live is not None and self._shares(seq):
            whole = (seq.prompt_len - 1) // bs // cb
            seq.kv_keys = [seq.block_keys[(c + 1) * cb - 1] for c in range(whole)]

    @staticmethod
    def _shares(seq: Sequence) -> bool:
        """Whether the sequence may start after a prefix it did not prefill (prompt logprobs
        need every prompt position's logits)."""
        return seq.params.prompt_logprobs is None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step_until_prefilled(self, seq_ids) -> None:
        """Step until none of ``seq_ids`` waits or prefills: every prompt is in the cache (its
        sequence decoding, or finished). What a decode measurement runs, untimed, before it times."""
        while any(self.seqs[s].status in (SeqStatus.WAITING, SeqStatus.PREFILLING) for s in seq_ids):
            self.step()

    def kv_chunks(self, tokens: int) -> int:
        """KV chunks (one tier's unit of placement) a sequence of ``tokens`` tokens takes at most."""
        kv = self.config.kv
        blocks = math.ceil(max(tokens, 1) / kv.block_size)
        return self.model.cfg.num_layers * math.ceil(blocks / kv.chunk_blocks)

    def _kv_chunk_limit(self) -> int | None:
        """Chunks the KV tier budgets hold in all; ``None`` when one is unbounded (the in-memory
        store, an unlimited tier, a disk tier sized by its free space)."""
        from kvoffload.kv.tiers.protocol import TierSpec, chunk_capacity

        kv = self.config.kv
        if not kv.tiered:
            return None
        lay = self.kv.layout                                   # the blocks' (compressed, if they are)
        total = 0
        for name, budget in kv.tier_list(self.device.type):
            cap = chunk_capacity(TierSpec(name, budget), kv.chunk_blocks * (lay.disk_stride if name == "disk" else lay.slot_bytes))
            if cap is None:
                return None
            total += cap
        return total

    def abort(self, seq_ids) -> None:
        """Drop these requests, finished or not: out of the queues, their KV freed (a failed
        ``generate`` leaves the engine as it found it)."""
        for sid in seq_ids:
            seq = self.seqs.pop(sid, None)
            finished = self._finished.pop(sid, None)        # (kept for sharing; maybe popped already)
            seq = seq or finished
            if seq is None:
                continue
            self.scheduler.remove(seq)
            self._release(seq)
            for free in (self.kv.free, self.spec.free if self.spec is not None else None):
                if free is not None:
                    try:
                        free(sid)
                    except Exception:       # noqa: BLE001 - a store that failed (a dead worker) has nothing to free
                        pass

    def pop_finished(self, seq_id: int) -> Sequence:
        return self.seqs.pop(seq_id)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Teacher-forced ``[T, V]`` logits of a token sequence (perplexity, agreement checks).

        Runs the same chunked prefill as generation, with the LM head on every position.
        """
        chunk = chunk or self.config.prefill_chunk
        sid = -1 - self._next_id           # private id, never handed out by add_request
        self.kv.allocate(sid, len(token_ids))
        try:
            return torch.cat([self._prefill(sid, token_ids[s:s + chunk], s, Logits.ALL)[0]      # [L, V]
                              for s in range(0, len(token_ids), chunk)])
        finally:
            self.kv.free(sid)

    @torch.inference_mode()
    def teacher_forced_logits(self, token_ids: list[int], prefill_len: int) -> torch.Tensor:
        """``[T - P, V]`` logits of ``token_ids`` (length T) through the decode path.

        The first ``P = prefill_len`` tokens are prefilled (chunked, as for a prompt); the
        others are then fed one at a time as decode steps, so attention policies that act at
        decode are exercised. Row ``i`` predicts token ``P + i`` (it has seen ``token_ids[:P + i]``).
        """
        T = len(token_ids)
        if not 1 <= prefill_len < T:
            raise InputError(f"prefill_len must be in [1, {T - 1}], got {prefill_len}")
        if T > self._context:
            raise InputError(f"{T} tokens exceed the model's context of {self._context}")
        chunk = self.config.prefill_chunk
        sid = -1 - self._next_id           # private id, never handed out by add_request
        self.kv.allocate(sid, T)
        try:
            rows = []
            for s in range(0, prefill_len, chunk):
                e = min(s + chunk, prefill_len)
                out = self._prefill(sid, token_ids[s:e], s, Logits.LAST if e == prefill_len else Logits.NONE)
            rows.append(out[0])                                                               # [V]
            for pos in range(prefill_len, T - 1):
                tokens = torch.tensor([[token_ids[pos]]], device=self.device)                # [1, 1]
                positions = torch.tensor([[pos]], device=self.device)                        # [1, 1]
                out = self.model(tokens, ForwardBatch(Phase.DECODE, (sid,), positions, (pos,)), self.kv)   # [1, V]
                rows.append(out[0])
            return torch.stack(rows)                                                          # [T - P, V]
        finally:
            self.kv.free(sid)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        plan, _ = self.scheduler.schedule()           # admitted sequences went through _admit
        t1 = time.perf_counter()
        executed = self.execute(plan)
        t2 = time.perf_counter()
        out = self.update(plan, executed)
        self.times.schedule += t1 - t0
        self.times.update += time.perf_counter() - t2
        return out

    # ------------------------------------------------------------------ prefixes: shared and stored
    @torch.inference_mode()
    def _admit(self, seq: Sequence) -> None:
        """A sequence is admitted: its KV is allocated; the leading blocks of its prompt that a
        live sequence holds are shared from it, the ones after them found in the persistent
        store are loaded, and its prefill starts after them (at least the last prompt token is
        always computed: its logits choose the first token). No sequence is being prefilled
        now (the scheduler admits one at a time), so every live one holds its whole prompt."""
        self.kv.allocate(seq.seq_id, seq.capacity)
        if self.spec is not None:
            self.spec.allocate(seq.seq_id, seq.capacity)
        if self.prefix is not None and seq.block_keys:
            self._pinned[seq.seq_id] = seq.block_keys
            self.prefix.pin(seq.block_keys)
        if not seq.block_keys or not self._shares(seq):
            return
        bs = self.kv.layout.block_size
        limit = (seq.prompt_len - 1) // bs
        n = 0
        if self.live is not None:
            source, n = self.live.longest(seq.block_keys[:limit])
            if n:
                self.kv.share_prefix(seq.seq_id, source, n)
                seq.shared_tokens = n * bs
                self.shared_tokens += n * bs
                holder = self.seqs.get(source) or self._finished[source]
                seq.stored_blocks = min(n, holder.stored_blocks)
        if self.prefix is not None and n < limit:
            into = getattr(self.kv, "slot_buffer", None)              # (read straight into the KV's memory)
            got = self.prefix.load(seq.block_keys[n:limit],
                                   lambda i, slots, first=n: self.kv.load_slots(seq.seq_id, first + i, slots),
                                   into=None if into is None else into(seq.seq_id, n, limit - n))
            if got:
                seq.reused_tokens = got * bs
                n += got
                seq.stored_blocks = n
        seq.num_cached = n * bs
        if self.live is not None:
            self.live.add(seq.seq_id, seq.block_keys[:n])
        if n and self.spec is not None:       # the draft's policy metadata, from the prefix it holds
            self.spec.reseed(seq.seq_id, seq.capacity, seq.num_cached)

    def _store_prompt(self, seq: Sequence, end: int) -> None:
        """Keep the prompt's full blocks below position ``end`` that are not in the store yet."""
        full = min(end // self.kv.layout.block_size, len(seq.block_keys))
        first = seq.stored_blocks
        if full <= first:
            return
        first += self.prefix.missing(seq.block_keys[first:full])
        if first < full:                      # (queued: written behind the model, PrefixStore.save)
            self.prefix.save(seq.prompt_ids, seq.block_keys, first, self.kv.read_slots(seq.seq_id, first, full - first))
        seq.stored_blocks = full

    def _retire(self, seq: Sequence) -> None:
        """A finished sequence leaves: its reservation, its blocks (shared ones with their last user)."""
        self.scheduler.remove(seq)
        self._release(seq)
        self.kv.free(seq.seq_id)

    def _retire_finished(self) -> None:
        """After an admission (the scheduler's hook): the sequences that finished in the last step
        leave. They were kept until now so that the sequence admitted next could share their
        prompt's blocks (a request that ends at its first token — max_tokens 1, an end-of-text —
        finishes in its own prefill step, before the next one is admitted)."""
        for seq in list(self._finished.values()):
            del self._finished[seq.seq_id]
            self._retire(seq)

    def _release(self, seq: Sequence) -> None:
        """The sequence is done with its prompt's blocks: no longer offered to others, and the
        stored ones may be evicted (the store's budget is kept now)."""
        if self.live is not None:
            self.live.remove(seq.seq_id)
        pinned = self._pinned.pop(seq.seq_id, None)
        if pinned:
            self.prefix.unpin(pinned)
            self.prefix.enforce_budget()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Executed:
        """Forward passes of the plan -> logits to sample, or tokens already chosen."""
        logits: dict[int, torch.Tensor] = {}
        tokens: dict[int, list[int]] = {}
        if plan.prefill is not None:
            logits.update(self._prompt_chunk(plan.prefill))
        if plan.decode:
            t0 = time.perf_counter()
            if self.spec is None:
                logits.update(self._decode_batch(plan.decode))
            else:
                tokens = self._speculate(plan.decode)
            self.times.decode_forward += time.perf_counter() - t0
            self.times.decode_steps += 1
        return Executed(logits, tokens)

    def _prompt_chunk(self, c: PrefillChunk) -> dict[int, torch.Tensor]:
        """One prompt chunk -> the ``[V]`` logits of its last position if it ends the prompt."""
        t0 = time.perf_counter()
        seq = self.seqs[c.seq_id]
        before = self._kv_counters()
        want = seq.params.prompt_logprobs
        mode = Logits.ALL if want is not None else Logits.LAST if c.last else Logits.NONE
        out = self._prefill(c.seq_id, seq.prompt_ids[c.start:c.end], c.start, mode,
                            self.kv if self.spec is None else self.spec.tap)
        if want is not None:
            rows = out[0]                                                             # [L, V]
            if c.start == 0:
                seq.prompt_logprobs.append(None)              # nothing predicts the first token
            n = min(c.end, seq.prompt_len - 1) - c.start      # rows that predict a prompt token
            if n > 0:
                targets = torch.tensor(seq.prompt_ids[c.start + 1:c.start + 1 + n])
                picked, top = token_logprobs(rows[:n], targets, want)
                seq.prompt_logprobs += [TokenLogprob(t, lp, tuple(k)) for t, lp, k in
                                        zip(targets.tolist(), picked, top)]
            out = rows[-1:]                                                           # [1, V]: the last position
        for tier, counts in self._kv_counters().items():       # the prefill's share of the KV report
            acc = self.prefill_kv.setdefault(tier, dict.fromkeys(counts, 0))
            for k, v in counts.items():
                acc[k] += v - before.get(tier, {}).get(k, 0)
        self.prefill_tokens += c.end - c.start
        if self.prefix is not None and seq.block_keys:
            self._store_prompt(seq, c.end)
        if self.live is not None and seq.block_keys:          # its blocks so far, offered to others
            self.live.add(c.seq_id, seq.block_keys[:c.end // self.kv.layout.block_size])
        if c.last and self.spec is not None:
            self.spec.prefilled(c.seq_id, c.end)
        dt = time.perf_counter() - t0
        seq.times.prefill_s += dt
        self.times.prefill_forward += dt
        return {c.seq_id: out[0]} if c.last else {}

    def _kv_counters(self) -> dict[str, dict[str, int]]:
        return {t: dict(vars(c)) for t, c in self.kv.stats().tiers.items()}

    def _decode_batch(self, seq_ids: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """One decode step of the batch -> ``[V]`` logits per sequence."""
        n = min(self.config.decode_microbatches, len(seq_ids))
        groups = [seq_ids[i::n] for i in range(n)]
        if n == 1:
            outs = [self._decode(groups[0])]
        else:       # one forward per micro-batch, in threads: one's attention waits on the KV
            if self._pool is None:        # workers while another computes (Lamina's rotation)
                self._pool = ThreadPoolExecutor(self.config.decode_microbatches, thread_name_prefix="microbatch")
            outs = list(self._pool.map(lambda g: self._decode(g, concurrent=True), groups))
        return {sid: out[i] for group, out in zip(groups, outs) for i, sid in enumerate(group)}

    def _speculate(self, seq_ids: tuple[int, ...]) -> dict[int, list[int]]:
        """One speculation round over the decode batch -> its tokens per sequence."""
        seqs = [self.seqs[i] for i in seq_ids]
        room = min(s.capacity - s.num_cached for s in seqs)
        out = self.spec.round(seq_ids, [s.last_token for s in seqs], [s.num_cached for s in seqs], room,
                              [s.params for s in seqs], [s.generator for s in seqs])
        return dict(zip(seq_ids, out))

    @torch.inference_mode()
    def _decode(self, seq_ids: tuple[int, ...], concurrent: bool = False) -> torch.Tensor:
        """One decode forward over these sequences -> ``[B, V]`` logits (``concurrent``: other
        micro-batches' forwards run meanwhile)."""
        seqs = [self.seqs[i] for i in seq_ids]
        starts = tuple(s.num_cached for s in seqs)
        tokens = torch.tensor([[s.last_token] for s in seqs], device=self.device)        # [B, 1]
        positions = torch.tensor(starts, device=self.device)[:, None]                   # [B, 1]
        return self.model(tokens, ForwardBatch(Phase.DECODE, seq_ids, positions, starts, concurrent=concurrent),
                          self.kv)

    def _prefill(self, seq_id: int, token_ids: list[int], start: int, logits: Logits,
                 backend: AttentionBackend | None = None) -> torch.Tensor | None:
        """One prompt chunk of one sequence, written to its KV at ``start``."""
        end = start + len(token_ids)
        tokens = torch.tensor([token_ids], device=self.device)                               # [1, L]
        positions = torch.arange(start, end, device=self.device)[None]                        # [1, L]
        return self.model(tokens, ForwardBatch(Phase.PREFILL, (seq_id,), positions, (start,), logits),
                          backend or self.kv)

    def update(self, plan: StepPlan, executed: Executed) -> list[StepOutput]:
        """Advance the sequences: KV lengths, then their new tokens (sampled here, or chosen by
        speculation); one output per token."""
        if plan.prefill is not None:
            self.seqs[plan.prefill.seq_id].num_cached = plan.prefill.end
        for sid in plan.decode:       # speculation committed the last token and the accepted drafts
            self.seqs[sid].num_cached += len(executed.tokens.get(sid, (0,)))
        chosen = dict(executed.tokens)
        logprobs: dict[int, TokenLogprob] = {}
        if executed.logits:
            seqs = [self.seqs[i] for i in executed.logits]
            logits = torch.stack(list(executed.logits.values()))                     # [B, V]
            sampled = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                             [(s.prompt_ids, s.output_ids) for s in seqs])
            chosen.update((s.seq_id, [t]) for s, t in zip(seqs, sampled))
            for i, (s, t) in enumerate(zip(seqs, sampled)):
                if s.params.logprobs is not None:
                    picked, top = token_logprobs(logits[i:i + 1], torch.tensor([t]), s.params.logprobs)
                    logprobs[s.seq_id] = TokenLogprob(t, picked[0], tuple(top[0]))
        now = time.perf_counter()
        outputs = []
        for sid, toks in chosen.items():
            seq = self.seqs[sid]
            if seq.status is SeqStatus.PREFILLING:
                seq.status = SeqStatus.DECODING
                seq.times.first_token = now
            for tok in toks:
                lp = logprobs.get(sid)
                if lp is not None:
                    seq.logprobs.append(lp)
                seq.append(tok)
                if seq.finish_reason is not None:
                    seq.finish()
                    if self.prefix is not None:       # a request ends with its prompt's blocks stored
                        self.prefix.flush()
                    if self.spec is not None:
                        self.spec.free(sid)
                    if self.live is not None and self.scheduler.waiting:
                        self._finished[sid] = seq      # its blocks may be shared by the next one admitted
                    else:
                        self._retire(seq)
                outputs.append(StepOutput(sid, tok, seq.take_delta(), seq.finish_reason is not None, lp))
                if seq.finish_reason is not None:
                    break
        return outputs
