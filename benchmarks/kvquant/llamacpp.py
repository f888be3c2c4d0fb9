"""llama.cpp's quantised KV (``--cache-type-k/-v f16 | q8_0 | q4_0``) on the passages of
``kvoffload eval ppl``: perplexity, its delta against llama.cpp's own f16 KV, and speed.

The passages are ``kvoffload.eval.tasks.text_tokens`` (same seed, index and length as the eval
run), fed to llama.cpp as token ids, so both engines score the same tokens. llama.cpp writes each
512-token batch into its (quantised) cache before attending to it, so every position's attention
reads quantised K and V; quantised V needs its flash attention, which is on for every type here
(f16 included, so the types differ only in the cache). Speed per passage: the prefill of the whole
passage (tokens/s) and ``--gen`` greedy decode steps after it (tokens/s at a depth of the
passage's length). Types interleaved per passage; each result is appended to ``PREFIX.jsonl`` as
it finishes (a rerun skips those), the table goes to ``PREFIX.md``.

    python benchmarks/kvquant/llamacpp.py -m smollm2-135m -L 2k,4k,8k --samples 3 -o benchmarks/kvquant/llamacpp_smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

TYPES = ("f16", "q8_0", "q4_0")


def load_tokenizer(model: str):
    from kvoffload.model.loader.gguf_file import GGUFFile
    from kvoffload.model.registry import resolve_model
    from kvoffload.model.tokenizer import Tokenizer

    path = resolve_model(model)
    return path, Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


class LlamaKV:
    """One llama.cpp context with K and V cached as ``kind``; scores a passage, then decodes."""

    def __init__(self, path: str, kind: str, n_ctx: int, threads: int) -> None:
        import llama_cpp

        ggml = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, type_k=ggml[kind],
                                   type_v=ggml[kind], logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _clear(self) -> None:
        self.llm.reset()
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.llm._ctx.ctx), True)

    def score(self, ids: list[int], gen: int) -> dict:
        """NLL of ``ids[1:]`` (every position's logits), prefill and decode tokens/s (the
        prefill time is llama.cpp's decode calls alone, not the scoring of their logits)."""
        import torch

        self._clear()
        ctx, nll, n_past, pp_s = self.llm._ctx, 0.0, 0, 0.0
        for s in range(0, len(ids), 512):
            chunk = ids[s:s + 512]
            self.llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=True)
            t0 = time.perf_counter()
            ctx.decode(self.llm._batch)
            pp_s += time.perf_counter() - t0
            logits = torch.from_numpy(np.ctypeslib.as_array(ctx.get_logits(), shape=(len(chunk), self.vocab)))
            n = min(len(chunk), len(ids) - 1 - s)                          # row i predicts token s+i+1
            tgt = torch.tensor(ids[s + 1:s + 1 + n])
            nll -= float(torch.log_softmax(logits[:n].float(), -1).gather(1, tgt[:, None]).double().sum())
            n_past += len(chunk)
        tok = int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx.ctx, -1), shape=(self.vocab,))))
        t0 = time.perf_counter()
        for _ in range(gen):
            self.llm._batch.set_batch(batch=[tok], n_past=n_past, logits_all=True)
            ctx.decode(self.llm._batch)
            n_past += 1
            tok = int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx.ctx, -1), shape=(self.vocab,))))
        tg = gen / (time.perf_counter() - t0)
        return {"tokens": len(ids) - 1, "nll_sum": nll, "pp_tps": len(ids) / pp_s, "tg_tps": tg}


def main() -> None:
    from kvoffload.eval.config import parse_lengths
    from kvoffload.eval.tasks import text_tokens

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("-L", "--lengths", default="2k,4k,8k")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen", type=int, default=16, help="decode steps timed after each passage")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("-o", "--output", required=True, help="PREFIX.jsonl (per sample, resumable) and PREFIX.md")
    a = p.parse_args()
    types = [t for t in a.types.split(",") if t]
    if bad := [t for t in types if t not in TYPES]:
        sys.exit(f"error: unknown KV type {bad[0]!r} (choose from {', '.join(TYPES)})")
    lengths = parse_lengths(a.lengths)
    path, tok = load_tokenizer(a.model)
    log = a.output + ".jsonl"                                   # one row per (type, length, sample): resumable
    try:
        with open(log) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f)) if r["seed"] == a.seed]
    except FileNotFoundError:
        rows = []
    done = {(r["type"], r["length"], r["index"]) for r in rows}
    for length in lengths:
        todo = [(i, t) for i in range(a.samples) for t in types if (t, length, i) not in done]
        if not todo:
            continue
        engines = {t: LlamaKV(path, t, length + a.gen + 8, a.threads) for t in dict.fromkeys(t for _, t in todo)}
        for index, t in todo:                                            # types interleaved per passage
            r = {"type": t, "length": length, "index": index, "seed": a.seed,
                 **engines[t].score(text_tokens(tok, length, index, a.seed), a.gen)}
            rows.append(r)
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{t} {length} #{index}: ppl {math.exp(r['nll_sum'] / r['tokens']):.4f} "
                  f"pp {r['pp_tps']:.0f} tg {r['tg_tps']:.1f} tok/s", file=sys.stderr, flush=True)
        del engines
    lines = [f"llama.cpp (llama-cpp-python) KV cache types on `kvoffload eval ppl` passages, {a.model}, "
             f"{a.threads} threads, flash attention on; ppl over all samples' tokens, speeds medians\n",
             "| length | KV | ppl | Δppl vs f16 | prefill tok/s | decode tok/s (at depth) |", "|---:|---|---:|---:|---:|---:|"]
    for length in lengths:
        base = None
        for t in types:
            rs = [r for r in rows if r["type"] == t and r["length"] == length and r["index"] < a.samples]
            ppl = math.exp(sum(r["nll_sum"] for r in rs) / sum(r["tokens"] for r in rs))
            base = base or ppl
            lines.append(f"| {length} | {t} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% "
                         f"| {statistics.median(r['pp_tps'] for r in rs):.0f} "
                         f"| {statistics.median(r['tg_tps'] for r in rs):.1f} |")
    with open(a.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
