"""The native selection's cost per sparse layer and decode step (#20 item 1; `selection.md`).

    python benchmarks/sparse/selection_cost.py [--ctx 8192] [--batch 1] [--geometry 3x3x64] [--threads 1]
    python benchmarks/sparse/selection_cost.py --threads 2 \\
        --variant "before=/tmp/old/kvoffload/kernels/select.c:1048576" \\
        --variant "after=kvoffload/kernels/select.c:131072"

Per registered policy (shadowkv_lowrank aside: its selection is ShadowKV's): metadata for
``--layers`` sparse layers built through ``append`` from random k / v (one prefill chunk per
layer), then decode steps calling ``select_batch`` at each layer in turn, so that the metadata
streams from memory as in a real decode. Prints the median µs per (step, layer) call.

With ``--variant NAME=SOURCE.c[:PAR_MIN_WORK]`` (repeated): each ``select.c`` is compiled with
this tree's flags and headers (``build.compile_variant``) and the C call alone (``kvo_select``,
no Python, no append) is timed for each, the variants alternated step by step in one process over
the same metadata; prints each one's median and its ratio to the first. A measurement, not a test: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time

import numpy as np
import torch

from kvoffload.config import SparseConfig
from kvoffload.kernels import build
from kvoffload.kernels import select as ksel
from kvoffload.sparse import make_policy
from kvoffload.sparse.registry import POLICIES


class Model:
    def __init__(self, H_kv: int, G: int, D: int, layers: int) -> None:
        self.num_kv_heads, self.head_dim, self.num_heads, self.num_layers = H_kv, D, H_kv * G, layers


def compile_variant(i: int, spec: str) -> tuple[str, ctypes.CDLL, int]:
    """``NAME=SOURCE.c[:PAR_MIN_WORK]`` -> (name, the loaded build, its threshold)."""
    name, rest = spec.split("=", 1)
    src, _, pmw = rest.partition(":")
    out = tempfile.NamedTemporaryFile(suffix=f"-{i}.so", delete=False).name
    return name, build.compile_variant("select", src, out), int(pmw) if pmw else ksel.PAR_MIN_WORK


def time_variants(pol, variants, seqs, starts, a, H: int, D: int, g: torch.Generator) -> str:
    """The C call of each variant over the same metadata, alternated step by step (each variant's
    kernel made by the policy from its build, as the tests do with ``native_lib``)."""
    kerns = []
    for name, lib, pmw in variants:
        pol.native_lib, pol._kernel = lib, None                  # a fresh NativeSelect over this build
        kk = pol.native_kernel_for(torch.float32, torch.float32)
        kk.threads, kk.cfg.par_min_work = a.threads, pmw
        kerns.append((name, kk))
    times: dict[str, list[float]] = {name: [] for name, _ in kerns}
    for step in range(a.steps):
        for name, kk in kerns if step % 2 else kerns[::-1]:
            for layer in range(a.layers):
                q = torch.randn(len(seqs), H, D, generator=g)
                table, aux = pol.native_table(layer, seqs, starts), pol.native_aux(layer)
                t = time.perf_counter()
                kk(starts, q, None, None, table, aux)
                times[name].append(time.perf_counter() - t)
    med = {name: float(np.median(ts)) * 1e6 for name, ts in times.items()}
    first = med[kerns[0][0]]
    return "  ".join(f"{name} {us:7.1f}" + ("" if i == 0 else f" ({us / first:.2f}x)")
                     for i, (name, us) in enumerate(med.items())) + " us per layer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--geometry", default="3x3x64", help="H_kv x G x D (SmolLM2 3x3x64, Qwen2.5-0.5B 2x7x64)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--policies", default=",".join(n for n in POLICIES if n != "shadowkv_lowrank"))
    p.add_argument("--variant", action="append", default=[], help="NAME=SOURCE.c[:PAR_MIN_WORK], repeated")
    a = p.parse_args()
    H_kv, G, D = map(int, a.geometry.split("x"))
    torch.set_num_threads(a.threads)
    variants = [compile_variant(i, s) for i, s in enumerate(a.variant)]
    model = Model(H_kv, G, D, a.layers)
    rs = np.random.RandomState(0)
    cal = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"format": "kvoffload-channels/1",
               "channels": [[rs.permutation(D).tolist() for _ in range(H_kv)] for _ in range(a.layers)]}, cal)
    cal.close()
    g = torch.Generator().manual_seed(0)
    print(f"geometry {a.geometry}, context {a.ctx}, batch {a.batch}, {a.threads} thread(s), budget 1/16, "
          f"{a.layers} sparse layers, median of {a.steps} steps x layers")
    for name in a.policies.split(","):
        cfg = SparseConfig(sparse_policy=name, sparse_budget="1/16", sparse_dense_layers="",
                           sparse_calibration=cal.name)
        pol = make_policy(cfg, model, 16, torch.device("cpu"))
        pol.threads = a.threads
        seqs = tuple(range(a.batch))
        for s in seqs:
            pol.allocate(s, a.ctx + a.steps + 16)
            for layer in range(a.layers):
                k, v = torch.randn(2, H_kv, a.ctx, D, generator=g).to(torch.bfloat16).float().unbind(0)
                pol.append(layer, s, 0, k, v)
                pol.prefilled(layer, s, a.ctx)
        if variants:
            print(f"{name:16s} {time_variants(pol, variants, seqs, tuple(a.ctx - 1 for _ in seqs), a, H_kv * G, D, g)}")
            continue
        times = []
        for step in range(a.steps):
            starts = tuple(a.ctx + step for _ in seqs)
            for layer in range(a.layers):
                q = torch.randn(a.batch, H_kv * G, D, generator=g)
                k, v = torch.randn(2, a.batch, H_kv, D, generator=g).unbind(0)
                t = time.perf_counter()
                pol.select_batch(layer, seqs, q, starts, k, v)
                times.append(time.perf_counter() - t)
        print(f"{name:16s} {np.median(times) * 1e6:8.1f} us per layer")


if __name__ == "__main__":
    main()
