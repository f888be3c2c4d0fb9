"""In-process A/B of decode paths: the two variants alternate inside one process, so the
process-level fast / slow states of this machine (benchmarks/README.md, the TTFT note) cannot
land on one side only. Random KV of the requested length (timing only), batch 1, 2 threads.

    python benchmarks/ab/in_process.py q5   [--model qwen2.5-coder-0.5b] [--ctx 128]
        Q5_0 layers as q5 against int8 (two loaded models), decode step without attention.
    python benchmarks/ab/in_process.py hook [--model smollm2-135m] [--ctx 128] [--policies quest,shadowkv]
        a decode layer in one native call (the backend's native hook) against the three steps,
        for dense and each sparse policy (1/16; metadata built from the random KV).

Prints each variant's per-alternation medians (of ``--reps`` steps) and their median.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import kvoffload.model.loading as loading
from kvoffload.api import LLM
from kvoffload.attention.dense import DenseBackend
from kvoffload.bench.breakdown import ZeroAttention, time_decode
from kvoffload.config import SparseConfig
from kvoffload.sparse import make_policy


def show(res: dict) -> None:
    for k, v in res.items():
        print(f"{k}: " + " ".join(f"{x:.2f}" for x in v) + f" -> median {statistics.median(v):.2f} ms")


def q5(a) -> None:
    llms = {}
    for name, flag in (("int8", False), ("q5", True)):
        loading.q5_native = (lambda f=flag: f)       # the loader's choice, forced
        llms[name] = LLM(a.model, threads=a.threads)
        print(f"{name}: weights {llms[name].load_stats.weight_bytes / 2**20:.0f} MiB [{llms[name].load_stats.weight_formats}]")
    res = {k: [] for k in llms}
    for _ in range(a.alternations):
        for k, llm in llms.items():
            res[k].append(time_decode(llm.model, ZeroAttention(), a.ctx, a.reps))
    print(f"decode step without attention @{a.ctx}, ms:")
    show(res)


def hook(a) -> None:
    llm = LLM(a.model, threads=a.threads)
    cfg, model = llm.model_config, llm.model
    src = DenseBackend(cfg, torch.device("cpu"), torch.bfloat16)
    src.allocate(0, a.ctx + 64)
    src.seqs[0].normal_()
    bes = {"dense": src}
    for p in filter(None, a.policies.split(",")):
        pol = make_policy(SparseConfig(sparse_policy=p, sparse_budget="1/16"), cfg, 16, torch.device("cpu"))
        be = DenseBackend(cfg, torch.device("cpu"), torch.bfloat16, policy=pol)
        be.share(0, src, a.ctx)
        for layer in range(cfg.num_layers):
            pol.prefilled(layer, 0, a.ctx)
        bes[p] = be
    res: dict = {}
    for _ in range(a.alternations):
        for k, be in bes.items():
            for on in (True, False):
                be.native_hook = on
                res.setdefault(f"{k} {'one call' if on else 'three steps'}", []).append(time_decode(model, be, a.ctx, a.reps))
    print(f"{a.model} decode step @{a.ctx}, ms:")
    show(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("q5", "hook"))
    p.add_argument("--model", default=None)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--policies", default="", help="hook: sparse policies beside dense (comma-separated)")
    p.add_argument("--alternations", type=int, default=6)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model is None:
        a.model = "qwen2.5-coder-0.5b" if a.what == "q5" else "smollm2-135m"
    (q5 if a.what == "q5" else hook)(a)


if __name__ == "__main__":
    main()
