#!/usr/bin/env bash
# The real-model study's GPU mode (issue 14, part 2): SmolLM2's 93 MB wheel cannot travel to the
# lent machine (no network there), so the models are made on the device the way the demo's are:
#
#   1 base     a ~100M-parameter Llama (12 x 768) pre-trained on complete traces of *easy*
#              problems (1-2 steps): it knows the whole format and finishes, fails the hard ones
#   2 teacher  the same shape trained on problems of every length (1-5 steps): solves the hard ones
#   3 distil   `essence sweep essence:demo.yaml` at LSP 1.0 / 0.5 (and cot_lead 0.5), bf16
#              autocast, the same learning rate for every point, evaluated greedily
#   4 report   `essence report` over the runs
#
# Target: <= 5 minutes on one H200, run after bench/gpu_check.sh. Not yet run by its author (no
# device was used for issue 14); SMALL=1 shrinks everything to check the script on a CPU.
#
#   bash bench/gpu_study.sh            # OUT=/tmp/essence-gpu-study by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/essence-gpu-study}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
started=$(date +%s)

"$PY" - "$OUT" "$SMALL" <<'PY'
import sys, time
from pathlib import Path
sys.path.insert(0, "scripts")
import torch
import build_demo_models as b

out, small = Path(sys.argv[1]) / "models", sys.argv[2] == "1"
device = "cuda" if torch.cuda.is_available() and not small else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
layers, hidden, steps, n = (2, 64, 20, 200) if small else (12, 768, 600, 40000)
specs = {"student": b.ModelSpec(layers, hidden, steps, 3e-4, 64, b.EASY),
         "teacher": b.ModelSpec(layers, hidden, steps, 3e-4, 64, (1, b.STEPS[1]))}
tok = b.build_tokenizer()
hard = b.generate(200 if not small else 8, b.EVAL_SEED, steps=b.STEPS)
for name, spec in specs.items():
    t0 = time.time()
    model = b.build_model(spec, tok, n, {r["problem"] for r in hard}, device)
    score = b.evaluate(model, tok, hard, device)
    print(f"{name}: {model.num_parameters():,} parameters, {time.time() - t0:.0f} s, hard accuracy "
          f"{score.accuracy:.1%}, finished {score.finished:.1%}", flush=True)
    b.save(model.to("cpu"), tok, out / name)
PY

"$PY" -c "from essence.experiments.demo import write_data; write_data(__import__('pathlib').Path('$OUT/data'), \
    $([ "$SMALL" = 1 ] && echo 16 || echo 4000), $([ "$SMALL" = 1 ] && echo 4 || echo 200), 0)"
D=(model.student="$OUT/models/student" model.teacher="$OUT/models/teacher"
   data.source="$OUT/data/train.jsonl" "eval.benches=[$OUT/data/heldout.jsonl]"
   train.lr=1e-4 train.batch_size=16 train.cpu_threads=null eval.batch_size=200)
[ "$SMALL" = 1 ] && D+=(train.max_steps=2 eval.max_new_tokens=8) || D+=(train.mixed_precision=bf16)
"$PY" -m essence sweep essence:demo.yaml "${D[@]}" --grid data.truncation.lsp=1.0,0.5 --out "$OUT/runs"
"$PY" -m essence sweep essence:demo.yaml "${D[@]}" --grid data.truncation.cot_lead=0.5 --out "$OUT/runs"
"$PY" -m essence report "$OUT/runs"
echo "gpu_study: done in $(( $(date +%s) - started )) s; report in $OUT/runs/report.md"
