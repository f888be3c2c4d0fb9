#!/usr/bin/env bash
# Regenerates benchmarks/kvquant/*: compressed KV blocks (--kv-dtype int8 / int4, issue #14)
# beside bf16 KV, on SmolLM2-135M (3 KV heads x 64 dims, 30 layers). One step per call, each
# under 10 minutes on a 2-core CPU (on a shared machine: /work/notes/bin/kvo-bench bash run.sh STEP);
# no step: all of them in turn. The eval steps and llama.cpp append per sample and resume, so a
# step cut off by its timeout is continued by running it again.
#   capacity      the context a fixed budget holds, per KV dtype (the layout's arithmetic)
#   attention     decode attention alone per tier (host RAM, disk workers), bf16 / int8 / int4
#   ram_8k        decode, KV in RAM, 1 x 8K: bf16 (dense store, block store) vs int8 / int4
#   disk_8k       decode, KV mostly on disk (host budget a tenth of each run's KV), 1 x 8K
#   disk_8k_inproc  the same, the disk read in this process (--disk-workers 0)
#   batch16_4k    decode, 16 x 4K, KV in RAM: bf16 (dense store, block store) vs int8 / int4
#   eval_bf16 eval_int8 eval_int4 eval_blocks eval_int8_g32 eval_int4_g32 eval_floor
#                 kvoffload eval (ppl, agreement / KL against bf16 KV, niah_single), 2K-8K x 3
#   qwen_bf16 qwen_int8 qwen_int4
#                 the same on Qwen2.5-Coder-0.5B, 2K-8K x 2 (16K does not fit a 10-minute step)
#   llamacpp      llama.cpp's f16 / q8_0 / q4_0 KV on the same ppl passages: ppl and speed
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/kvquant
T=${THREADS:-2}
LIMIT=${LIMIT:-570}                         # seconds per step (resumable steps continue on a rerun)
EVAL=(-m smollm2-135m -L 2k,4k,8k --samples 3 -t "$T" --prefill-chunk 512 -o "$OUT/eval_smollm2")
QWEN=(-m qwen2.5-coder-0.5b -L 2k,4k,8k --samples 2 -t "$T" --prefill-chunk 512 -o "$OUT/eval_qwen")

step() {
  case "$1" in
  capacity) python "$OUT/capacity.py" > "$OUT/capacity.md" ;;
  attention) timeout "$LIMIT" kvoffload bench attention --context 8192 -b 1 -r 3 -t "$T" --peak-size 256MiB \
      --kv-dtype bfloat16,int8,int4 -o "$OUT/attention" ;;
  ram_8k) timeout "$LIMIT" kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 3 -t "$T" \
      --config "bf16-blocks:kv_host_budget=4GiB" --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" \
      -o "$OUT/ram_8k" ;;
  # KV of one 8K sequence: bf16 180 MiB, int8 104 MiB, int4 59 MiB; the host budget a tenth of each
  # (the sinks and the recent window stay in RAM)
  disk_8k) timeout "$LIMIT" kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 3 -t "$T" \
      --config "bf16-disk:kv_host_budget=18MiB" --config "int8-disk:kv_dtype=int8,kv_host_budget=11MiB" \
      --config "int4-disk:kv_dtype=int4,kv_host_budget=6MiB" -o "$OUT/disk_8k" ;;
  batch16_4k) timeout "$LIMIT" kvoffload bench -m smollm2-135m -p 0 -n 8 -d 4088 -b 16 -r 2 -t "$T" \
      --config "bf16-blocks:kv_host_budget=8GiB" --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" \
      -o "$OUT/batch16_4k" ;;
  # the disk read and attended in this process (no worker round trips)
  disk_8k_inproc) timeout "$LIMIT" kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 3 -t "$T" \
      --config "bf16-disk:kv_host_budget=18MiB,disk_workers=0" \
      --config "int8-disk:kv_dtype=int8,kv_host_budget=11MiB,disk_workers=0" \
      --config "int4-disk:kv_dtype=int4,kv_host_budget=6MiB,disk_workers=0" -o "$OUT/disk_8k_inproc" ;;
  eval_bf16) timeout "$LIMIT" kvoffload eval ppl,niah_single "${EVAL[@]}" --kv-dtype bfloat16 --label bf16 > /dev/null ;;
  eval_int8|eval_int4) kv=${1#eval_}
      timeout "$LIMIT" kvoffload eval ppl,agreement,niah_single "${EVAL[@]}" --kv-dtype "$kv" \
        --reference kv_dtype=bfloat16 --label "$kv" > /dev/null ;;
  eval_blocks) timeout "$LIMIT" kvoffload eval agreement "${EVAL[@]}" --kv-dtype bfloat16 --kv-host-budget 4GiB \
      --reference kv_dtype=bfloat16 --label bf16-blocks > /dev/null ;;
  # the noise floor of the agreement metric: the model in fp32 against the same bf16 reference
  eval_floor) timeout "$LIMIT" kvoffload eval agreement "${EVAL[@]}" --dtype float32 \
      --reference dtype=bfloat16 --reference kv_dtype=bfloat16 --label fp32-compute > /dev/null ;;
  eval_int8_g32|eval_int4_g32) kv=${1#eval_}; kv=${kv%_g32}
      timeout "$LIMIT" kvoffload eval ppl,agreement "${EVAL[@]}" --kv-dtype "$kv" --kv-group-size 32 \
        --reference kv_dtype=bfloat16 --label "$kv-g32" > /dev/null ;;
  # Qwen2.5-Coder-0.5B (2 KV heads x 64 dims, 7 query heads per KV head), 2K-8K x 2 samples
  qwen_bf16) timeout "$LIMIT" kvoffload eval ppl,niah_single "${QWEN[@]}" --kv-dtype bfloat16 --label bf16 > /dev/null ;;
  qwen_int8|qwen_int4) kv=${1#qwen_}
      timeout "$LIMIT" kvoffload eval ppl,agreement,niah_single "${QWEN[@]}" --kv-dtype "$kv" \
        --reference kv_dtype=bfloat16 --label "$kv" > /dev/null ;;
  llamacpp) timeout "$LIMIT" python "$OUT/llamacpp.py" -m smollm2-135m -L 2k,4k,8k --samples 3 -t "$T" \
      -o "$OUT/llamacpp_smollm2" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then
  set -- capacity attention ram_8k disk_8k disk_8k_inproc batch16_4k eval_bf16 eval_int8 eval_int4 eval_blocks \
    eval_int8_g32 eval_int4_g32 eval_floor qwen_bf16 qwen_int8 qwen_int4 llamacpp
fi
for s in "$@"; do step "$s" || echo "step $s: exit $? (an eval / llamacpp step resumes when run again)" >&2; done
