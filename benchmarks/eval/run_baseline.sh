#!/usr/bin/env bash
# Dense baseline of `kvoffload eval` (issue #4): SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct,
# default engine settings, 1K/2K/4K/8K, every accuracy task plus perplexity. Writes
# benchmarks/eval/{samples.jsonl,results.md,results.json,results.png,README.md}.
# Resumable: rerunning skips the samples already in samples.jsonl (delete it to start over).
# About an hour on a 2-core CPU (SmolLM2 ~17 min, Qwen ~45 min). SMOL_SAMPLES / QWEN_SAMPLES change
# the samples per cell (default 5). THREADS (default 1): on a 2-core machine
# shared with other jobs one thread is faster than two (spinning OpenMP threads); use 2 on an idle one.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/eval
TASKS=passkey,niah_single,niah_multikey,niah_multivalue,vt,cwe,ppl
kvoffload eval "$TASKS" -m smollm2-135m -L 1k,2k,4k,8k --samples "${SMOL_SAMPLES:-5}" -t "${THREADS:-1}" -o "$OUT" > /dev/null
kvoffload eval "$TASKS" -m qwen2.5-coder-0.5b -L 1k,2k,4k,8k --samples "${QWEN_SAMPLES:-5}" -t "${THREADS:-1}" -o "$OUT" > /dev/null
python benchmarks/eval/make_readme.py "$OUT"
