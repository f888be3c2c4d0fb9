#!/usr/bin/env bash
# In-RAM decode speed of the sparse policies at 1/16 against dense kvoffload, batch 1 (issue #20's
# "sparse never slower than dense at any context >= 2K"; Qwen at 16K >= 1.35x dense), each model
# in one `kvoffload bench` run (interleaved repetitions, medians; run on a quiet machine; ~9 min for
# SmolLM2, ~19 min for Qwen, whose 16K prefill takes ~110 s per engine and repetition):
#   SmolLM2-135M at 2K and 8K            -> benchmarks/sparse/speed_ram.{md,json,png}
#   Qwen2.5-Coder-0.5B at 16K, with llama.cpp (llama-cpp-python: benchmarks/README.md)
#                                        -> benchmarks/sparse/speed_ram_qwen.{md,json,png}
# THREADS (default 2), REPS (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/sparse
CAL=$OUT/channels-smollm2-135m.json
[ -f $CAL ] || kvoffload calibrate -m smollm2-135m -o $CAL
kvoffload bench -m smollm2-135m -p 0 -n 32 -d 2048,8159 -b 1 -r "${REPS:-2}" -t "${THREADS:-2}" \
  --config "quest:sparse_policy=quest,sparse_budget=1/16" \
  --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
  --config "sparf:sparse_policy=sparf,sparse_budget=1/16" \
  --config "double_sparsity:sparse_policy=double_sparsity,sparse_budget=1/16,sparse_calibration=$CAL" \
  --config "streaming:sparse_policy=streaming,sparse_budget=1/16" \
  -o $OUT/speed_ram
kvoffload bench -m qwen2.5-coder-0.5b -p 0 -n 32 -d 16352 -b 1 -r "${REPS:-2}" -t "${THREADS:-2}" \
  --config "quest:sparse_policy=quest,sparse_budget=1/16" \
  --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
  --vs llama.cpp -o $OUT/speed_ram_qwen
