#!/usr/bin/env bash
# Twelfth session: an AVX2-only CPU (AMD EPYC, no AVX-512). Regenerate with
#   bash benchmarks/avx2/run.sh STEP        (on a shared machine: /work/notes/bin/kvo-bench bash ...)
# STEP: kernels (attention alone, before / after, trees alternated), smollm2, qwen_8k, qwen_16k,
# qwen_16k_bf16, qwen_16k_rounds, kvquant_ram, kvquant_ram_rounds, kvquant_batch, kvquant_batch_rounds (TAG=_s13 on qwen_* /
# kvquant_ram*: a suffix for the files; *_rounds: one prefill per engine, --prefill-once). BASE: the tree before
# the AVX2 kernels (a git worktree of 51ce22f).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/avx2
ROOT=$PWD
BASE=${BASE:-/tmp/avx2-base}
T=${T:-2}
base_tree() {
  [ -d "$BASE" ] || git worktree add -f "$BASE" 51ce22f -q
}
case "${1:?step}" in
  kernels)   # decode attention alone over the host tier, SmolLM2's shape at 8K: before, after, twice
    base_tree
    for i in 1 2; do
      for tree in "$BASE" "$ROOT"; do
        echo "## tree $tree (round $i)"
        (cd "$tree" && KVOFFLOAD_CACHE=/tmp/avx2-cache-$(basename "$tree") python -m kvoffload.cli.main bench attention \
          --context 8192 --tiers host --kv-dtype bfloat16,int8,int4 -t "$T" 2>&1 | grep -E '^\| (bfloat16|int8|int4) \| host')
      done
    done | tee "$OUT/kernels.txt" ;;
  base_e2e)  # the tree before: SmolLM2 default (fp32 weights, portable attention)
    base_tree
    (cd "$BASE" && KVOFFLOAD_CACHE=/tmp/avx2-cache-base python -m kvoffload.cli.main bench -m smollm2-135m -p 0 -n 32 \
      -d 512,8176 -b 1 -r 2 -t "$T" -o "$ROOT/$OUT/base_smollm2") ;;
  smollm2)   # dense (auto: int4 weights, fp32) and sparse 1/16 beside llama.cpp, 512 / 2K / 8K
    kvoffload bench -m smollm2-135m -p 0 -n 32 -d 512,2048,8176 -b 1 -r 3 -t "$T" \
      --config "quest:sparse_policy=quest,sparse_budget=1/16" \
      --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
      --vs llama.cpp -o "$OUT/smollm2" ;;
  qwen_8k|qwen_16k)   # Qwen2.5-Coder-0.5B (auto: int8 weights, fp32), one depth a step: 12 / 37 minutes
    DEPTH=$([ "$1" = qwen_8k ] && echo 8176 || echo 16368)
    kvoffload bench -m qwen2.5-coder-0.5b -p 0 -n 32 -d "$DEPTH" -b 1 -r 2 -t "$T" \
      --config "quest:sparse_policy=quest,sparse_budget=1/16" \
      --config "shadowkv:sparse_policy=shadowkv,sparse_budget=1/16" \
      --vs llama.cpp -o "$OUT/$1${TAG:-}" ;;
  qwen_16k_bf16)   # Qwen at 16K with bf16 KV (a hooked layer since the sixteenth session) beside the default: ~40 minutes
    kvoffload bench -m qwen2.5-coder-0.5b -p 0 -n 32 -d 16368 -b 1 -r 2 -t "$T" \
      --config "dense-bf16:kv_dtype=bfloat16" \
      --config "quest-bf16:sparse_policy=quest,sparse_budget=1/16,kv_dtype=bfloat16" \
      --vs llama.cpp -o "$OUT/qwen_16k_bf16${TAG:-}" ;;
  qwen_16k_rounds)   # the same engines, one prefill each, 8 alternating rounds of 32 tokens (--prefill-once): ~16 minutes
    kvoffload bench -m qwen2.5-coder-0.5b -p 0 -n 32 -d 16368 -b 1 -r 8 -t "$T" --prefill-once \
      --config "dense-bf16:kv_dtype=bfloat16" \
      --config "quest-bf16:sparse_policy=quest,sparse_budget=1/16,kv_dtype=bfloat16" \
      --vs llama.cpp -o "$OUT/qwen_16k_rounds${TAG:-}" ;;
  kvquant_ram_rounds)   # issue #14 in RAM at 8K, one prefill each, 8 alternating rounds of 16 tokens: ~5 minutes
    kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 8 -t "$T" --prefill-once \
      --config "bf16:kv_dtype=bfloat16" --config "bf16-blocks:kv_dtype=bfloat16,kv_host_budget=4GiB" \
      --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" -o "$OUT/kvquant_ram_8k_rounds${TAG:-}" ;;
  kvquant_ram)   # issue #14: compressed KV in RAM at 8K against bf16 and fp32 KV
    kvoffload bench -m smollm2-135m -p 0 -n 16 -d 8176 -b 1 -r 3 -t "$T" \
      --config "bf16:kv_dtype=bfloat16" --config "bf16-blocks:kv_dtype=bfloat16,kv_host_budget=4GiB" \
      --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" -o "$OUT/kvquant_ram_8k${TAG:-}" ;;
  kvquant_batch_rounds) # issue #14: batch 16 x 4K, one prefill per engine, 6 alternating rounds: ~22 minutes
    kvoffload bench -m smollm2-135m -p 0 -n 8 -d 4088 -b 16 -r 6 -t "$T" --prefill-once \
      --config "bf16:kv_dtype=bfloat16" --config "bf16-blocks:kv_dtype=bfloat16,kv_host_budget=8GiB" \
      --config "int8:kv_dtype=int8" --config "int4:kv_dtype=int4" -o "$OUT/kvquant_batch16_4k_rounds${TAG:-}" ;;
  kvquant_batch) # issue #14: batch 16 x 4K, int4 against bf16: ~28 minutes on 2 AVX2 cores
    kvoffload bench -m smollm2-135m -p 0 -n 8 -d 4088 -b 16 -r 2 -t "$T" \
      --config "bf16-blocks:kv_dtype=bfloat16,kv_host_budget=8GiB" --config "int8:kv_dtype=int8" \
      --config "int4:kv_dtype=int4" -o "$OUT/kvquant_batch16_4k" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
