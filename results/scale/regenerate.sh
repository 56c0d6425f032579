#!/usr/bin/env bash
# Regenerates results/scale/scale.md: SmartFed on Flower's simulation engine with 10, 50 and 100 clients
# (10 % sampled per round, 4 rounds, 8 local steps; a tiny random Llama and a pool of two tiny PEFT adapters
# made on the spot, task arith), side by side: peak memory of the run's whole process tree (driver + Ray
# workers), seconds per round and the share of a round spent outside client training (Flower, Ray,
# serialisation, aggregation). Targets: memory flat in the number of clients; <= 20 % outside training at
# 100 clients. What it runs: benchmarks/scale.py (its docstring says how each figure is measured).
# Needs `make install` (or `make test`)'s .venv; nothing is downloaded. Time on the project's 2-core CPU
# machine: about 5 minutes when the machine is otherwise idle (three runs of ~1-1.5 min each: Ray's
# start-up, round 1 building each worker's model, 3 more rounds). Run it on an idle machine: the seconds
# per round and the overhead share are timings (the memory is not).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" benchmarks/scale.py --clients 10,50,100 --sample-fraction 0.1 --rounds 4 --local-steps 8 \
  --output results/scale/scale.md
