"""Perplexity and next-token agreement of each dtype / weight format against fp32.

    python -m kvoffload.bench.quality --tokens 4096 --out benchmarks/quality.md

Text: Python's own reference documentation (``pydoc_data.topics``, shipped with CPython,
PSF licence), so it runs offline. Teacher-forced logits come from the engine's chunked
prefill (``Engine.prompt_logits``); the reference is the same model in float32 with no
quantisation. A config is ``dtype/weights`` (prefill in chunks of 2048: the dense GEMMs on
the dequantised weights) or ``dtype/weights/decode`` (chunks of ``--decode-rows`` rows: the
path a decode step takes, i.e. the packed kernels or the fused native layers).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--configs", default="float32/none,bfloat16/none,bfloat16/int8/decode,bfloat16/int4/decode")
    ap.add_argument("--decode-rows", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from kvoffload.api import LLM

    ref_logp, rows = None, []
    for spec in args.configs.split(","):
        dtype, quant, *path = spec.split("/")
        chunk = {"decode": {"prefill_chunk": args.decode_rows, "quant_max_rows": args.decode_rows}}.get(
            path[0] if path else "", {})
        llm = LLM(args.model, dtype=dtype, quantization=quant, **chunk)
        ids = llm.tokenizer.encode(reference_text())[: args.tokens]
        logp = torch.log_softmax(llm.engine.prompt_logits(ids).float(), -1)[:-1]          # [T-1, V]
        target = torch.tensor(ids[1:])
        nll = -logp.gather(1, target[:, None]).mean().item()
        if ref_logp is None:
            ref_logp = logp
        agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
        kl = torch.sum(ref_logp.exp() * (ref_logp - logp), -1).mean().item()
        rows.append((spec, math.exp(nll), agree, kl))
        print(f"{spec}: ppl {math.exp(nll):.3f}, top-1 agreement with fp32 {agree:.4f}, KL {kl:.2e}", file=sys.stderr)
        del llm
    base = rows[0][1]
    lines = [f"Perplexity over the first {args.tokens} tokens of `pydoc_data.topics`; agreement and KL against "
             f"{rows[0][0]} (teacher-forced, every position). `/decode` rows run in chunks of {args.decode_rows} tokens, "
             f"through the path a decode step takes (packed kernels / fused native layers).", "",
             "| dtype / weights | perplexity | Δ vs fp32 | top-1 agreement | mean KL |", "|---|---|---|---|---|"]
    for spec, ppl, agree, kl in rows:
        lines.append(f"| {spec} | {ppl:.3f} | {ppl - base:+.3f} ({(ppl / base - 1) * 100:+.2f}%) | {agree * 100:.2f}% | {kl:.2e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
