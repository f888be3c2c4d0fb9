#!/usr/bin/env bash
# The A/B of unpadded disk slots (eleventh session): two source trees alternated, each a
# `kvoffload bench` run of bf16 and int8 KV on disk (in-process reads, host budget a tenth of
# each run's KV), so the int8 / bf16 ratio is measured pairwise inside each run.
#   git worktree add /tmp/before <rev-before>; git worktree add /tmp/after <rev-after>
#   BEFORE=/tmp/before AFTER=/tmp/after bash benchmarks/kvquant/unpadded/ab.sh
#   MODEL=qwen2.5-coder-0.5b BF=10MiB I8=6MiB BEFORE=... AFTER=... bash benchmarks/kvquant/unpadded/ab.sh
set -u
OUT=${OUT:-.}
for round in 1 2; do
  for side in before after; do
    tree=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
    echo "== $side round $round"
    PYTHONPATH="$tree" timeout 600 python -m kvoffload.cli.main bench -m "${MODEL:-smollm2-135m}" -p 0 -n 16 \
      -d "${CTX:-8176}" -b 1 -r 3 -t 2 \
      --config "bf16-disk:kv_host_budget=${BF:-18MiB},disk_workers=0" \
      --config "int8-disk:kv_dtype=int8,kv_host_budget=${I8:-11MiB},disk_workers=0" \
      -o "$OUT/${MODEL:-smollm2}_${side}_$round" | grep -A3 "^| test"
  done
done
