"""Time to first token of a second question about the same document, in a new process, against
the first (a cold store): kvoffload with ``--kv-store`` and, beside it, llama-cpp-python with
``LlamaDiskCache`` on the same prompts (the same GGUF file). Every run is a fresh process; model
load time is not part of a TTFT (both engines measure from the request to the first token).

    python benchmarks/store/ttft.py --model smollm2-135m --tokens 8000 --reps 3 [--llama-cpp GGUF]

``--engines kvoffload`` or ``--engines llama.cpp`` runs one side only (a long document's runs
split into two commands).

Prints one Markdown table (medians over --reps, each rep with an empty store) and the raw runs
as JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

QUESTIONS = ["\n\nQuestion: who is named first in the text above?", "\n\nQuestion: what is the last verse about?"]


def make_document(model: str, tokens: int) -> str:
    """KJV verses cut at ``tokens`` tokens of the model's tokenizer."""
    from kvoffload.api import LLM
    from kvoffload.eval.corpora import kjv_verses

    llm = LLM(model)
    text, verses = "", iter(kjv_verses())
    while len(llm.encode(text)) < tokens:
        text += " ".join(next(verses) for _ in range(50)) + " "
    ids = llm.encode(text)[:tokens]
    return llm.tokenizer.decode(ids)


def kvo_ttft(model: str, prompt_file: str, store: str | None, extra: list[str]) -> dict:
    flags = ["--kv-store", store] if store else []
    r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", "generate", "-m", model, "-f", prompt_file,
                        "-n", "1", "--json", *flags, *extra], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ttft_s": out["ttft_s"], "prompt_tokens": out["prompt_tokens"], "reused_tokens": out["reused_tokens"]}


LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama, LlamaDiskCache
gguf, prompt_file, cache_dir, threads, n_ctx = sys.argv[1:6]
prompt = open(prompt_file).read()
llm = Llama(model_path=gguf, n_ctx=int(n_ctx), n_threads=int(threads), n_batch=512, verbose=False)
llm.set_cache(LlamaDiskCache(cache_dir=cache_dir, capacity_bytes=8 << 30))
ids = llm.tokenize(prompt.encode())
t0 = time.perf_counter()
out = llm.create_completion(ids, max_tokens=1, temperature=0)
print(json.dumps({"ttft_s": time.perf_counter() - t0, "prompt_tokens": len(ids)}))
"""


def llama_ttft(gguf: str, prompt_file: str, cache: str, threads: int, n_ctx: int) -> dict:
    r = subprocess.run([sys.executable, "-c", LLAMA_CPP, gguf, prompt_file, cache, str(threads), str(n_ctx)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8000, help="document length in tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", default=None, help="GGUF file for llama-cpp-python beside it (omit: skip)")
    ap.add_argument("--engines", default="kvoffload,llama.cpp", help="which sides to run (comma-separated)")
    ap.add_argument("--extra", default="", help="more kvoffload generate flags, e.g. '--kv-host-budget 64MiB'")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kvo-store-bench-")
    doc = make_document(args.model, args.tokens)
    files = []
    for i, q in enumerate(QUESTIONS):
        files.append(os.path.join(work, f"q{i}.txt"))
        with open(files[-1], "w") as f:
            f.write(doc + q)
    extra = ["-t", str(args.threads), *args.extra.split()]
    rows: dict[str, list[float]] = {}
    engines = args.engines.split(",")
    for rep in range(args.reps):
        if "kvoffload" in engines:
            r = kvo_ttft(args.model, files[0], None, extra)
            print(json.dumps({"engine": "kvoffload no store", "rep": rep, **r}), file=sys.stderr, flush=True)
            rows.setdefault("kvoffload no store", []).append(r["ttft_s"])
            store = os.path.join(work, f"store{rep}")
            for i, name in enumerate(("kvoffload first", "kvoffload second")):
                r = kvo_ttft(args.model, files[i], store, extra)
                print(json.dumps({"engine": name, "rep": rep, **r}), file=sys.stderr, flush=True)
                rows.setdefault(name, []).append(r["ttft_s"])
        if args.llama_cpp and "llama.cpp" in engines:
            cache = os.path.join(work, f"llama{rep}")
            for i, name in enumerate(("llama.cpp first", "llama.cpp second")):
                r = llama_ttft(args.llama_cpp, files[i], cache, args.threads, args.tokens + 512)
                print(json.dumps({"engine": name, "rep": rep, **r}), file=sys.stderr, flush=True)
                rows.setdefault(name, []).append(r["ttft_s"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"| engine ({args.model}, {args.tokens}-token document, {args.threads} threads) | first question TTFT s "
          f"| second question TTFT s (new process) | second / first |")
    print("|---|---|---|---|")
    for eng in ("kvoffload", "llama.cpp"):
        if f"{eng} first" in med:
            a, b = med[f"{eng} first"], med[f"{eng} second"]
            print(f"| {eng} | {a:.2f} | {b:.3f} | 1/{a / b:.0f} |")
    if "kvoffload no store" in med:
        print(f"\nkvoffload first question without a store (no block writes): {med['kvoffload no store']:.2f} s")


if __name__ == "__main__":
    main()
