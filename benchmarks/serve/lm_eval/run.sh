#!/usr/bin/env bash
# lm-eval's `local-completions` client against `kvoffload serve` (the embedded SmolLM2-135M) on
# kjv_lastword, a task defined on local files; then the same task scored in-process. Needs
# lm-eval (`pip install "lm-eval[api]"`; heavy, so not in CI) and the serve extra. Output: results/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=benchmarks/serve/lm_eval
PORT=${PORT:-8765}
python "$HERE/make_data.py" --tokenizer "$HERE/tokenizer"
python -m kvoffload.cli.main serve --port "$PORT" --served-model-name smollm2 --dtype float32 -q none & PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done
lm_eval --model local-completions \
  --model_args "model=smollm2,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$HERE/tokenizer,num_concurrent=4,max_retries=1,tokenized_requests=True" \
  --include_path "$HERE" --tasks kjv_lastword --output_path "$HERE/results" 2>&1 | tee "$HERE/results.txt"
python "$HERE/check_in_process.py" 2>&1 | tee -a "$HERE/results.txt"
