"""Where the native GEMV stops beating dequantise + dense GEMM, by rows (``FUSED_ROWS`` in
kvoffload/model/fused.py comes from this).

    python benchmarks/ab/gemv_rows.py int4      # SmolLM2-135M's layer shapes x 30
    python benchmarks/ab/gemv_rows.py int8      # Qwen2.5-Coder-0.5B's layer shapes x 24
    python benchmarks/ab/gemv_rows.py q5        # the same in Q5_0's own codes

Random weights of the model's layer shapes in the decode format, on huge pages as loading puts
them; for each row count, the median milliseconds of one pass over every layer: the native GEMV
(one call per matrix, bf16 activations as in a bf16 model) against ``QuantLinear.dense_mm`` (dequantise into the scratch, bf16 GEMM).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvoffload import hugepages
from kvoffload.model.fused import gemv, max_call_rows
from kvoffload.model.quant import QUANTIZERS, Q5Linear

SHAPES = {"int4": (30, [(960, 576), (576, 576), (3072, 576), (576, 1536)]),       # SmolLM2-135M
          "int8": (24, [(1152, 896), (896, 896), (9728, 896), (896, 4864)])}     # Qwen2.5-Coder-0.5B
SHAPES["q5"] = SHAPES["int8"]
FORMATS = {**QUANTIZERS, "q5": Q5Linear}


def median_ms(f, reps: int = 7) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("format", choices=sorted(SHAPES))
    p.add_argument("--rows", default="1,8,16,32")
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layers, shapes = SHAPES[a.format]
    mods = torch.nn.ModuleList(FORMATS[a.format].from_linear(torch.nn.Linear(K, N, bias=False), torch.bfloat16, 8)
                               for _ in range(layers) for N, K in shapes)
    hugepages.move_module_tensors(mods)
    for M in (int(r) for r in a.rows.split(",")):
        if M > max_call_rows():
            raise SystemExit(f"--rows: at most {max_call_rows()} rows a native call")
        xb = {K: torch.randn(M, K).bfloat16() for _, K in shapes}
        x = {K: v.float() for K, v in xb.items()}                  # bf16 numbers, as in the model
        native = median_ms(lambda: [gemv(m, x[m.in_features], a.threads, x_bf16=True) for m in mods])
        dense = median_ms(lambda: [m.dense_mm(xb[m.in_features]) for m in mods])
        print(f"{a.format} {M} rows: native GEMV {native:.1f} ms, dequantise + GEMM {dense:.1f} ms")


if __name__ == "__main__":
    main()
