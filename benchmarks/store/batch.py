"""A batch of questions over a few documents (``kvoffload batch``, OpenAI batch format): total
wall time with an empty ``--kv-store`` against the same batch without a store; both start a new
process, so each includes the model load.

    python benchmarks/store/batch.py --model smollm2-135m --docs 4 --questions 16 --doc-tokens 2000

Prints one Markdown table; the two outputs are checked to hold the same texts (greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from ttft import make_document


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--questions", type=int, default=16, help="questions per document")
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kvo-batch-bench-")
    text = make_document(args.model, args.docs * args.doc_tokens)
    size = len(text) // args.docs
    docs = [text[i * size:(i + 1) * size] for i in range(args.docs)]
    inp = os.path.join(work, "in.jsonl")
    with open(inp, "w") as f:
        for q in range(args.questions):           # interleaved: the job's prefix grouping has work to do
            for d, doc in enumerate(docs):
                f.write(json.dumps({"custom_id": f"d{d}-q{q}", "method": "POST", "url": "/v1/completions",
                                    "body": {"prompt": f"{doc}\n\nQuestion {q}: what does line {q + 1} say?\nAnswer:",
                                             "max_tokens": args.max_tokens, "temperature": 0}}) + "\n")
    times, texts = {}, {}
    for name, flags in (("without a store", []), ("with --kv-store (empty at start)",
                                                  ["--kv-store", os.path.join(work, "store")])):
        out = os.path.join(work, f"out-{len(times)}.jsonl")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", "batch", inp, "-o", out, "-m", args.model,
                            "-t", str(args.threads), "--no-progress", *flags], capture_output=True, text=True)
        times[name] = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        print(r.stderr.strip().splitlines()[-1], file=sys.stderr)
        with open(out) as f:
            texts[name] = {(row := json.loads(line))["custom_id"]: row["response"]["body"]["choices"][0]["text"]
                           for line in f}
    a, b = texts.values()
    same = sum(a[k] == b[k] for k in a)
    n = args.docs * args.questions
    print(f"| {args.model}: {n} questions over {args.docs} documents of {args.doc_tokens} tokens, "
          f"{args.max_tokens} tokens each | total s |")
    print("|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.1f} |")
    base = times["without a store"]
    print(f"\nspeed-up {base / times['with --kv-store (empty at start)']:.1f}x; identical answers {same}/{n}")


if __name__ == "__main__":
    main()
