"""Where a decode step's time goes at a depth: cProfile over decode steps of one engine setting.

    python benchmarks/kvquant/profile_decode.py '{"kv_dtype": "int8"}' --depth 8176 --steps 32

Prints ms per generated token (from the tokens the steps produced) and the functions by their
own time; the native paged-attention calls are ``kernels/paged.py:__call__``. Not a speed
benchmark (the profiler adds its own overhead): use it beside a ``kvoffload bench`` run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time


def main() -> None:
    from kvoffload.api import LLM
    from kvoffload.bench.runner import FILLER
    from kvoffload.config import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", help="engine settings as JSON, e.g. '{\"kv_dtype\": \"int8\"}'")
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--depth", type=int, default=8176)
    p.add_argument("-b", "--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--sort", default="tottime", help="pstats order: tottime (own time) or cumtime (with callees)")
    a = p.parse_args()
    llm = LLM(a.model, threads=a.threads, **json.loads(a.settings))
    eng = llm.engine
    base = llm.tokenizer.encode(FILLER * (a.depth // 40 + 2))
    while len(base) < a.depth + a.batch:
        base += base
    sids = [eng.add_request(base[i:i + a.depth], SamplingParams(max_tokens=a.steps + 8, ignore_eos=True))
            for i in range(a.batch)]
    eng.step_until_prefilled(sids)
    for _ in range(2):                                             # warm: kernels built, plans made
        eng.step()
    before = sum(len(eng.seqs[s].output_ids) for s in sids)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    while eng.has_unfinished() and sum(len(eng.seqs[s].output_ids) for s in sids) - before < a.steps * a.batch:
        eng.step()
    prof.disable()
    dt = time.perf_counter() - t0
    tokens = sum(len(eng.seqs[s].output_ids) for s in sids) - before
    print(f"{a.settings} depth {a.depth} batch {a.batch}: {tokens} tokens, {dt / tokens * 1e3:.1f} ms a token "
          f"(profiled)")
    pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)


if __name__ == "__main__":
    main()
