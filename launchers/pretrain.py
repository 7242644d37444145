#!/usr/bin/env python
"""Entry point started on every rank by `deepspeed [--hostfile hosts] launchers/pretrain.py --config ...`,
by torchrun, or by srun from launchers/slurm/pretrain.sbatch. No training logic here."""
import sys

from hvpmtl.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
