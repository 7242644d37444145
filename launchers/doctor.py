#!/usr/bin/env python
"""Pre-flight of every rank of a job, started like launchers/pretrain.py: `deepspeed --hostfile hosts
launchers/doctor.py --config ...`, `deepspeed --num_gpus N ...`, srun (launchers/slurm/doctor.sbatch) or torchrun.
No logic here (hvpmtl/doctor/): it parses the command line, so --help answers before torch loads. Rank 0 prints
the table; exit 0 all passed, 2 config error, 5 a rank did not answer, 7 a check failed (the host is named)."""
import sys

from hvpmtl.doctor.cli import doctor_parser

if __name__ == "__main__":
    args = doctor_parser().parse_args()
    from hvpmtl.doctor.preflight import main

    sys.exit(main(args))
