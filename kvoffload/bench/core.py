"""Prefill and decode speed of the core engine beside HF transformers (and llama.cpp if installed).

    python -m kvoffload.bench.core --ctx 512,2048,4096,8192 --reps 3 --out benchmarks/core_speed.md

For each context length C: a prompt of exactly C tokens (KJV-free filler text), prefill
timed, then ``--gen`` tokens decoded greedily and timed. Engines are interleaved per
repetition so that machine noise hits all of them alike; medians (min–max) are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

FILLER = ("The history of the region is long and varied. Farmers grew wheat and barley along the river, "
          "merchants carried salt and cloth over the mountain passes, and scholars copied books by hand in "
          "quiet monasteries. Each generation left its mark in stone, in law and in song. ")


@dataclass
class Result:
    engine: str
    ctx: int
    prefill: list[float] = field(default_factory=list)   # tok/s per rep
    decode: list[float] = field(default_factory=list)

    @staticmethod
    def fmt(xs: list[float]) -> str:
        if not xs:
            return "—"
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def prompt_ids(encode: Callable[[str], list[int]], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += encode(FILLER * 20)
    return ids[:n]


class Ours:
    def __init__(self, name: str, **kw) -> None:
        from kvoffload.api import LLM

        self.name, self.llm = name, LLM(**kw)
        self.encode = self.llm.tokenizer.encode

    def run(self, ids: list[int], gen: int) -> tuple[float, float]:
        from kvoffload import SamplingParams

        m = self.llm.generate(ids, SamplingParams(max_tokens=gen, ignore_eos=True))[0].metrics
        return m.prefill_tok_s, m.decode_tok_s


class HF:
    def __init__(self, name: str, path: str, dtype: torch.dtype) -> None:
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = os.path.dirname(path), os.path.basename(path)
        self.name = name
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        self.encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def run(self, ids: list[int], gen: int) -> tuple[float, float]:
        from transformers import DynamicCache

        cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(gen - 1):
            out = self.model(tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), (gen - 1) / (t2 - t1)


class LlamaCpp:
    def __init__(self, name: str, path: str, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama

        self.name = name
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, flash_attn=False, verbose=False)     # the binding's default
        self.encode = lambda s: self.llm.tokenize(s.encode(), add_bos=False)

    def _clear(self) -> None:
        """Empty the KV cache so every run starts cold (the binding's API moved between versions)."""
        import llama_cpp

        self.llm.reset()                                    # n_tokens = 0
        ctx = self.llm._ctx.ctx
        if hasattr(llama_cpp, "llama_get_memory") and hasattr(llama_cpp, "llama_memory_clear"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        elif hasattr(llama_cpp, "llama_kv_self_clear"):
            llama_cpp.llama_kv_self_clear(ctx)
        else:
            llama_cpp.llama_kv_cache_clear(ctx)

    def run(self, ids: list[int], gen: int) -> tuple[float, float]:
        import numpy as np

        self._clear()
        import llama_cpp

        def last_logits() -> np.ndarray:
            ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(last_logits()))
        for _ in range(gen - 1):
            self.llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), (gen - 1) / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="512,2048,4096,8192")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="ours-bf16-int4,ours-bf16,ours-fp32,hf-bf16,llama.cpp",
                    help="ours-{fp32,bf16}[-int4|-int8], hf-{fp32,bf16}, llama.cpp")
    ap.add_argument("--out", default=None, help="write the markdown table (and .json) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctxs = [int(c) for c in args.ctx.split(",")]

    from kvoffload.model.loading import read_config
    from kvoffload.model.registry import resolve_model

    path = resolve_model(None)
    engines = []
    for name in args.engines.split(","):
        try:
            if name.startswith("ours-"):
                parts = name.split("-")[1:]
                engines.append(Ours(name, dtype={"fp32": "float32", "bf16": "bfloat16"}[parts[0]],
                                    quantization=parts[1] if len(parts) > 1 else "none",
                                    threads=args.threads))
            elif name.startswith("hf-"):
                engines.append(HF(name, path, {"fp32": torch.float32, "bf16": torch.bfloat16}[name[3:]]))
            elif name == "llama.cpp":
                engines.append(LlamaCpp(name, path, max(ctxs) + args.gen + 16, args.threads))
            else:
                raise ValueError(f"unknown engine {name}")
        except ImportError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)

    # "context C" = a prompt of C tokens, capped so that C + gen fits the model's context
    limit = read_config(path).max_position - args.gen - 1
    results = {(e.name, c): Result(e.name, c) for e in engines for c in ctxs}
    for e in engines:                                        # warm-up (kernel builds, allocator)
        e.run(prompt_ids(e.encode, 128), 4)
    for c in ctxs:
        for rep in range(1, args.reps + 1):
            for e in engines:                                # interleaved
                p, d = e.run(prompt_ids(e.encode, min(c, limit)), args.gen)
                results[e.name, c].prefill.append(p)
                results[e.name, c].decode.append(d)
                print(f"ctx {c} rep {rep} {e.name}: prefill {p:.1f} tok/s, decode {d:.2f} tok/s", file=sys.stderr)

    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF), {args.threads} threads, {args.gen} generated tokens, "
             f"median (min–max) of {args.reps} interleaved runs, tokens/s.", "",
             "| engine | " + " | ".join(f"prefill {c}" for c in ctxs) + " | " + " | ".join(f"decode @{c}" for c in ctxs) + " |",
             "|---|" + "---|" * (2 * len(ctxs))]
    for e in engines:
        row = [Result.fmt(results[e.name, c].prefill) for c in ctxs] + [Result.fmt(results[e.name, c].decode) for c in ctxs]
        lines.append(f"| {e.name} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump([vars(r) for r in results.values()], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
