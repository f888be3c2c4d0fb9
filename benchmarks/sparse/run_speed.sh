#!/usr/bin/env bash
# Decode speed of the sparse policies at 1/16, SmolLM2-135M, 8K context, batch 1, side by side
# with dense kvoffload and llama.cpp (issue #6 targets), in RAM and with the KV on disk (host
# budget a tenth of the KV: 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 2 bytes = 23 KiB per
# token, 8K tokens = 184 MiB, so 18 MiB). Interleaved repetitions, medians; run on a quiet machine.
# Writes benchmarks/sparse/speed.{md,json,png}. THREADS (default 2), REPS (default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/sparse
CAL=$OUT/channels-smollm2-135m.json
[ -f $CAL ] || kvoffload calibrate -m smollm2-135m -o $CAL
kvoffload bench -m smollm2-135m -p 0 -n 32 -d 8159 -b 1 -r "${REPS:-3}" -t "${THREADS:-2}" --vs llama.cpp \
  --config "quest:sparse_policy=quest,sparse_budget=1/16" \
  --config "streaming:sparse_policy=streaming,sparse_budget=1/16" \
  --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
  --config "sparf:sparse_policy=sparf,sparse_budget=1/16" \
  --config "double_sparsity:sparse_policy=double_sparsity,sparse_budget=1/16,sparse_calibration=$CAL" \
  --config "quest-disk:sparse_policy=quest,sparse_budget=1/16,kv_host_budget=18MiB" \
  --config "dense-disk:kv_host_budget=18MiB" \
  -o $OUT/speed
