"""The engines a benchmark can run: kvoffload itself, HF transformers and llama.cpp.

Each runner takes token-id prompts (the same ids for every engine: all of them read the
same GGUF and its vocabulary) and returns a :class:`Sample` (tokens/s, and for prefill tests
the time to the first token) for one :class:`BenchTest`. A peer that
cannot be loaded raises :class:`PeerUnavailable` with the reason, reported as "skipped".

For a decode test, ``start`` prefills the prompts once (untimed) and returns a
:class:`Decoding` whose every ``round`` decodes the test's n tokens a sequence more on the same
context, timed: the rounds of several engines can then alternate seconds apart (``kvoffload
bench --prefill-once``).
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import torch

from kvoffload.bench.workloads import BenchTest, Sample
from kvoffload.engine.sequence import SeqStatus


class PeerUnavailable(Exception):
    """The peer is not installed or cannot load the model; the message says why."""


class Decoding(Protocol):
    """Prompts prefilled once, decoded round by round."""

    def round(self) -> Sample: ...      # the test's n tokens a sequence more, timed

    def close(self) -> None: ...        # the sequences' state released


def _one_round(dec: Decoding) -> Sample:
    """A decode test's one repetition: the round after an untimed prefill, then the state freed."""
    try:
        return dec.round()
    finally:
        dec.close()


class Runner(Protocol):
    name: str
    label: str          # how it runs batches, e.g. "sequential" for llama.cpp

    def run(self, test: BenchTest, prompts: list[list[int]]) -> Sample: ...

    def start(self, test: BenchTest, prompts: list[list[int]], rounds: int) -> Decoding: ...


class Ours:
    label = "batched"

    def __init__(self, name: str, model: str | None, threads: int, **engine_kw) -> None:
        from kvoffload.api import LLM

        self.name = name
        self.llm = LLM(model, threads=threads, **engine_kw)

    def run(self, test: BenchTest, prompts: list[list[int]]) -> Sample:
        from kvoffload.config import SamplingParams

        if test.kind != "pp":              # tg: the prompts cached (untimed), then n decode steps timed
            return _one_round(self.start(test, prompts, 1))
        eng = self.llm.engine
        sids = [eng.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True)) for p in prompts]
        while eng.has_unfinished():
            eng.step()
        seqs = [eng.pop_finished(s) for s in sids]
        return Sample(sum(s.prompt_len for s in seqs) / sum(s.times.prefill_s for s in seqs),
                      sum(s.times.first_token - s.times.arrival for s in seqs) / len(seqs))

    def start(self, test: BenchTest, prompts: list[list[int]], rounds: int) -> Decoding:
        from kvoffload.config import SamplingParams

        eng = self.llm.engine
        sp = SamplingParams(max_tokens=test.n * rounds + 1, ignore_eos=True)
        sids = [eng.add_request(p, sp) for p in prompts]
        try:
            eng.step_until_prefilled(sids)
        except BaseException:
            eng.abort(sids)
            raise
        return _OursDecoding(eng, sids, test.n)


class _OursDecoding:
    def __init__(self, eng, sids: list[int], n: int) -> None:
        self.eng, self.sids, self.n = eng, sids, n

    def _made(self) -> list[int]:
        return [len(self.eng.seqs[s].output_ids) for s in self.sids]

    def _short(self, before: list[int]) -> bool:
        """Some sequence has made fewer than n tokens since ``before`` and can make more (one that
        decoded while others still prefilled reaches its max_tokens a little early)."""
        seqs = self.eng.seqs
        return any(len(seqs[s].output_ids) - b < self.n and seqs[s].status is not SeqStatus.FINISHED
                   for s, b in zip(self.sids, before))

    def round(self) -> Sample:
        eng, before = self.eng, self._made()
        t0 = time.perf_counter()
        while self._short(before):
            eng.step()
        dt = time.perf_counter() - t0
        return Sample((sum(self._made()) - sum(before)) / dt)

    def close(self) -> None:
        self.eng.abort(self.sids)               # finished after the last round, or cut short: freed


