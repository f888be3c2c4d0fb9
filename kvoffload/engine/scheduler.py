"""Decides what each engine step computes. Plans hold ids and ranges, never tensors."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvoffload.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class PrefillChunk:
    seq_id: int
    start: int        # first prompt position of the chunk
    end: int          # one past the last
    last: bool        # the chunk that ends the prompt: its last position is sampled


@dataclass(frozen=True)
class StepPlan:
    prefill: PrefillChunk | None
    decode: tuple[int, ...]          # sequences that generate one token each

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler:
    """FCFS; each step runs at most one prompt chunk plus one decode batch.

    ``kv_limit``: KV chunks the tier budgets hold in all (``None``: unbounded). A sequence is
    admitted only when its whole KV (``seq.kv_chunks``, prompt + ``max_tokens``) fits beside
    the admitted ones'; otherwise it waits in the queue (first come, first served), so a step
    never runs out of KV room.

    Prefix sharing: a sequence's ``kv_keys`` name its prompt's shareable whole chunks (the
    key of each one's last block; ``key_chunks`` KV chunks each, one per layer). A chunk named
    by an admitted sequence's key is held once however many admitted sequences name it (they
    share it): it is reserved by the first and released with the last (a reference count).

    ``on_admit(seq)``: called as a sequence is admitted, before its first prompt chunk is
    planned (the engine allocates its KV there, shares a live prefix and loads a stored one:
    ``seq.num_cached`` may move forward). ``after_admit()``: called at every schedule once the
    admission is decided (the engine releases sequences that finished in the last step, kept
    for the admitted one to share from; they stay in ``running``, FINISHED, until ``remove``,
    holding their reservation but no place in the batch).

    ``interleave``: decoding sequences keep generating while a new prompt is prefilled
    chunk by chunk (vLLM-style chunked prefill). ``prefill_first``: while a prompt is being
    prefilled the decode batch waits, so admitted sequences decode together (throughput).
    """

    def __init__(self, max_num_seqs: int, prefill_chunk: int, prefill_first: bool = True,
                 kv_limit: int | None = None, on_admit=None, key_chunks: int = 1, after_admit=None) -> None:
        self.max_num_seqs, self.prefill_chunk, self.prefill_first = max_num_seqs, prefill_chunk, prefill_first
        self.on_admit = on_admit               # called with a sequence as it is admitted, before its first chunk is planned
        self.after_admit = after_admit         # called once the step's admission is decided
        self.kv_limit = kv_limit
        self.kv_reserved = 0                   # chunks of the admitted sequences (a shared one once)
        self.key_chunks = key_chunks           # KV chunks a shared chunk key stands for
        self.key_refs: dict[bytes, int] = {}   # shared chunk key -> admitted sequences naming it
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admitted: PREFILLING, DECODING (FINISHED until removed)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The plan, and the sequences admitted by it (their KV must be allocated)."""
        admitted = []
        prefilling = next((s for s in self.running if s.status is SeqStatus.PREFILLING), None)
        active = sum(s.status is not SeqStatus.FINISHED for s in self.running)
        if prefilling is None and self.waiting and active < self.max_num_seqs and self._fits(self.waiting[0]):
            prefilling = self.waiting.popleft()
            prefilling.status = SeqStatus.PREFILLING
            self.running.append(prefilling)
            self.kv_reserved += self._cost(prefilling)
            for k in prefilling.kv_keys:
                self.key_refs[k] = self.key_refs.get(k, 0) + 1
            admitted.append(prefilling)
            if self.on_admit is not None:          # (its KV is allocated; a stored prefix may be loaded)
                self.on_admit(prefilling)
        if self.after_admit is not None:
            self.after_admit()
        chunk = None
        if prefilling is not None:
            start = prefilling.num_cached
            end = min(prefilling.prompt_len, start + self.prefill_chunk)
            chunk = PrefillChunk(prefilling.seq_id, start, end, end == prefilling.prompt_len)
        if chunk is not None and self.prefill_first:
            return StepPlan(chunk, ()), admitted
        decode = tuple(s.seq_id for s in self.running if s.status is SeqStatus.DECODING)
        return StepPlan(chunk, decode), admitted

    def _cost(self, seq: Sequence) -> int:
        """KV chunks admitting ``seq`` adds: its own, and its shared ones no admitted sequence holds."""
        held = sum(1 for k in seq.kv_keys if k in self.key_refs)
        return seq.kv_chunks - held * self.key_chunks

    def _fits(self, seq: Sequence) -> bool:
        return self.kv_limit is None or self.kv_reserved + self._cost(seq) <= self.kv_limit

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves (its KV reservation with it; a shared chunk's
        with its last user)."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_reserved -= seq.kv_chunks - len(seq.kv_keys) * self.key_chunks
            for k in seq.kv_keys:
                self.key_refs[k] -= 1
                if not self.key_refs[k]:
                    del self.key_refs[k]
                    self.kv_reserved -= self.key_chunks
        elif seq in self.waiting:
            self.waiting.remove(seq)
