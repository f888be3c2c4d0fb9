"""One request's state: tokens, KV progress, text, stop detection, timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvoffload.config import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"        # not yet admitted (no KV allocated)
    PREFILLING = "prefilling"  # admitted, prompt partly in the KV cache
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``k`` most likely (token, log-prob)
    at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SeqTimes:
    arrival: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0            # time in forwards that prefilled this sequence
    first_token: float | None = None
    finish: float | None = None

    @property
    def decode_s(self) -> float:
        if self.first_token is None or self.finish is None:
            return 0.0
        return self.finish - self.first_token


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    capacity: int                      # KV slots: prompt + max new tokens, capped at the context
    stop_ids: frozenset[int]
    detok: object                      # StreamDecoder
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int = 0                # tokens whose KV is in the cache
    text: str = ""
    emitted: int = 0                   # chars of `text` already streamed
    finish_reason: str | None = None
    times: SeqTimes = field(default_factory=SeqTimes)
    kv_chunks: int = 0                 # KV chunks reserved for it while admitted (tier budgets)
    logprobs: list[TokenLogprob] = field(default_factory=list)           # per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token; the first None
    block_keys: list[bytes] = field(default_factory=list)   # persistent store: chain keys of the prompt's full blocks
    stored_blocks: int = 0             # of them, those known to be in the store (loaded or written)
    reused_tokens: int = 0             # prompt tokens whose KV came from the store (not prefilled)
    shared_tokens: int = 0             # prompt tokens whose KV was shared from a live sequence (not prefilled)
    kv_keys: list[bytes] = field(default_factory=list)      # prefix sharing: its shareable chunks' keys (scheduler)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token: int) -> None:
        """Record a sampled token; set ``finish_reason`` when a stop condition holds."""
        self.output_ids.append(token)
        if token in self.stop_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.text += self.detok.push(token)
        if self.params.stop and self._cut_at_stop_string():
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens or self.prompt_len + len(self.output_ids) >= self.capacity:
            self.finish_reason = "length"

    def _cut_at_stop_string(self) -> bool:
        longest = max(len(s) for s in self.params.stop)
        window_start = max(0, self.emitted - longest)
        hits = [i for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def finish(self) -> None:
        if self.finish_reason != "stop" or not self.params.stop:
            self.text += self.detok.flush()
        self.status = SeqStatus.FINISHED
        self.times.finish = time.perf_counter()

    def take_delta(self) -> str:
        """Text not yet streamed; near a possible stop string, hold back until it is decided."""
        hold = 0 if self.status is SeqStatus.FINISHED or not self.params.stop else \
            max(len(s) for s in self.params.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta
