#!/usr/bin/env bash
# `make demo`: synthetic multi-label JPEGs -> validation -> pre-training with all four objectives on
# 2 CPU ranks through the real `deepspeed` launcher (ZeRO-2, gloo), DALI's CPU pipeline, MLflow (sqlite).
# Extra arguments go to launchers/pretrain.py, e.g. `make demo ARGS="--set optim.max_steps=50"`.
# A finished demo is not run again (it says so); `make demo-clean` removes it to start anew.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PATH=$PWD/$VENV/bin:$PATH
CONFIG=configs/demo_cpu.yaml

# A finished demo (its backbone exported) is not launched again: with every step done it would train nothing and
# only overwrite the export. An unfinished one (stopped half-way) resumes from its last checkpoint.
read_output_dir='
import argparse, sys
from hvpmtl.config import ConfigError, load_config
p = argparse.ArgumentParser(add_help=False)
p.add_argument("--config")
p.add_argument("--set", dest="overrides", action="append", default=[])
args, _ = p.parse_known_args(sys.argv[1:])
try:
    print(load_config(args.config, args.overrides).run.output_dir)
except ConfigError as e:
    sys.exit(f"hvpmtl: config error: {e}")
'
out=$("$PY" -c "$read_output_dir" --config "$CONFIG" "$@") || exit 2

# How to open the run: `mlflow ui` on its store, then the run's page in MLflow's model-training view, built by the
# function that builds the start message's link (hvpmtl.train.tracking.ui.ui_link), from $out/mlflow_run.json.
run_page='
import json, sys
from hvpmtl.train.tracking.state import STATE_FILE
from hvpmtl.train.tracking.ui import ui_link
venv, out, here = sys.argv[1:4]
local = "http://127.0.0.1:5000"
try:
    s = json.load(open(f"{out}/{STATE_FILE}"))
    uri, exp, run = s["tracking_uri"], s["experiment_id"], s["run_id"]
except (OSError, ValueError, KeyError):
    uri = exp = run = None
if exp is None or run is None:  # no MLflow run recorded: the default store, its front page
    print(f"   . {venv}/bin/activate && mlflow ui --backend-store-uri sqlite:///{here}/runs/mlflow.db "
          f"--host 127.0.0.1 --port 5000\n   then open {local}")
elif uri.startswith(("http://", "https://")):
    print(f"   open the run: {ui_link(uri, exp, run)}")
else:
    print(f"   . {venv}/bin/activate && mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
          f"   then open the run: {ui_link(local, exp, run)}")
if run is not None:
    try:
        from urllib.parse import unquote, urlparse
        from mlflow import MlflowClient
        where = MlflowClient(uri).get_run(run).info.artifact_uri
        where = unquote(urlparse(where).path) if where.startswith("file:") else where
    except Exception:
        where = "the artifact store"
    print(f"   image panels: the run page, Artifacts tab, panels/ (files: {where}/panels)")
'
if [[ -f $out/backbone.safetensors ]]; then
  last=$(cat "$out/checkpoints/latest" 2>/dev/null) && step=$((10#${last#step_})) || step="its last step"
  clean="make demo-clean"
  [[ $out == runs/demo ]] || clean="rm -r $out"
  echo "== the demo already ran to step $step: $out holds its checkpoints, metrics and exported backbone."
  echo "   Nothing is left to train, so it is not launched again (options in ARGS apply to a new demo)."
  echo "   To look at it:"
  "$PY" -c "$run_page" "$VENV" "$out" "$PWD"
  echo "   To start anew:  $clean && make demo    (demo_data/ and the MLflow history in runs/mlflow.db stay)"
  exit 0
fi

DATA=demo_data
if [[ ! -f $DATA/train.txt ]]; then
  echo "== generating the synthetic multi-label data set in $DATA/"
  "$PY" -m hvpmtl data make-synthetic --out "$DATA" --num-images 3000 --holdout 600 --seed 0
fi
echo "== validating $DATA/train.txt"
"$PY" -m hvpmtl data validate --list "$DATA/train.txt" --root "$DATA" --dictionary "$DATA/dictionary.txt" --workers 2
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== pre-training (2 ranks, DeepSpeed ZeRO-2 on CPU): logs in $out, MLflow in runs/mlflow.db"
if [[ $# -eq 0 && $(wc -l < "$DATA/train.txt") -eq 3000 ]]; then  # the demo as the README times it
  echo "   about 5-6 minutes on 2 cores (186 steps, 7 online evaluations); a line every 10 steps says the time left (eta)"
else
  echo "   a line every 10 steps says the time left (eta)"
fi
deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "$port" \
  launchers/pretrain.py --config "$CONFIG" "$@"
echo
echo "== done. Loss curves, online kNN / linear-probe mAP, parameters, image panels and the exported backbone are in MLflow:"
"$PY" -c "$run_page" "$VENV" "$out" "$PWD"
echo "   Checkpoints: $out/checkpoints   backbone: $out/backbone.safetensors   per-step: $out/metrics.jsonl"
echo "   Running \`make demo\` again changes nothing; \`make demo-clean\` removes runs/demo to start anew."
