"""A batch of questions over a few documents (``kvoffload batch``, OpenAI batch format): total
wall time and prompt tokens prefilled with prefix sharing between live sequences (the default),
with an empty ``--kv-store`` too or instead, against the same batch with neither
(``--no-prefix-sharing``); each run starts a new process, so each includes the model load.

    python benchmarks/store/batch.py --model smollm2-135m --docs 4 --questions 16 --doc-tokens 2000

Prints one Markdown table; each run's answers are compared with the first's (greedy).
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
    runs = {"neither (--no-prefix-sharing, no store)": ["--no-prefix-sharing"],
            "prefix sharing (default)": [],
            "--kv-store (empty at start), --no-prefix-sharing": ["--no-prefix-sharing", "--kv-store",
                                                                 os.path.join(work, "store-a")],
            "prefix sharing and --kv-store (empty at start)": ["--kv-store", os.path.join(work, "store-b")]}
    times, texts, prefilled = {}, {}, {}
    for name, flags in runs.items():
        out = os.path.join(work, f"out-{len(times)}.jsonl")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", "batch", inp, "-o", out, "-m", args.model,
                            "-t", str(args.threads), "--no-progress", *flags], capture_output=True, text=True)
        times[name] = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        print(name + ": " + " | ".join(r.stderr.strip().splitlines()[-3:]), file=sys.stderr)
        with open(out) as f:
            rows = [json.loads(line) for line in f]
        if any(r["response"]["status_code"] != 200 for r in rows):
            raise SystemExit(f"{name}: a request failed: {next(r for r in rows if r['response']['status_code'] != 200)}")
        texts[name] = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in rows}
        usage = [r["response"]["body"]["usage"] for r in rows]
        prefilled[name] = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    n = args.docs * args.questions
    base_name = next(iter(runs))
    base, base_texts = times[base_name], texts[base_name]
    print(f"| {args.model}: {n} questions over {args.docs} documents of {args.doc_tokens} tokens, "
          f"{args.max_tokens} tokens each | total s | prompt tokens prefilled | speed-up | answers as the first row's |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        same = sum(texts[name][k] == base_texts[k] for k in base_texts)
        print(f"| {name} | {t:.1f} | {prefilled[name]} | {base / t:.1f}x | {same}/{n} |")


if __name__ == "__main__":
    main()
