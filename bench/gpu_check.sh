#!/usr/bin/env bash
# The GPU check: essence's real command paths and its distillation step on a GPU, in bf16.
# Cases run in priority order; each writes its results under $OUT as soon as it finishes, so a
# run cut short still leaves what it measured. Target: ≤ 5 minutes on one H200 (BUDGET_S).
#
#   1 cuda_tests   the fused loss on CUDA under bf16 autocast vs the fp32 naive loss (pytest)
#   2 train_big    `essence train`: Qwen3-1.7B-shaped student, Qwen3-4B-shaped teacher (random
#                  weights), bf16 autocast, bf16 teacher, gradient checkpointing, the real
#                  Bespoke-Stratos row in the Qwen3 tokenizer; 3 steps, no checkpoint written
#   3 resume_eval  2-layer models of the same widths: train 2 steps with a checkpoint each step,
#                  `--resume` to step 4, then `essence eval` (HF backend) of the saved student
#   4 throughput   bench/throughput.py: essence vs TRL GKD (when installable) vs plain NLL
#   5 lsp_scaling  bench/lsp_scaling.py: step time / memory / FLOPs at LSP 1.0 / 0.75 / 0.5 / 0.25
#   6 sampling     bench/sampling_share.py: share of a step spent generating (lead_then_student,
#                  on_policy; 256 new tokens after a 1,024-token trace at LSP 0.5; small)
#   7 fsdp2        configs/accelerate/fsdp2.yaml on one process: the resume_eval models under FSDP2
#                  (fully_shard, teacher sharded too), 2 steps, --resume to 3, the saved model
#                  loads as a plain HF model (last, small; the 2-process proof runs on CPU in tests)
#   8 zero3        configs/accelerate/zero3.yaml on one GPU process, the same 2 steps + --resume
#                  (essence refuses DeepSpeed on CPU; unverified until this case passes on a GPU;
#                  skipped when deepspeed cannot be installed from $WHEELS)
#
#   bash bench/gpu_check.sh              # on a CUDA machine
#   SMALL=1 bash bench/gpu_check.sh      # tiny models on the CPU (bf16 autocast too): checks the script
#
# Environment:
#   OUT        where results go (default $TMPDIR/essence-gpu-check); one folder or file per case,
#              plus status.txt (a line per case: name, ok / failed / skipped, seconds)
#   PYTHON     the interpreter (default python3) with torch, transformers, accelerate, PyYAML
#   WHEELS     a folder of wheels for what the machine lacks (default bench/wheels, filled by
#              bench/fetch_gpu_wheels.sh: math-verify and its two dependencies, pytest, TRL)
#   BUDGET_S   seconds after which remaining cases are skipped (default 300)
#   REPEATS    interleaved rounds in the benches (default 1; lsp_scaling uses REPEATS + 1)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/essence-gpu-check}
WHEELS=${WHEELS:-bench/wheels}
BUDGET_S=${BUDGET_S:-300}
REPEATS=${REPEATS:-1}
mkdir -p "$OUT"
: >"$OUT/status.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
say() { echo "gpu_check: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }

for module in torch transformers accelerate yaml; do
  "$PY" -c "import $module" 2>/dev/null \
    || die "$PY cannot import $module; use a Python with torch, transformers, accelerate and PyYAML (PYTHON=...)"
done

# What the machine lacks, from the carried wheels; never touching torch / transformers.
need=()
"$PY" -c "import math_verify" 2>/dev/null || need+=(math-verify latex2sympy2_extended antlr4-python3-runtime)
"$PY" -c "import pytest" 2>/dev/null || need+=(pytest pluggy iniconfig)
if [ "${SMALL:-0}" != 1 ]; then  # the TRL wheels are for the GPU image's Python 3.12
  "$PY" -c "import trl.experimental.gkd" 2>/dev/null || need+=(trl datasets dill multiprocess)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ -d "$WHEELS" ]; then
    say "installing ${need[*]} from $WHEELS"
    for pkg in "${need[@]}"; do  # one at a time: a missing wheel costs only its own case
      "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$pkg" >&2 2>/dev/null \
        || say "could not install $pkg from $WHEELS"
    done
  else
    say "missing ${need[*]} and no $WHEELS (run bench/fetch_gpu_wheels.sh where pip works)"
  fi
fi

