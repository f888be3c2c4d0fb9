"""Prefill tokens/s of whichever kvoffload is first on PYTHONPATH, for A/B runs between commits.

Run it alternately for two source trees inside one ``kvo-bench`` command, e.g. the commit before
a change (``git archive REV | tar -x -C /tmp/old``) against the working tree::

    for i in 1 2 3; do for t in /tmp/old $PWD; do
        PYTHONPATH=$t python benchmarks/ab/prefill.py --lengths 512,2048 --reps 2; done; done

Prints one JSON line per run: the source tree and the tokens/s of each repetition per length
(the default engine configuration, batch 1, after the same warm-up as ``kvoffload bench``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import kvoffload
from kvoffload.bench.peers import Ours
from kvoffload.bench.runner import prompts_for
from kvoffload.bench.workloads import BenchTest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ours = Ours("kvoffload", a.model, a.threads)
    warm = BenchTest("tg", 4, 64, 1)
    ours.run(warm, prompts_for(ours.llm.tokenizer, warm, 8000))
    res = {}
    for n in (int(x) for x in a.lengths.split(",")):
        test = BenchTest("pp", n)
        prompts = prompts_for(ours.llm.tokenizer, test, 8000)
        res[n] = [round(_tok_s(ours.run(test, prompts)), 1) for _ in range(a.reps)]
    print(json.dumps({"src": os.path.dirname(os.path.dirname(kvoffload.__file__)), "pp_tok_s": res}))


def _tok_s(sample) -> float:
    return getattr(sample, "tok_s", sample)       # older trees return a float


if __name__ == "__main__":
    main()
