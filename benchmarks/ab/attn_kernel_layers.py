"""The native decode attention kernel alone over L layers' worth of KV (random, timing only):
L = 30 separate arenas of one model's shape stream from DRAM, L = 1 stays in cache; the time is
scaled to 30 layers. SmolLM2-135M's shape (3 KV heads x 3 query heads x 64 dims, 16-token
blocks); the KV in huge pages, as the stores keep it.

    python benchmarks/ab/attn_kernel_layers.py int8 8192 30 [threads]

A/B a kernel change by running this before and after, alternated (the kernels rebuild on a
source change).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from kvoffload import hugepages
from kvoffload.dtypes import DTYPES, torch_dtype
from kvoffload.kernels.paged import Items, PagedAttention
from kvoffload.kv.layout import BlockLayout


def main() -> None:
    dtype, ctx, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    H_kv, G, D, bs = 3, 3, 64, 16
    nb = ctx // bs
    lay = BlockLayout(bs, H_kv, D, dtype)
    kern = PagedAttention.for_layout(lay, G)
    layers = []
    for _ in range(L):
        k, v = torch.randn(H_kv, ctx, D), torch.randn(H_kv, ctx, D)
        if dtype in DTYPES:                                          # (int8 / int4: packed from fp32)
            k, v = k.to(torch_dtype(dtype)), v.to(torch_dtype(dtype))
        packed = lay.pack(k, v)
        slots = hugepages.zeros(tuple(packed.shape), packed.dtype, torch.device("cpu"))
        slots.copy_(packed)
        sb = lay.slot_bytes
        items, _ = Items.chunked([0], [slots.data_ptr() + np.arange(nb, dtype=np.int64) * sb], [ctx], bs,
                                 chunk_blocks=lay.chunk_blocks)
        layers.append((slots, items, np.empty((items.n, H_kv * G, D), np.float32),
                       np.empty((items.n, H_kv * G), np.float32)))
    q = np.random.default_rng(0).standard_normal((1, H_kv * G, D)).astype(np.float32)
    ts = []
    for _ in range(int(os.environ.get("REPS", 30)) * (30 // L)):
        t = time.perf_counter()
        for _, items, po, pl in layers:
            kern(q, items, po, pl, threads)
        ts.append((time.perf_counter() - t) * 30 / L)
    ms = np.median(ts[3:]) * 1e3
    print(f"{dtype} ctx={ctx} L={L} t={threads}: {ms:.2f} ms per 30 layers  {nb * sb * 30 / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    main()
