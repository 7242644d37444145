#!/usr/bin/env bash
# Creates the project's virtual environment and installs hvpmtl into it (idempotent).
# torch and torchvision are installed together in one pip call: the CPU-only torch wheel
# breaks torchvision ("operator torchvision::nms does not exist") and so timm.
set -euo pipefail
venv=${1:-.venv}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip wheel "setuptools>=64"
"${pip[@]}" install "$(grep '^torch==' requirements.txt)" "$(grep '^torchvision==' requirements.txt)"
"${pip[@]}" install -r requirements.txt
"${pip[@]}" install --no-deps --no-build-isolation -e .
"$venv/bin/python" -c "import torch, torchvision, timm, deepspeed, nvidia.dali, mlflow, triton, hvpmtl.kernels; print('hvpmtl env ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'dali', nvidia.dali.__version__, 'mlflow', mlflow.__version__)" 2>&1 | grep -v -i warn | tail -n 1
touch "$venv/.hvpmtl-installed"
