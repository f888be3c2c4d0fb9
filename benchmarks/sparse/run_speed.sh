#!/usr/bin/env bash
# Decode speed of the sparse policies at 1/16, batch 1, side by side with dense kvoffload (issue
# #20 targets), in RAM and with the KV on disk (host budget a tenth of the 8K KV: SmolLM2 has 30
# layers x 3 KV heads x 64 dims x 2 (K, V) x 2 bytes = 23 KiB per token, 8K tokens = 184 MiB,
# so 18 MiB). Interleaved repetitions, medians; run on a quiet machine.
#   SmolLM2-135M at 2K and 8K (its context limit)       -> benchmarks/sparse/speed.{md,json,png}
#   Qwen2.5-Coder-0.5B at 2K, 8K and 16K                 -> benchmarks/sparse/speed_qwen.{md,json,png}
# THREADS (default 2), REPS (default 3; Qwen: QWEN_REPS, default 2), PEERS (default: llama.cpp
# when llama-cpp-python is installed; see benchmarks/README.md for its build).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/sparse
CAL=$OUT/channels-smollm2-135m.json
[ -f $CAL ] || kvoffload calibrate -m smollm2-135m -o $CAL
PEERS="${PEERS-$(python -c 'import llama_cpp' 2>/dev/null && echo llama.cpp || true)}"
VS=(); [ -n "$PEERS" ] && VS=(--vs "$PEERS")
kvoffload bench -m smollm2-135m -p 0 -n 32 -d 2048,8159 -b 1 -r "${REPS:-3}" -t "${THREADS:-2}" "${VS[@]}" \
  --config "quest:sparse_policy=quest,sparse_budget=1/16" \
  --config "streaming:sparse_policy=streaming,sparse_budget=1/16" \
  --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
  --config "sparf:sparse_policy=sparf,sparse_budget=1/16" \
  --config "double_sparsity:sparse_policy=double_sparsity,sparse_budget=1/16,sparse_calibration=$CAL" \
  --config "quest-disk:sparse_policy=quest,sparse_budget=1/16,kv_host_budget=18MiB" \
  --config "shadowkv-disk:sparse_policy=shadowkv,sparse_budget=1/16,kv_host_budget=18MiB" \
  --config "dense-disk:kv_host_budget=18MiB" \
  -o $OUT/speed
kvoffload bench -m qwen2.5-coder-0.5b -p 0 -n 32 -d 2048,8159,16352 -b 1 -r "${QWEN_REPS:-2}" -t "${THREADS:-2}" "${VS[@]}" \
  --config "quest:sparse_policy=quest,sparse_budget=1/16" \
  --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
  --config "sparf:sparse_policy=sparf,sparse_budget=1/16" \
  -o $OUT/speed_qwen
