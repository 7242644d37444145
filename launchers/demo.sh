#!/usr/bin/env bash
# `make demo`: synthetic multi-label JPEGs -> validation -> pre-training with all four objectives on
# 2 CPU ranks through the real `deepspeed` launcher (ZeRO-2, gloo), DALI's CPU pipeline, MLflow (sqlite).
# Extra arguments go to launchers/pretrain.py, e.g. `make demo ARGS="--set optim.max_steps=50"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PATH=$PWD/$VENV/bin:$PATH
DATA=demo_data
if [[ ! -f $DATA/train.txt ]]; then
  echo "== generating the synthetic multi-label data set in $DATA/"
  "$PY" -m hvpmtl data make-synthetic --out "$DATA" --num-images 3000 --holdout 600 --seed 0
fi
echo "== validating $DATA/train.txt"
"$PY" -m hvpmtl data validate --list "$DATA/train.txt" --root "$DATA" --dictionary "$DATA/dictionary.txt" --workers 2
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== pre-training (2 ranks, DeepSpeed ZeRO-2 on CPU): logs in runs/demo, MLflow in runs/mlflow.db"
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "$port" \
  launchers/pretrain.py --config configs/demo_cpu.yaml "$@"
echo
echo "== done. Loss curves, parameters, image panels and the exported backbone are in MLflow:"
echo "   $VENV/bin/mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db --host 127.0.0.1 --port 5000"
echo "   then open http://127.0.0.1:5000 (experiment 'hvpmtl', run 'demo-cpu')."
echo "   Checkpoints: runs/demo/checkpoints   backbone: runs/demo/backbone.safetensors   per-step: runs/demo/metrics.jsonl"
