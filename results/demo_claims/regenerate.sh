#!/usr/bin/env bash
# Regenerates results/demo_claims/: the paper's cost claims (seed 001) measured on the demo runs, SmartFed
# (the default: rank router, K = 8 of 16, no EEQA) against FedIT, 3 seeds per composite, every round evaluated.
# Reads the run folders that results/demo_json_math/regenerate.sh and results/demo_spanish_math/regenerate.sh
# leave in runs/ (run those first: 56 + 45 min on 2 CPU cores); this step takes seconds.
# Only SmartFed and FedIT ran there, so "the best baseline" is FedIT and the 10 %-data and EEQA rows are absent:
# results/claims/regenerate.sh is the full table (every method, ~4 h per composite).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=runs/demo_claims
rm -rf "$ROOT"
declare -A RUNS=([json_math]=runs/demo [spanish_math]=runs/demo_spanish_math)
for COMP in json_math spanish_math; do
  for SYSTEM in smartfed fedit; do
    mkdir -p "$ROOT/$COMP/$SYSTEM"
    for SEED in 0 1 2; do
      ln -s "$PWD/${RUNS[$COMP]}/seed$SEED/$SYSTEM" "$ROOT/$COMP/$SYSTEM/seed$SEED"
    done
  done
done
.venv/bin/python -m smartfed.claims "$ROOT" --output results/demo_claims
