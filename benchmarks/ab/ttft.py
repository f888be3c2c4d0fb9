"""Time to first token of a short prompt through the engine, for A/B runs between commits.

Run it alternately for two source trees inside one ``kvo-bench`` command (see ``prefill.py``)::

    for i in 1 2; do for t in /tmp/old $PWD; do
        PYTHONPATH=$t python benchmarks/ab/ttft.py --tokens 16; done; done

Each request is added to the engine and stepped to its first token (``max_tokens=1``); prints
one JSON line: the source tree and the median milliseconds over ``--reps`` requests after two
warm-up requests (random token ids, so no prefix is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

import kvoffload
from kvoffload.api import LLM
from kvoffload.config import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    eng = LLM(a.model, threads=a.threads).engine
    rng = random.Random(0)

    def once() -> float:
        sid = eng.add_request([rng.randint(100, 1000) for _ in range(a.tokens)],
                              SamplingParams(max_tokens=1, ignore_eos=True))
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        eng.pop_finished(sid)
        return (time.perf_counter() - t) * 1e3

    ms = [once() for _ in range(a.reps + 2)][2:]
    print(json.dumps({"tree": os.path.dirname(os.path.dirname(kvoffload.__file__)), "tokens": a.tokens,
                      "median_ms": round(statistics.median(ms), 1), "ms": [round(x, 1) for x in ms]}))


if __name__ == "__main__":
    main()
