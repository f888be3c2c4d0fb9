#!/usr/bin/env bash
# Self-speculative decoding (issue #7) against plain decoding with the same placement: a tenth of
# the context's KV in host RAM, the rest on disk (2 disk workers), SmolLM2-135M and
# Qwen2.5-Coder-0.5B, contexts 2K / 4K / 8K (capped by the model's 8192-token context), gamma
# 2 / 4 / 6 / 8, greedy and temperature 0.6, plus (SmolLM2) two draft-cache rebuild rules at gamma 4.
# Interleaved repetitions, medians; run on a quiet machine. Resumable (runs.jsonl).
# Writes benchmarks/speculation/{runs.jsonl,summary.md,summary.json,speedup.png}.
# THREADS (default 2), REPS (default 3 for SmolLM2, 2 for Qwen).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/speculation
# The main grid uses TriForce's own selection (no recent window: --sparse-recent-tokens 0).
kvoffload spec-bench -m smollm2-135m -t "${THREADS:-2}" -r "${REPS:-3}" --sparse-recent-tokens 0 -o $OUT
kvoffload spec-bench -m qwen2.5-coder-0.5b -t "${THREADS:-2}" -r "${REPS:-2}" --no-rebuild-variants \
  --sparse-recent-tokens 0 -o $OUT
# The default draft cache (a 128-token recent window kept besides the retrieved chunks), where
# TriForce's selection did worst (2K) and at 8K.
kvoffload spec-bench -m smollm2-135m -t "${THREADS:-2}" -r 2 -L 2k,8k --gammas 4,8 --no-rebuild-variants -o $OUT/recent
kvoffload spec-bench -m qwen2.5-coder-0.5b -t "${THREADS:-2}" -r 2 -L 2k,8k --gammas 4,8 --no-rebuild-variants -o $OUT/recent
# Lossless on the real model: fp32 weights and activations (-q none), greedy, every rep must give
# the plain tokens (in bf16 a verify pass rounds differently from a decode step, and 1-ulp logit
# ties then flip; see README.md).
kvoffload spec-bench -m smollm2-135m -t "${THREADS:-2}" -r 2 -L 2k,8k --gammas 4,8 --temperatures 0 \
  --no-rebuild-variants --dtype float32 -q none --sparse-recent-tokens 0 -o $OUT/fp32
# When is a draft cache stale? Long generations (512 tokens) at ~7.7K context, gamma 4, greedy:
# never rebuilt, rebuilt when 256 verified tokens were appended (the default), every 16
# verifications, or when acceptance over the last 4 verifications falls below 0.7.
kvoffload spec-bench -m smollm2-135m -t "${THREADS:-2}" -r 2 -L 8k --new-tokens 512 --gammas 4 \
  --rebuild-variants-only --sparse-recent-tokens 0 -o $OUT/rebuild
