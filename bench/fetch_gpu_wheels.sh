#!/usr/bin/env bash
# Fetch the small wheels bench/gpu_check.sh needs on a GPU machine without network: math-verify
# (and its two dependencies) for `essence eval`, pytest for the CUDA tests. About 0.9 MB, into
# bench/wheels (git-ignored; carry it to the GPU machine with the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps -d bench/wheels \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  pytest pluggy iniconfig
ls -l bench/wheels
