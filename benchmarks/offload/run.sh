#!/usr/bin/env bash
# Regenerates benchmarks/offload/*: decode attention per tier vs measured peaks, and the
# end-to-end offloaded job (KV >= 10x the host budget) vs the same job in memory.
# Run on a quiet machine (nothing else using the cores or the disk).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/offload
THREADS=${THREADS:-2}
kvoffload bench attention --context 8192 -b 4 -r 5 -t "$THREADS" -o "$OUT/attention"
kvoffload bench attention --context 8192 -b 4 -r 5 -t "$THREADS" --disk-workers 1 --tiers disk -o "$OUT/attention_1worker"
kvoffload bench offload --context 4096 -b 4 -n 32 --kv-host-budget 32MiB -t "$THREADS" -o "$OUT/offload_smollm2"
