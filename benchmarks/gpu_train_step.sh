#!/usr/bin/env bash
# On a lent GPU machine (torch + timm there; DeepSpeed carried as wheels in .devbundle/wheels):
# the full HVP-MTL step, ZeRO-2 vs eager, for the configurations in docs/BENCHMARKS.md.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devbundle/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
B="python3 benchmarks/train_step.py --steps 8 --warmup 3"
run() { local t=$1; shift; echo "## $*"; timeout "$t" $B "$@" > "$OUT/log_$RANDOM.txt" 2>&1; local rc=$?; grep -h -E "^JSON" "$OUT"/log_*.txt | tail -n +1 > /dev/null; return $rc; }
run 90 --backbone vit_base_patch16_224 --batch 128 --classes 11166 --decoder-groups 128 --mode zero2 eager
run 60 --backbone vit_base_patch16_224 --batch 128 --classes 1000 --decoder-layers 1 --mode zero2
run 60 --backbone vit_base_patch16_224 --batch 32 --classes 11166 --mode zero2
run 60 --backbone swin_base_patch4_window7_224 --batch 64 --classes 11166 --decoder-groups 128 --mode zero2
echo "== results"
grep -h -E "^JSON|Error|error:" "$OUT"/log_*.txt | cut -c1-400