# essence from this checkout, without touching the installed torch / transformers.
if ! "$PY" -c "import essence.train.step" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2 2>/dev/null \
    || say "pip install -e . failed; using PYTHONPATH=$(pwd)/src instead"
  "$PY" -c "import essence.train.step" 2>/dev/null || export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import essence.train.step" || die "cannot import essence from $(pwd)/src"
fi

if [ "${SMALL:-0}" = 1 ]; then
  DEVICE=cpu; STUDENT=tiny-student; TEACHER=tiny-teacher; SEQ=256; LENGTHS=512; MAX_TOKENS=384
  BENCH=(--models random --student tiny-student --teacher tiny-teacher --device cpu --dtype float32 --threads 1)
  TESTS_K="autocast and cpu"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA device is visible to $PY (SMALL=1 runs the tiny CPU version)"
  DEVICE=cuda; STUDENT=qwen3-1.7b; TEACHER=qwen3-4b; SEQ=4096; LENGTHS=4096; MAX_TOKENS=4096
  BENCH=(--models random --student qwen3-1.7b --teacher qwen3-4b --device cuda --dtype bfloat16)
  TESTS_K="cuda or gpu"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
fi
"$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  | tee "$OUT/versions.txt"

# run_case NAME COMMAND...: skipped once the budget is spent; its output goes to $OUT/NAME.txt.
run_case() {
  local name=$1; shift
  local left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -le 0 ]; then
    echo "$name skipped 0 (budget of ${BUDGET_S}s spent)" >>"$OUT/status.txt"; say "$name: skipped (budget)"; return
  fi
  say "$name: start (${left}s of budget left)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 $(( left + 60 )) "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  local status=ok; [ $rc -eq 0 ] || status="failed(rc=$rc)"
  echo "$name $status $(( $(date +%s) - t0 ))" >>"$OUT/status.txt"
  say "$name: $status in $(( $(date +%s) - t0 ))s"; tail -n 15 "$OUT/$name.txt" >&2
}

# Experiment configs for the command-path cases, written from the bench presets.
"$PY" - "$OUT" "$STUDENT" "$TEACHER" "$DEVICE" "$MAX_TOKENS" <<'EOF' || die "could not write the case configs"
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from common import PRESETS, QWEN3_TOKENIZER, REAL_ROW
import yaml

out, student, teacher, device = Path(sys.argv[1]), PRESETS[sys.argv[2]], PRESETS[sys.argv[3]], sys.argv[4]
max_tokens = int(sys.argv[5])
def config(student_init, teacher_init, **train):
    return {
        "model": {"tokenizer": str(QWEN3_TOKENIZER), "student_init": student_init,
                  "teacher_init": teacher_init, "teacher_dtype": "bfloat16",
                  "gradient_checkpointing": True},
        "data": {"source": str(REAL_ROW), "max_length": 4096, "truncation": {"lsp": 1.0, "max_tokens": max_tokens}},
        "loss": {"kd_ratio": 0.5, "divergence": "forward_kl", "chunk_size": 1024},
        "train": {"mixed_precision": "bf16", "batch_size": 1, "lr": 1e-5, "warmup_ratio": 0.0,
                  "progress": False, "cpu_threads": 1 if device == "cpu" else None, **train},
    }
two_layers = lambda preset: dict(preset, num_hidden_layers=2)
(out / "train_big.yaml").write_text(yaml.safe_dump(config(
    student, teacher, epochs=3, max_steps=3, save_checkpoints=False)))
(out / "resume_eval.yaml").write_text(yaml.safe_dump(config(
    two_layers(student), two_layers(teacher), epochs=4, max_steps=2, save_every=1)))
EOF

run_case cuda_tests "$PY" -m pytest -q -p no:cacheprovider tests/loss/test_precision.py tests/loss/test_losses.py -k "$TESTS_K"

run_case train_big "$PY" -m essence train "$OUT/train_big.yaml" --out "$OUT/train_big"

