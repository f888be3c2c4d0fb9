"""Variants of ``paged_attn.c`` (and optionally ``select.c``) side by side in one process, on the
attention hooks a decode step's fused layers call: a model's geometry, every layer's KV its own
(random, so it streams from DRAM), the in-memory backend with a sparse policy or none. Each
variant is compiled apart and drives its own backend (same KV, same metadata); the variants take
turns, so the host's drift falls on all alike. Prints whether the outputs agree with the first
variant's, then per variant the minimum and median µs a hooked layer (the sparse layers only
under a policy) and the median ratio to the first.

    git show HEAD~1:kvoffload/kernels/paged_attn.c > /tmp/paged_before.c
    python benchmarks/ab/attn_hook_variants.py --policy quest --context 16384 \\
        before=/tmp/paged_before.c after=kvoffload/kernels/paged_attn.c
    python benchmarks/ab/attn_hook_variants.py --policy quest \\
        before=kvoffload/kernels/paged_attn.c,/tmp/select_before.c after=kvoffload/kernels/paged_attn.c,kvoffload/kernels/select.c

A variant's sources are compiled as the kernels' build compiles them
(``kernels/build.py``'s ``compile_variant``: a copy elsewhere needs no headers beside it).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time

import torch

from kvoffload.attention.dense import DenseBackend
from kvoffload.config import SparseConfig
from kvoffload.dtypes import DTYPES, torch_dtype
from kvoffload.kernels import build
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.sparse import make_policy

# kvo_hook.h's kvo_attn_fn
ATTN_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)


def compile_source(kernel: str, src: str, tag: str) -> ctypes.CDLL:
    return build.compile_variant(kernel, src, tempfile.NamedTemporaryFile(suffix=f"-{tag}.so", delete=False).name)


def main() -> None:
    from kvoffload.api import LLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", help="NAME=PAGED_ATTN.c[,SELECT.c]")
    p.add_argument("-m", "--model", default="qwen2.5-coder-0.5b", help="the geometry's model")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--policy", default="quest", help="a sparse policy at --budget, or 'dense'")
    p.add_argument("--budget", default="1/16")
    p.add_argument("--kv-dtype", default="bfloat16", help="a full-precision KV dtype")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = LLM(a.model, threads=a.threads).model_config
    kvdt, ctx, dev = torch_dtype(a.kv_dtype), a.context, torch.device("cpu")
    H, Hk, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    src = DenseBackend(cfg, dev, kvdt, threads=a.threads)
    src.allocate(0, ctx + 64)
    src.seqs[0].normal_()
    q = torch.randn(L, 1, H, D)                                          # [L, B, H, D] fp32
    kv = torch.randn(L, 1, 2 * Hk, D).to(kvdt)                           # [L, B, 2 H_kv, D]: k then v
    out, lse = torch.empty(1, H, D), torch.empty(1, H)
    batch = ForwardBatch(Phase.DECODE, (0,), torch.tensor([[ctx]]), (ctx,), Logits.LAST)
    dense = a.policy == "dense"
    runs = []
    for i, spec in enumerate(a.variants):
        name, _, files = spec.partition("=")
        paged_src, _, select_src = files.partition(",")
        lib = compile_source("paged_attn", paged_src, str(i))
        driver = ctypes.cast(getattr(lib, f"kvo_paged_attn_v_{DTYPES[a.kv_dtype].kernel}"), ctypes.c_void_p).value
        pol = None if dense else make_policy(SparseConfig(sparse_policy=a.policy, sparse_budget=a.budget), cfg,
                                             src.bs, dev)
        if pol is not None:
            pol.threads = a.threads
            if select_src:
                pol.native_lib = compile_source("select", select_src, f"s{i}")
        be = DenseBackend(cfg, dev, kvdt, policy=pol, threads=a.threads)
        be.share(0, src, ctx)
        if pol is not None:
            for layer in range(L):
                pol.prefilled(layer, 0, ctx)
        runs.append((name, be, driver))
    be0 = runs[0][1]
    layers = [x for x in range(L) if dense or be0.policy.sparse(x)]

    def one_step(be: DenseBackend, driver: int) -> float:
        """µs a hooked layer: each layer's hook, its kernel driver swapped for the variant's."""
        t = 0.0
        for layer in layers:
            hook = be.native_decode(layer, batch, kvdt)
            if hook is None:
                raise SystemExit(f"layer {layer}: no native hook for this policy / dtype")
            if dense:
                be._plan(batch).calls[layer]._ctx.driver = driver
            else:
                be._step.struct.attn = driver
            t0 = time.perf_counter()
            rc = ATTN_FN(hook.fn)(hook.ctx, 1, q[layer].data_ptr(), H * D, kv[layer].data_ptr(),
                                  kv[layer, :, Hk:].data_ptr(), 2 * Hk * D, out.data_ptr(), lse.data_ptr())
            t += time.perf_counter() - t0
            if rc:
                raise SystemExit(f"layer {layer}: the hook returned {rc}")
        return t * 1e6 / len(layers)

    outs = {}
    for name, be, driver in runs:
        for _ in range(3):                                              # warm: plans made, pages touched
            one_step(be, driver)
        outs[name] = out.clone()
    first = runs[0][0]
    for name, o in outs.items():
        print(f"{name}: last layer's output, max |diff| against {first}: {float((o - outs[first]).abs().max()):.3g}")
    us: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for r in range(a.rounds):
        for name, be, driver in runs if r % 2 == 0 else runs[::-1]:
            us[name].append(min(one_step(be, driver) for _ in range(5)))
    what = "layer" if dense else "sparse layer"
    for name, xs in us.items():
        ratio = statistics.median(x / y for x, y in zip(xs, us[first]))
        print(f"{name:10s} min {min(xs):8.1f}  median {statistics.median(xs):8.1f} us a {what}  "
              f"x{ratio:.3f} of {first}", flush=True)


if __name__ == "__main__":
    main()
