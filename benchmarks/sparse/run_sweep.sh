#!/usr/bin/env bash
# Accuracy of every sparse policy at budgets 1/4..1/32 against dense (issue #6), both shipped
# models, fp32 (so that the only difference from dense is the policy). Writes
# benchmarks/sparse/{sweep.jsonl,sweep.md,sweep.json,sweep.png}; resumable (rerun to continue,
# delete sweep.jsonl to start over). SmolLM2 can only do niah_single among the tasks, Qwen2.5-Coder
# passkey and the needle tasks (benchmarks/eval): those are the tasks swept, plus agreement.
# THREADS (default 1), SMOL_SAMPLES / QWEN_SAMPLES (default 2 / 2), LENGTHS (default 2k,4k,8k).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/sparse
T="${THREADS:-1}"
[ -f $OUT/channels-smollm2-135m.json ] || kvoffload calibrate -m smollm2-135m -o $OUT/channels-smollm2-135m.json -t "$T"
[ -f $OUT/channels-qwen2.5-coder-0.5b.json ] || kvoffload calibrate -m qwen2.5-coder-0.5b -o $OUT/channels-qwen2.5-coder-0.5b.json -t "$T"
kvoffload sweep niah_single,agreement -m smollm2-135m --dtype float32 -L "${LENGTHS:-2k,4k,8k}" \
  --samples "${SMOL_SAMPLES:-2}" --decode-tokens 32 --max-new-tokens 24 --sparse-calibration $OUT/channels-smollm2-135m.json -t "$T" -o $OUT > /dev/null
kvoffload sweep passkey,niah_multikey,agreement -m qwen2.5-coder-0.5b --dtype float32 -L "${LENGTHS:-2k,4k,8k}" \
  --samples "${QWEN_SAMPLES:-2}" --decode-tokens 32 --sparse-calibration $OUT/channels-qwen2.5-coder-0.5b.json -t "$T" -o $OUT > /dev/null
# Qwen past 8K: 16K, budget 1/16 only, one sample (passkey and agreement)
kvoffload sweep passkey,agreement -m qwen2.5-coder-0.5b --dtype float32 -L 16k --samples 1 --decode-tokens 32 \
  --budgets 1/16 --sparse-calibration $OUT/channels-qwen2.5-coder-0.5b.json -t "$T" -o $OUT > /dev/null
