"""The doctor's command lines: the launcher's (launchers/doctor.py, light: --help answers before torch loads) and
`hvpmtl doctor`, which prints how to start the pre-flight on every node of a job, or runs it on this node's ranks
(--local N)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from hvpmtl.doctor.versions import CHECKOUT

ENTRY = CHECKOUT / "launchers" / "doctor.py"


def doctor_parser() -> argparse.ArgumentParser:
    from hvpmtl.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="launchers/doctor.py", formatter_class=HelpFormatter, description="Pre-flight of every rank of a job "
                                "(started like launchers/pretrain.py); rank 0 prints the table. Exit 0 all passed, "
                                "2 config error, 5 a rank did not answer, 7 a check failed (the host is named).")
    add_doctor_options(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def add_doctor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run's config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for launchers/pretrain.py (repeatable)")
    p.add_argument("--allreduce-numel", type=int, default=0,
                   help="elements of the timed all-reduce (default: the config's trainable parameters)")
    p.add_argument("--need-gb", type=float, default=None,
                   help="GPU memory a rank needs (default: the config's model states; activations come on top, "
                        "docs/BENCHMARKS.md)")
    p.add_argument("--max-clock-skew-s", type=float, default=5.0, help="largest clock difference allowed")
    p.add_argument("--min-busbw-gbs", type=float, default=0.0, help="fail below this all-reduce bus bandwidth "
                                                                   "(0: report only)")
    p.add_argument("--timeout-s", type=int, default=60, help="how long a collective waits for a missing rank")


def launch_commands(config: str, overrides: list[str]) -> list[str]:
    """How to start the doctor on every node, as the run itself would start (printed by `hvpmtl doctor`)."""
    import shlex

    args = " ".join(["--config", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides)])
    return [f"deepspeed --hostfile hosts --launcher pdsh --master_addr <first host> launchers/doctor.py {args}",
            f"sbatch --nodes N launchers/slurm/doctor.sbatch {args}",
            f"deepspeed --num_gpus N launchers/doctor.py {args}   # this node only (= hvpmtl doctor --local N)"]


def cli(args: argparse.Namespace) -> int:
    if not args.local:
        print("Start the pre-flight on every node of the job, through the launcher the run will use (rank 0 "
              "prints the table; exit 0 passed, 2 config error, 5 a rank did not answer, 7 a check failed):")
        for c in launch_commands(args.config, args.overrides):
            print(f"  {c}")
        print("or run it on this node's ranks now: hvpmtl doctor --local N ...")
        return 0
    cmd = ["deepspeed", "--num_gpus", str(args.local), str(ENTRY), "--config", args.config,
           *(x for o in args.overrides for x in ("--set", o)), "--timeout-s", str(args.timeout_s),
           "--max-clock-skew-s", str(args.max_clock_skew_s), "--min-busbw-gbs", str(args.min_busbw_gbs)]
    if args.allreduce_numel:
        cmd += ["--allreduce-numel", str(args.allreduce_numel)]
    if args.need_gb is not None:
        cmd += ["--need-gb", str(args.need_gb)]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd[0] = str(deepspeed) if deepspeed.exists() else "deepspeed"
    return subprocess.call(cmd)


def add_parser(subparsers) -> None:
    from hvpmtl import doctor
    from hvpmtl.cli import HelpFormatter

    p = subparsers.add_parser("doctor", help="pre-flight of every node of a job: prints how to start it, or runs "
                              "it on this node (--local N)", description=doctor.__doc__.split("\n\n")[0],
                              formatter_class=HelpFormatter)
    add_doctor_options(p)
    p.add_argument("--local", type=int, default=0, metavar="N",
                   help="run it now on N ranks of this node (deepspeed --num_gpus N); 0: print how to start it")
    p.set_defaults(func=cli)
