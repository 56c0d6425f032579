#!/usr/bin/env bash
# Regenerates results/export/: what `smartfed export --to peft --distill` keeps of the routed score (issue 18,
# part 2). For each composite it trains the routed SmartFed run of the default benchmark setting, seed 0 (the
# COMMON flags of results/claims/regenerate.sh with --method smartfed --learning_rate 5e-3: the same run as
# runs/claims/<composite>/smartfed/seed0, score for score), then exports it at rank R (default 16) with the
# default distillation, which scores, on the run's 220 held-out items in one process: the base model, the
# routed model, the static SVD export (the distillation's start) and the distilled export.
#
# Usage: results/export/regenerate.sh [json_math|spanish_math ...]   (default: both)
#        RANK=8 results/export/regenerate.sh   (another export rank; R <= 16 is the issue's bound)
#        DISTILL="--distill_steps 120"         (extra --distill_* flags; the defaults are what results/export/README.md measured)
#
# Time on 2 CPU cores with nothing else running: ~5 min per routed run (evaluated every round, as in
# results/claims), ~2 min to generate the routed answers to 96 training prompts, ~4 min for 60 distillation steps,
# ~4 x 35 s to score the four models. A finished run is reused, a cut one resumed. Run folders and exports go to
# runs/export/ (not committed); each export's report (settings, KL before/after, the four scores) is copied to
# results/export/records/ and export.md is built from there.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
SMARTFED=${SMARTFED:-.venv/bin/smartfed}
PYTHON=${PYTHON:-.venv/bin/python}
RANK=${RANK:-16}
read -r -a EXTRA <<< "${DISTILL:-}"
COMPOSITES=("${@:-json_math spanish_math}")
RECORDS=results/export/records
declare -A POOL=([json_math]=zoo:json,zoo:math [spanish_math]=zoo:spanish,zoo:math)
mkdir -p "$RECORDS" runs/export/exports

for COMP in ${COMPOSITES[@]}; do
  RUN=runs/export/$COMP
  # The demo's setting, as results/claims/regenerate.sh's COMMON (seed 0).
  COMMON=(--model_name_or_path smollm2-135m --lora_pool "${POOL[$COMP]}" --task "$COMP"
    --num_clients 4 --sample_clients 2 --num_rounds 5 --local_steps 12 --batch_size 8
    --num_train 300 --num_test 220 --max_length 96 --max_new_tokens 16 --eval_every 1
    --topk_experts 8 --lora_rank 16 --lora_alpha 32 --weight_decay 0.01 --client_threads 1 --seed 0)
  if [ ! -f "$RUN/summary.json" ]; then
    if [ -f "$RUN/config.json" ]; then
      $SMARTFED run --resume "$RUN"
    else
      $SMARTFED run --method smartfed --learning_rate 5e-3 "${COMMON[@]}" --output_dir "$RUN"
    fi
  fi
  OUT=runs/export/exports/$COMP-r$RANK
  $SMARTFED export "$RUN" --to peft --rank "$RANK" --distill "${EXTRA[@]}" --output "$OUT" --overwrite
  cp "$OUT/smartfed_export.json" "$RECORDS/$COMP-r$RANK.json"
done

$PYTHON results/export/table.py "$RECORDS" > results/export/export.md
cat results/export/export.md
