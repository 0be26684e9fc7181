#!/usr/bin/env bash
# Fetch the small wheels bench/gpu_check.sh needs on a GPU machine without network: math-verify
# (and its two dependencies) for `essence eval`, pytest for the CUDA tests, TRL (with datasets, dill,
# multiprocess) for the throughput comparison. About 2.7 MB, into
# bench/wheels (git-ignored; carry it to the GPU machine with the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps -d bench/wheels \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  pytest pluggy iniconfig
# TRL for the throughput comparison (the GPU image has Python 3.12 and none of these).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d bench/wheels \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# DeepSpeed for the zero3 case (an sdist that builds without compiling its ops; best effort).
"$PY" -m pip download -q --no-deps -d bench/wheels deepspeed==0.19.8 hjson py-cpuinfo nvidia-ml-py einops \
  || echo "deepspeed not fetched: the zero3 case will be skipped"
ls -l bench/wheels
