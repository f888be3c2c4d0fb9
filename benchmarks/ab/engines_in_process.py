"""Decode ms a step of several engine settings in one process, alternated: each engine
prefills the same filler text once (``--batch`` sequences of it, distinct), then the engines
take turns decoding ``--steps`` tokens a sequence (order reversed every other round),
``--rounds`` times. Prints each round, then each engine's median and its speed against the
first engine by the median of the rounds' ratios. At batch 1 a step is a token.

    python benchmarks/ab/engines_in_process.py --depth 8000 \\
        'bf16={"kv_dtype": "bfloat16"}' 'bf16-py={"kv_dtype": "bfloat16", "_no_hook": true}' \\
        'int8={"kv_dtype": "int8"}'

Settings are LLM keyword arguments as JSON; ``"_no_hook": true`` makes the fused layers call
the backend's ``decode`` (the path through Python) instead of its native hook — the A/B of a
hook against the steps it replaces, in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    from kvoffload.bench.peers import Ours
    from kvoffload.bench.runner import prompts_for
    from kvoffload.bench.workloads import BenchTest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", nargs="+", help="NAME=JSON settings")
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--depth", type=int, default=8000)
    p.add_argument("-b", "--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()
    test = BenchTest("tg", a.steps, a.depth, a.batch)
    engines = []
    for spec in a.engines:
        name, settings = spec.split("=", 1)
        settings = json.loads(settings)
        no_hook = settings.pop("_no_hook", False)
        ours = Ours(name, a.model, a.threads, **settings)
        if no_hook:
            ours.llm.engine.kv.native_hook = False
        t = time.perf_counter()
        # kvoffload bench --prefill-once's rounds: the prompts cached once, then --steps tokens a round
        dec = ours.start(test, prompts_for(ours.llm.tokenizer, test, a.depth), a.rounds + 1)
        print(f"{name}: prefill {time.perf_counter() - t:.1f} s", flush=True)
        dec.round()                                                 # warm: plans made, kernels built
        engines.append((name, dec))
    ms: dict[str, list[float]] = {name: [] for name, _ in engines}
    for r in range(a.rounds):
        for name, dec in engines if r % 2 == 0 else engines[::-1]:
            ms[name].append(a.batch * 1e3 / dec.round().tok_s)              # ms a step
        print(r, {n: round(v[-1], 2) for n, v in ms.items()}, flush=True)
    for _, dec in engines:
        dec.close()
    ref = engines[0][0]
    for name, v in ms.items():
        speed = statistics.median(x / y for x, y in zip(ms[ref], v))
        print(f"{name:12s} median {statistics.median(v):.2f} ms a step ({a.batch * 1e3 / statistics.median(v):.1f} tok/s)  "
              f"speed vs {ref}: {speed:.3f}x  "
              f"{[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main()
