#!/usr/bin/env bash
# Regenerates benchmarks/kvquant/*: compressed KV blocks (--kv-dtype int8 / int4, issue #14)
# beside bf16 KV, on SmolLM2-135M (3 KV heads x 64 dims, 30 layers). Each command stays under
# 10 minutes on a 2-core CPU; run each through /work/notes/bin/kvo-bench on a shared machine.
#   capacity   : the context a fixed host budget holds, per KV dtype (from the block layout)
#   attention  : decode attention per tier (host RAM, disk workers), bf16 / int8 / int4 side by side
#   ram_8k     : decode, KV in RAM, 1 x 8K context: bf16 (dense store) vs int8 / int4 (block store)
#   disk_8k    : decode, KV mostly on disk (host budget a tenth of each run's KV), 1 x 8K
#   batch16_4k : decode, 16 x 4K, KV in RAM
#   eval       : perplexity, agreement / KL against bf16 KV, niah_single (SmolLM2, 2K-8K)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/kvquant
T=${THREADS:-2}
python benchmarks/kvquant/capacity.py > "$OUT/capacity.md"
kvoffload bench attention --context 8192 -b 1 -r 3 -t "$T" --peak-size 256MiB --kv-dtype bfloat16,int8,int4 -o "$OUT/attention"
kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 2 -t "$T" \
  --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" -o "$OUT/ram_8k"
# KV of one 8K sequence: bf16 184 MiB, int8 106 MiB (slots of 7104 bytes), int4 60 MiB; the host
# budget a tenth of each (the sinks and the recent window stay in RAM)
kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 2 -t "$T" \
  --config "bf16-disk:kv_host_budget=18MiB" --config "int8-disk:kv_dtype=int8,kv_host_budget=11MiB" \
  --config "int4-disk:kv_dtype=int4,kv_host_budget=6MiB" -o "$OUT/disk_8k"
kvoffload bench -m smollm2-135m -p 0 -n 8 -d 4088 -b 16 -r 1 -t "$T" \
  --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" -o "$OUT/batch16_4k"
for kv in int8 int4; do
  kvoffload eval ppl,agreement,niah_single -m smollm2-135m -L 2k,4k,8k --samples 3 -t "$T" \
    --kv-dtype "$kv" --reference kv_dtype=bfloat16 --label "$kv" -o "$OUT/eval" > /dev/null
done
kvoffload eval ppl,niah_single -m smollm2-135m -L 2k,4k,8k --samples 3 -t "$T" --label bf16 -o "$OUT/eval"
