#!/usr/bin/env bash
# Regenerates results/wire_dtype/: what `--wire_dtype bfloat16` (every state crosses the wire in bfloat16,
# both ways) does to the scores against the float32 default, for SmartFed and FedIT on json_math and
# spanish_math, 3 seeds, in the demo's setting. The float32 runs are those of results/claims/records (run
# results/claims/regenerate.sh first, or use its committed records); this runs the bfloat16 ones.
# Needs `make demo`'s install. Time on 2 CPU cores: 12 runs, about 55 min; the comparison itself takes
# seconds (PARTS=none: only the tables, from the committed records).
# The run records behind table.md (2026-12-04) were never committed (.gitignore's runs/ pattern matched
# results/wire_dtype/runs/); results/wire_dtype/records/ is filled by the next full regeneration.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false
SMARTFED=${SMARTFED:-.venv/bin/smartfed}
PYTHON=${PYTHON:-.venv/bin/python}
PARTS=${PARTS:-runs}  # PARTS=none: only the tables, from the committed records
declare -A POOL=([json_math]=zoo:json,zoo:math [spanish_math]=zoo:spanish,zoo:math)
for COMP in json_math spanish_math; do
  OUT=runs/wire_dtype/$COMP
  COMMON=(--model_name_or_path smollm2-135m --lora_pool "${POOL[$COMP]}" --task "$COMP"
    --num_clients 4 --sample_clients 2 --num_rounds 5 --local_steps 12 --batch_size 8
    --num_train 300 --num_test 220 --max_length 96 --max_new_tokens 16 --eval_every 1
    --topk_experts 8 --lora_rank 16 --lora_alpha 32 --weight_decay 0.01 --client_threads 1 --seed 0
    --wire_dtype bfloat16)
  if [ "$PARTS" = runs ]; then
    $SMARTFED compare --methods smartfed --learning_rate 5e-3 --seeds 3 "${COMMON[@]}" --output_dir "$OUT"
    $SMARTFED compare --methods fedit --learning_rate 2e-3 --seeds 3 "${COMMON[@]}" --output_dir "$OUT"
  fi
done
for DIR in runs/wire_dtype/*/*/seed*; do  # the records the comparison reads, committed
  [ -f "$DIR/summary.json" ] || continue
  DEST=results/wire_dtype/records/${DIR#runs/wire_dtype/}
  mkdir -p "$DEST"
  cp "$DIR/config.json" "$DIR/summary.json" "$DIR/metrics.jsonl" "$DEST/"
done
{
  echo "# The bfloat16 wire against float32 (the default): the demo's setting, 220 held-out items, 3 seeds"
  for COMP in json_math spanish_math; do
    echo
    echo "## $COMP"
    for SYSTEM in smartfed fedit; do
      echo
      $PYTHON benchmarks/variants.py "${SYSTEM}_float32=results/claims/records/$COMP/$SYSTEM" \
        "${SYSTEM}_bfloat16=results/wire_dtype/records/$COMP/$SYSTEM" --reference "${SYSTEM}_float32"
    done
  done
} > results/wire_dtype/table.md.tmp
mv results/wire_dtype/table.md.tmp results/wire_dtype/table.md
cat results/wire_dtype/table.md
