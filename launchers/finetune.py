#!/usr/bin/env python
"""Entry point started on every rank by `deepspeed [--hostfile hosts] launchers/finetune.py --config ...`,
by torchrun, or by srun. No training logic here: see hvpmtl/train/finetune.py. The command line is parsed
first, so --help answers before torch loads."""
import sys

from hvpmtl.train.args import finetune_parser

if __name__ == "__main__":
    args = finetune_parser().parse_args()
    from hvpmtl.train.finetune import main

    sys.exit(main(args))
