python3 -m pip install -q --no-index --no-deps --target /tmp/site .devbundle/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
B="python3 benchmarks/train_step.py --steps 6 --warmup 3"
timeout 70 $B --backbone swin_base_patch4_window7_224 --batch 64 --classes 11166 --decoder-groups 128 --mode zero2 > $OUT/swin.txt 2>&1
timeout 100 $B --backbone vit_base_patch16_224 --batch 128 --classes 11166 --decoder-groups 128 --mode zero2 --compile > $OUT/compile.txt 2>&1
grep -h -E "^JSON|Error" $OUT/*.txt | cut -c1-400
