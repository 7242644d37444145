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
# exact versions from constraints.txt (HVPMTL_NO_CONSTRAINTS=1: the newest that requirements.txt admits, to
# refresh it: docs/INSTALL.md)
cons=(-c constraints.txt)
[[ ${HVPMTL_NO_CONSTRAINTS:-0} == 1 ]] && cons=()
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
echo "== setting up $venv: about 7 GB (torch and its CUDA libraries are 5.5 GB even on a CPU machine), 3-8 minutes"
t0=$SECONDS
"${pip[@]}" install -q -U pip wheel "setuptools>=64"
echo "== torch + torchvision (the largest part; pip shows its progress)"
"${pip[@]}" install --progress-bar on "${cons[@]}" "$(grep '^torch==' requirements.txt)" "$(grep '^torchvision==' requirements.txt)"
echo "== DeepSpeed, DALI, timm, MLflow and the rest"
"${pip[@]}" install --progress-bar on "${cons[@]}" -r requirements.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
echo "== installed in $((SECONDS - t0)) s: $(du -sh "$venv" 2>/dev/null | cut -f1) in $venv"
"$venv/bin/python" -c "import torch, torchvision, timm, deepspeed, nvidia.dali, mlflow, triton, hvpmtl.kernels; print('hvpmtl env ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'dali', nvidia.dali.__version__, 'mlflow', mlflow.__version__)" 2>&1 | grep -v -i warn | tail -n 1
touch "$venv/.hvpmtl-installed"
