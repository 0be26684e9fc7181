#!/usr/bin/env bash
# The GPU check of essence's distillation step, at the paper's scale: throughput against TRL's
# GKDTrainer and plain NLL (bench/throughput.py), and step time / memory / FLOPs at LSP 1.0, 0.75,
# 0.5, 0.25 (bench/lsp_scaling.py). Student: random-init Qwen3-1.7B shape; teacher: random-init
# Qwen3-4B shape; bf16 mixed precision; 4,096-token traces made from the real Bespoke-Stratos row.
# Nothing is downloaded: the models are built on the GPU, the tokenizer and the trace are in the repo.
# About 5 minutes on one H100 (budget: 8).
#
#   bash bench/gpu_check.sh              # on a CUDA machine
#   SMALL=1 bash bench/gpu_check.sh      # tiny models and short sequences on the CPU: checks the script
#
# Environment:
#   OUT           where results go (default $TMPDIR/essence-gpu-check): throughput.{txt,json}, lsp_scaling.{txt,json}
#   PYTHON        the interpreter (default python3); it must have torch (CUDA build), transformers,
#                 accelerate and PyYAML. essence itself is installed from this checkout (pip
#                 install -e . --no-deps) or, failing that, put on PYTHONPATH.
#   WHEELS        a folder of wheels to install TRL from when it is missing and no index is reachable
#                 (trl, datasets, dill, multiprocess; see bench/RESULTS.md for the pip download line)
#   ALLOW_NO_TRL  =1: if TRL cannot be installed, run everything except the TRL variant
#   REPEATS       interleaved rounds (default 2 for throughput; lsp_scaling uses REPEATS + 1)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/essence-gpu-check}
REPEATS=${REPEATS:-2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
say() { echo "gpu_check: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
started=$(date +%s)

for module in torch transformers accelerate yaml; do
  "$PY" -c "import $module" 2>/dev/null \
    || die "$PY cannot import $module; use a Python with torch, transformers, accelerate and PyYAML (PYTHON=...)"
done

# essence from this checkout, without touching the installed torch / transformers.
if ! "$PY" -c "import essence.step" 2>/dev/null; then
  say "installing essence from $(pwd) (pip install --no-deps -e .)"
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2; then
    say "pip install -e . failed; using PYTHONPATH=$(pwd)/src instead"
  fi
  "$PY" -c "import essence.step" 2>/dev/null || export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import essence.step" || die "cannot import essence from $(pwd)/src"
fi

# TRL for the peer variant: from WHEELS, else from whatever index pip reaches; never upgrading torch.
VARIANTS=essence,trl_gkd,nll
if ! "$PY" -c "import trl.experimental.gkd" 2>/dev/null; then
  pins=$(mktemp)
  "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|transformers|accelerate|numpy)==' >"$pins" || true
  if [ -n "${WHEELS:-}" ]; then
    say "installing trl from the wheels in $WHEELS"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -c "$pins" trl >&2 \
      || "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl >&2 || true
  else
    say "installing trl from the package index (pip install trl, torch and transformers pinned)"
    "$PY" -m pip install -q --retries 0 --timeout 20 -c "$pins" trl >&2 || true
  fi
  rm -f "$pins"
  if ! "$PY" -c "import trl.experimental.gkd" 2>/dev/null; then
    if [ "${ALLOW_NO_TRL:-0}" = 1 ]; then
      say "TRL is not available: running without the trl_gkd variant (ALLOW_NO_TRL=1)"
      VARIANTS=essence,nll
    else
      die "TRL could not be installed (no index reachable, or WHEELS lacks trl/datasets/dill/multiprocess).
  Fetch the wheels where pip works (see bench/RESULTS.md) and rerun with WHEELS=folder,
  or set ALLOW_NO_TRL=1 to run without the TRL comparison."
    fi
  fi
fi

if [ "${SMALL:-0}" = 1 ]; then
  MODELS=(--models random --student tiny-student --teacher tiny-teacher --device cpu --dtype float32 --threads 1)
  SEQ=256; LENGTHS=512
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA device is visible to $PY (SMALL=1 runs the tiny CPU version)"
  MODELS=(--models random --student qwen3-1.7b --teacher qwen3-4b --device cuda --dtype bfloat16)
  SEQ=4096; LENGTHS=4096
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
"$PY" -c "import torch, transformers, essence; print('torch', torch.__version__, '| transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"

say "1/2 throughput: essence vs TRL GKD vs NLL, 1 x $SEQ tokens"
set -o pipefail
"$PY" bench/throughput.py "${MODELS[@]}" --seq-len "$SEQ" --batch-size 1 --warmup 1 --steps 3 \
  --repeats "$REPEATS" --variants "$VARIANTS" --json "$OUT/throughput.json" | tee "$OUT/throughput.txt"

say "2/2 LSP scaling at 1.0 / 0.75 / 0.5 / 0.25 of $LENGTHS tokens"
"$PY" bench/lsp_scaling.py "${MODELS[@]}" --lengths "$LENGTHS" --repeats "$((REPEATS + 1))" \
  --json "$OUT/lsp_scaling.json" | tee "$OUT/lsp_scaling.txt"

say "done in $(( $(date +%s) - started )) s; results in $OUT"
