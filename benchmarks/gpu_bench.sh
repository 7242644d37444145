#!/usr/bin/env bash
# `make bench-gpu` on a lent GPU machine (torch, timm and triton there; no venv, no package registry).
# Carry .devbundle/wheels (DeepSpeed and its needs) and the three DALI parts .devbundle/dali1..3 (one call each,
# see shared/device/make-bundles.sh); then, in the call that carries the last part:
#   bash benchmarks/gpu_bench.sh            # writes $OUT/bench_gpu.{json,md} and one log per section
# The sections' budgets keep it under 8 minutes; a section without its package (e.g. DALI) reports the error
# and the others still run.
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devbundle/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
# shellcheck disable=SC1091
. .devbundle/bin/install-dali.sh || echo "gpu_bench: DALI is not installed; the dali sections will say so"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 benchmarks/bench_gpu.py --out "${OUT:-bench_gpu}"
