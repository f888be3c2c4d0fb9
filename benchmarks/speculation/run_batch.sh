#!/usr/bin/env bash
# Batched speculation: 4 sequences at 4K context decoded together, SmolLM2-135M, greedy, KV
# placed as in run.sh (host RAM budget a tenth of the batch's KV: 4 x 4096 tokens x 23 KiB =
# 368 MiB, so 37 MiB; the rest on disk), plain against --speculate self (gamma 4), side by side
# (`kvoffload bench`, interleaved, medians), with TriForce's selection (no recent window) and
# with the default draft cache (a 128-token recent window besides). Writes benchmarks/speculation/batch.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/../.."
kvoffload bench -m smollm2-135m -p 0 -n 64 -d 4096 -b 4 -r "${REPS:-2}" -t "${THREADS:-2}" \
  --config "disk:kv_host_budget=37MiB" \
  --config "disk-spec-triforce:kv_host_budget=37MiB,speculate=self,num_speculative_tokens=4,sparse_recent_tokens=0" \
  --config "disk-spec:kv_host_budget=37MiB,speculate=self,num_speculative_tokens=4" \
  -o benchmarks/speculation/batch