class Transformers:
    label = "batched"

    def __init__(self, name: str, gguf_path: str, dtype: torch.dtype) -> None:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise PeerUnavailable(f"transformers is not installed ({e.name})") from None
        self.name = name
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=dtype).eval()
        except Exception as e:       # missing gguf/accelerate, unsupported file, ...
            raise PeerUnavailable(f"transformers cannot load the GGUF ({type(e).__name__}: {str(e)[:120]})") from None

    @torch.inference_mode()
    def run(self, test: BenchTest, prompts: list[list[int]]) -> Sample:
        from transformers import DynamicCache

        if test.kind != "pp":
            return _one_round(self.start(test, prompts, 1))
        ids = torch.tensor(prompts)                       # equal lengths: no padding needed
        t0 = time.perf_counter()
        out = self.model(ids, past_key_values=DynamicCache(), use_cache=True)
        t1 = time.perf_counter()
        out.logits[:, -1].argmax(-1, keepdim=True)
        return Sample(ids.numel() / (t1 - t0), time.perf_counter() - t0)

    @torch.inference_mode()
    def start(self, test: BenchTest, prompts: list[list[int]], rounds: int) -> Decoding:
        from transformers import DynamicCache

        out = self.model(torch.tensor(prompts), past_key_values=DynamicCache(), use_cache=True)
        return _TransformersDecoding(self.model, out, test.n)


class _TransformersDecoding:
    def __init__(self, model, out, n: int) -> None:
        self.model, self.past, self.n = model, out.past_key_values, n
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def round(self) -> Sample:
        t0 = time.perf_counter()
        for _ in range(self.n):
            out = self.model(self.tok, past_key_values=self.past, use_cache=True)
            self.past, self.tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return Sample(len(self.tok) * self.n / (time.perf_counter() - t0))

    def close(self) -> None:
        self.past = None


class LlamaCpp:
    label = "sequential"      # the Python binding decodes one sequence at a time

    def __init__(self, name: str, gguf_path: str, n_ctx: int, threads: int) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise PeerUnavailable("llama-cpp-python is not installed (see benchmarks/README.md)") from None
        self.name, self._lib = name, llama_cpp
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, flash_attn=False, verbose=False)

    def _clear(self) -> None:
        lib, ctx = self._lib, self.llm._ctx.ctx
        self.llm.reset()
        if hasattr(lib, "llama_get_memory") and hasattr(lib, "llama_memory_clear"):
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        elif hasattr(lib, "llama_kv_self_clear"):
            lib.llama_kv_self_clear(ctx)
        else:
            lib.llama_kv_cache_clear(ctx)

    def _argmax(self) -> int:
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))))

    def run(self, test: BenchTest, prompts: list[list[int]]) -> Sample:
        timed, tokens, ttft = 0.0, 0, 0.0
        for p in prompts:                  # one sequence after another
            if test.kind != "pp":
                timed, tokens = timed + test.n / _one_round(self.start(test, [p], 1)).tok_s, tokens + test.n
                continue
            self._clear()
            t0 = time.perf_counter()
            self.llm.eval(p)
            t1 = time.perf_counter()
            self._argmax()
            timed, tokens, ttft = timed + t1 - t0, tokens + len(p), ttft + time.perf_counter() - t0
        return Sample(tokens / timed, ttft / len(prompts) if test.kind == "pp" else None)

    def start(self, test: BenchTest, prompts: list[list[int]], rounds: int) -> Decoding:
        if len(prompts) != 1:
            raise ValueError("llama.cpp decodes one sequence at a time: rounds on one prefill need batch 1")
        self._clear()
        self.llm.eval(prompts[0])
        return _LlamaCppDecoding(self, self._argmax(), test.n)


class _LlamaCppDecoding:
    def __init__(self, peer: LlamaCpp, tok: int, n: int) -> None:
        self.peer, self.tok, self.n = peer, tok, n

    def round(self) -> Sample:
        t0 = time.perf_counter()
        for _ in range(self.n):
            self.peer.llm.eval([self.tok])
            self.tok = self.peer._argmax()
        return Sample(self.n / (time.perf_counter() - t0))

    def close(self) -> None:
        self.peer._clear()
