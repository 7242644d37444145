#!/usr/bin/env python
"""Entry point started on every rank by `deepspeed [--hostfile hosts] launchers/pretrain.py --config ...`,
by torchrun, or by srun from launchers/slurm/pretrain.sbatch. No training logic here: it parses the command
line (so --help answers before torch loads) and hands the evaluation hooks to the trainer."""
import sys

from hvpmtl.train.args import pretrain_parser

if __name__ == "__main__":
    args = pretrain_parser().parse_args()
    from hvpmtl.eval.hooks import pretrain_hooks
    from hvpmtl.train.pretrain import main

    sys.exit(main(args, hooks=pretrain_hooks()))
