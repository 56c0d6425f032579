#!/usr/bin/env bash
# One prepared GPU check: the `gpu` tests and the GPU benchmarks, every output under OUTDIR.
#
# Usage:
#   scripts/gpu_check.sh OUTDIR               # on a CUDA GPU: an estimated 4-5 minutes on one H100 (never
#                                             # run on a GPU yet); the steps' timeouts add up to 8 minutes
#   scripts/gpu_check.sh OUTDIR --cpu-smoke   # the same steps on the CPU with tiny settings (< 2 minutes
#                                             # on an idle 2-core machine): checks the script and the
#                                             # CPU paths of the benchmarks, measures nothing
#
# Steps (each with its own `timeout`; a failing step never loses the others' output):
#   env              nvidia-smi, torch / CUDA / cuDNN / library versions, the GPU's name and capability
#   pytest_gpu       pytest -m gpu tests/test_gpu.py (bf16 vs float32, fused layer, 2 clients on one GPU
#                    with client_gpus 0.5, FedIT on the GPU, MoRE over a 4-bit base)
#   more_layer       benchmarks/more_layer.py: one MoRE layer vs one PEFT LoRA layer, d = 576 (SmolLM2-135M)
#                    and 4096 (Llama-2-7B), bf16
#   round_smollm2    benchmarks/round.py: a client's training step, SmartFed vs PEFT LoRA (FedIT), SmolLM2-135M
#                    shapes (30 layers), bf16
#   round_llama2_7b  the same at Llama-2-7B's layer shapes (4 of its 32 layers), bf16
#   generate_smollm2 benchmarks/generate.py: routed vs merged LoRA vs base, tokens/s and memory, bf16
#   generate_llama2_7b  the same at Llama-2-7B's layer shapes (4 layers)
# Every model has random weights at the real shapes, or is the tiny one the tests build: nothing is
# downloaded (HF_HUB_OFFLINE=1, no pip). OUTDIR gets <step>.log for each step, steps.tsv (step, rc,
# seconds), summary.txt, nvidia-smi.txt, versions.txt and pytest_gpu.xml. Exit status: 0 if every
# step passed, 1 otherwise (the failed steps are listed at the end).
#
# Environment: PYTHON (default .venv/bin/python when present, else python3); the repository's src/ is
# put on PYTHONPATH, so an environment with smartfed's dependencies suffices (pip install -e . not needed).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUTDIR=$1
shift
MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    *) usage ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# no network: every model is made here; no telemetry, no update checks
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

printf 'step\trc\tseconds\n' >"$OUTDIR/steps.tsv"
FAILED=()

# run_step NAME TIMEOUT_S CMD...: CMD's stdout and stderr into NAME.log; its rc and duration into steps.tsv
run_step() {
  local name=$1 limit=$2 rc start
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee "$OUTDIR/$name.log" >&2
  start=$(date +%s)
  if timeout --kill-after=15 "$limit" "$@" >>"$OUTDIR/$name.log" 2>&1; then rc=0; else rc=$?; fi
  local seconds=$(($(date +%s) - start))
  [ "$rc" -eq 124 ] && echo "== $name: timed out after ${limit}s" >>"$OUTDIR/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >>"$OUTDIR/steps.tsv"
  echo "== $name: rc $rc, ${seconds}s" >&2
  if [ "$rc" -ne 0 ]; then FAILED+=("$name"); fi
  return 0
}

environment() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1 || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit \
      --format=csv >>"$OUTDIR/nvidia-smi.txt" 2>&1 || true
  else
    echo "nvidia-smi: not found" >"$OUTDIR/nvidia-smi.txt"
  fi
  {
    echo "mode: $MODE"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc 2>/dev/null || echo ?)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git')"
    git status --short 2>/dev/null | head -20 || true
    echo "python: $PYTHON"
  } >"$OUTDIR/versions.txt"
  "$PYTHON" - "$MODE" >>"$OUTDIR/versions.txt" 2>&1 <<'EOF'
import importlib
import sys

import torch

