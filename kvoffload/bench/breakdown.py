"""Where one decode token's time goes, measured by subtraction (no profiler overhead).

    python -m kvoffload.bench.breakdown --ctx 512,8192 --dtype bfloat16 -q int4

* step: a real decode step of the default model at context C (batch 1).
* no-attention: the same step with an attention backend that returns zeros (KV untouched).
* overhead floor: the same 30-layer graph with every matrix shrunk to 64x64 (same op count,
  the same weight format and decode kernels, negligible FLOPs/bytes): what Python, the
  dispatcher and the kernels' fixed costs take per token.
attention = step - no-attention; linears+norms ≈ no-attention - floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from kvoffload.attention.dense import DenseBackend
from kvoffload.dtypes import torch_dtype
from kvoffload.model.fused import fuse_layers
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.model.llama import Transformer
from kvoffload.model.quant import quantize


class ZeroAttention:
    def prefill(self, layer, q, k, v, batch):
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)

    decode = prefill


def time_decode(model: Transformer, backend, start: int, reps: int) -> float:
    tok = torch.tensor([[17]])
    batch = ForwardBatch(Phase.DECODE, (0,), torch.tensor([[start]]), (start,), Logits.LAST)
    ts = []
    with torch.inference_mode():
        for _ in range(reps + 2):
            t = time.perf_counter()
            model(tok, batch, backend)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="model alias or path (default: the embedded model)")
    ap.add_argument("--ctx", default="512,2048,8192")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-q", "--quantization", default="auto")
    ap.add_argument("--decode-kernel", default="native", choices=("native", "torch"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kvoffload.api import LLM

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, threads=args.threads,
              decode_kernel=args.decode_kernel)
    model, cfg, dtype = llm.model, llm.model_config, torch_dtype(args.dtype)
    tiny_cfg = dataclasses.replace(cfg, hidden_size=64, intermediate_size=64, head_dim=64, vocab_size=64)
    tiny = Transformer(tiny_cfg).to(dtype).eval()
    quant = llm.load_stats.quantization
    if quant != "none":
        quantize(tiny, quant, dtype, torch.device("cpu"), llm.config.quant_max_rows)
        if args.decode_kernel == "native":
            fuse_layers(tiny, args.threads)
    floor = time_decode(tiny, ZeroAttention(), 10, args.reps)
    ls = llm.load_stats
    print(f"{ls.source}: {ls.weight_type} file, {args.dtype}, quantization {ls.quantization} [{ls.weight_formats}], decode kernel "
          f"{args.decode_kernel}, {args.threads} threads, "
          f"load {ls.seconds:.2f} s, weights {ls.weight_bytes / 2**20:.0f} MiB; ms per decoded token (median)")
    print("| context | step | attention | linears+norms | overhead floor |")
    print("|---|---|---|---|---|")
    for c in (int(x) for x in args.ctx.split(",")):
        c = min(c, cfg.max_position - 1)          # the token decoded at position c must fit
        be = DenseBackend(cfg, torch.device("cpu"), dtype)
        be.allocate(0, c + 1)
        be.seqs[0].normal_()                          # a filled cache (random keys are fine for timing)
        step = time_decode(model, be, c, args.reps)
        no_attn = time_decode(model, ZeroAttention(), c, args.reps)
        print(f"| {c} | {step:.2f} | {step - no_attn:.2f} | {no_attn - floor:.2f} | {floor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
