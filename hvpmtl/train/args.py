"""Command lines of the two trainers. Nothing heavy is imported here: `launchers/*.py --help` answers
before torch, DeepSpeed or timm load."""
from __future__ import annotations

import argparse


def trainer_parser(what: str, config_help: str, set_example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"{what} (run through deepspeed, torchrun or srun)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="exit codes: 0 done, 2 config or data error (no traceback), 3 preempted "
                                       "(checkpoint saved, requeue), 4 too many non-finite losses, "
                                       "5 a rank died or hung, 6 checkpoint state refused (output_dir locked by "
                                       "another job, nothing loadable, --resume none into a used folder)")
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {set_example} (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto: this run's newest usable checkpoint in run.output_dir, if any; none: start (refused "
                        "if the folder holds checkpoints); fresh: start over (the old run's files move to "
                        "output_dir/superseded/); or a checkpoint: tag name (step_00001000) or folder")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def pretrain_parser() -> argparse.ArgumentParser:
    return trainer_parser("HVP-MTL pre-training", "experiment YAML (configs/)", "optim.lr=2e-4")


def finetune_parser() -> argparse.ArgumentParser:
    return trainer_parser("fine-tune a pre-trained backbone", "fine-tuning YAML (configs/finetune_*.yaml)",
                          "optim.epochs=10")
