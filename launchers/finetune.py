#!/usr/bin/env python
"""Entry point started on every rank by `deepspeed [--hostfile hosts] launchers/finetune.py --config ...`,
by torchrun, or by srun. No training logic here: see hvpmtl/train/finetune.py."""
import sys

from hvpmtl.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