mode = sys.argv[1]
print(f"python {sys.version.split()[0]}")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("transformers", "peft", "flwr", "ray", "bitsandbytes", "accelerate", "smartfed"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({getattr(module, '__file__', '?')})")
    except Exception as err:  # a missing optional package is information, not a failure
        print(f"{name}: not importable ({type(err).__name__}: {err})")
print(f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
              f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
elif mode == "gpu":
    sys.exit("GPU mode but torch sees no CUDA device: every later step will fail (use --cpu-smoke on a CPU)")
EOF
}

export MODE OUTDIR PYTHON  # read by the environment step, which runs in a child bash under `timeout`
run_step env 30 bash -c "$(declare -f environment); environment"
PY=("$PYTHON")
if [ "$MODE" = gpu ]; then
  DEV=(--device cuda --dtype bfloat16)
  run_step pytest_gpu 150 "${PY[@]}" -m pytest -m gpu tests/test_gpu.py -rA -p no:cacheprovider \
    --junitxml "$OUTDIR/pytest_gpu.xml"
  run_step more_layer 45 "${PY[@]}" benchmarks/more_layer.py "${DEV[@]}" --dims 576 4096 --tokens 4096 \
    --repeats 30 --warmup 5
  run_step round_smollm2 60 "${PY[@]}" benchmarks/round.py "${DEV[@]}" --shape smollm2 --batch 16 --seq 256 \
    --repeats 20 --warmup 3
  run_step round_llama2_7b 60 "${PY[@]}" benchmarks/round.py "${DEV[@]}" --shape llama2-7b --layers 4 \
    --batch 8 --seq 512 --repeats 10 --warmup 3
  run_step generate_smollm2 90 "${PY[@]}" benchmarks/generate.py "${DEV[@]}" --shape smollm2 --batches 1 8 \
    --repeats 3 --new_tokens 32
  run_step generate_llama2_7b 45 "${PY[@]}" benchmarks/generate.py "${DEV[@]}" --shape llama2-7b --layers 4 \
    --batches 1 8 --repeats 5 --new_tokens 32
else  # the same steps and options on the CPU, tiny: does every path run, is every output written
  DEV=(--device cpu --dtype bfloat16)
  TINY_ROUND=(--quick --routers rank --pool-rank 16 --stats off --repeats 1)
  run_step pytest_gpu 60 "${PY[@]}" -m pytest -m gpu tests/test_gpu.py -rA -p no:cacheprovider \
    --junitxml "$OUTDIR/pytest_gpu.xml"
  run_step more_layer 45 "${PY[@]}" benchmarks/more_layer.py "${DEV[@]}" --dims 576 4096 --tokens 16 \
    --top-k 8 --routers rank --repeats 2 --warmup 1
  run_step round_smollm2 60 "${PY[@]}" benchmarks/round.py "${DEV[@]}" --shape smollm2 "${TINY_ROUND[@]}"
  run_step round_llama2_7b 90 "${PY[@]}" benchmarks/round.py "${DEV[@]}" --shape llama2-7b --layers 1 \
    "${TINY_ROUND[@]}" --seq 8
  run_step generate_smollm2 60 "${PY[@]}" benchmarks/generate.py "${DEV[@]}" --shape smollm2 --layers 1 \
    --batches 1 --repeats 1 --new_tokens 2 --prompt_len 8
  run_step generate_llama2_7b 90 "${PY[@]}" benchmarks/generate.py "${DEV[@]}" --shape llama2-7b --layers 1 \
    --batches 1 --repeats 1 --new_tokens 2 --prompt_len 8
fi

{
  echo "gpu_check ($MODE) in $OUTDIR"
  column -t -s $'\t' "$OUTDIR/steps.tsv" 2>/dev/null || cat "$OUTDIR/steps.tsv"
  if [ ${#FAILED[@]} -eq 0 ]; then
    echo "every step passed"
  else
    echo "FAILED: ${FAILED[*]} (see $OUTDIR/<step>.log)"
  fi
} | tee "$OUTDIR/summary.txt"
[ ${#FAILED[@]} -eq 0 ]