resume_eval() {
  set -e
  "$PY" -m essence train "$OUT/resume_eval.yaml" --out "$OUT/resume_eval"
  "$PY" -m essence train "$OUT/resume_eval.yaml" train.max_steps=4 --out "$OUT/resume_eval" --resume
  "$PY" - "$OUT/resume_eval" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
assert steps == [1, 2, 3, 4], f"metrics steps after resume: {steps}"
summary = json.loads((run / "summary.json").read_text())
assert summary["steps"] == 4, summary["steps"]
print("resume ok: steps", steps, "final loss", summary["final_train_loss"])
EOF
  "$PY" -m essence eval --model "$OUT/resume_eval/model" --bench tests/fixtures/benchmarks/gsm8k_schema.jsonl \
    --limit 2 --max-new-tokens 32 --temperature 0 --backend hf --out "$OUT/resume_eval/eval"
}
export -f resume_eval
export PY OUT
run_case resume_eval bash -c resume_eval

trl_variants=essence,nll
"$PY" -c "import trl.experimental.gkd" 2>/dev/null && trl_variants=essence,trl_gkd,nll
run_case throughput "$PY" bench/throughput.py "${BENCH[@]}" --seq-len "$SEQ" --batch-size 1 --warmup 1 \
  --steps 3 --repeats "$REPEATS" --variants "$trl_variants" --json "$OUT/throughput.json"

run_case lsp_scaling "$PY" bench/lsp_scaling.py "${BENCH[@]}" --lengths "$LENGTHS" --repeats "$((REPEATS + 1))" \
  --json "$OUT/lsp_scaling.json"

SAMPLING=(--device "$DEVICE" --student "$STUDENT" --teacher "$TEACHER" --steps 2)
[ "$DEVICE" = cpu ] && SAMPLING+=(--threads 1 --seq-len 256 --new-tokens 32) || SAMPLING+=(--seq-len 1024 --new-tokens 256)
run_case sampling "$PY" bench/sampling_share.py "${SAMPLING[@]}" --json "$OUT/sampling_share.json"

fsdp2() {
  set -e
  local launch=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1)
  [ "$DEVICE" = cpu ] && launch+=(--cpu --mixed_precision no)
  "${launch[@]}" -m essence train "$OUT/resume_eval.yaml" train.epochs=3 --out "$OUT/fsdp2"
  "${launch[@]}" -m essence train "$OUT/resume_eval.yaml" train.epochs=3 train.max_steps=3 --out "$OUT/fsdp2" --resume
  "$PY" - "$OUT/fsdp2" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
run = Path(sys.argv[1])
steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
assert steps == [1, 2, 3], f"metrics steps after resume: {steps}"
model = AutoModelForCausalLM.from_pretrained(run / "model")
print("fsdp2 ok: steps", steps, "saved model", type(model).__name__, sum(p.numel() for p in model.parameters()), "params")
EOF
}
export -f fsdp2
export DEVICE
run_case fsdp2 bash -c fsdp2

zero3() {
  set -e
  [ "$DEVICE" = cpu ] && { echo "zero3: GPU only (essence refuses a DeepSpeed launch on CPU)"; return 0; }
  "$PY" -c "import deepspeed" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed \
    || { echo "zero3: deepspeed not installable from $WHEELS (bench/fetch_gpu_wheels.sh)"; return 0; }
  local launch=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/zero3.yaml --num_processes 1)
  "${launch[@]}" -m essence train "$OUT/resume_eval.yaml" train.epochs=3 --out "$OUT/zero3"
  "${launch[@]}" -m essence train "$OUT/resume_eval.yaml" train.epochs=3 train.max_steps=3 --out "$OUT/zero3" --resume
  "$PY" - "$OUT/zero3" "$OUT/fsdp2" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
run, fsdp = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
assert [r["step"] for r in rows] == [1, 2, 3], f"metrics steps after resume: {rows}"
assert json.loads((run / "summary.json").read_text())["engine"] == "deepspeed_zero3"
model = AutoModelForCausalLM.from_pretrained(run / "model")
print("zero3 ok: losses", [round(r["loss"], 5) for r in rows], "saved model", sum(p.numel() for p in model.parameters()), "params")
if (fsdp / "metrics.jsonl").is_file():
    other = [json.loads(l)["loss"] for l in (fsdp / "metrics.jsonl").read_text().splitlines()]
    print("fsdp2 losses", [round(x, 5) for x in other])
EOF
}
export -f zero3
run_case zero3 bash -c zero3

say "done in $(elapsed) s; results in $OUT"
cat "$OUT/status.txt" >&2
! grep -q failed "$OUT/status.txt"
