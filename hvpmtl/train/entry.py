"""The trainers' entry (`pretrain.main`, `finetune.main`, called by launchers/): argv or parsed args -> config ->
trainer -> its exit code, and the boundary that turns a config, data or checkpoint error into one line on stderr
and its exit code (hvpmtl/train/exit_codes.py), on every rank, no traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch.distributed as dist

from hvpmtl import checkpoint
from hvpmtl.config import ConfigError, load_config
from hvpmtl.data.formats.issues import DataError
from hvpmtl.dist import destroy_process_group
from hvpmtl.notices import show_notices_as_lines
from hvpmtl.train.exit_codes import EXIT_CHECKPOINT, EXIT_CONFIG


def main(args, parser, schema, make_trainer, name: str = "hvpmtl") -> int:
    """argv (or parsed args) -> config -> trainer -> its exit code. A config or data error, during set-up or
    later, is one line on stderr and exit 2 on every rank, no traceback."""
    if not isinstance(args, argparse.Namespace):
        args = parser().parse_args(args)
    ours = not dist.is_initialized()  # the process group is torn down by whoever made it
    show_notices_as_lines()
    # DeepSpeed's ZeRO calls this deprecated torch collective itself (deepspeed/comm/torch.py): a warning per
    # rank that nobody running hvpmtl can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    code, peer_lost = EXIT_CONFIG, False
    try:
        cfg = load_config(args.config, args.overrides, schema=schema)
        trainer = make_trainer(cfg, args.resume)
        code = trainer.run()
        peer_lost = trainer.peer_lost
    except ConfigError as e:
        print(f"{name}: config error: {e}", file=sys.stderr, flush=True)
    except DataError as e:
        print(f"{name}: data error: {e}", file=sys.stderr, flush=True)
    except checkpoint.CheckpointError as e:  # nothing trained from it; the lock is released at exit
        print(f"{name}: checkpoint error: {e}", file=sys.stderr, flush=True)
        code = EXIT_CHECKPOINT
    except Exception as e:  # noqa: BLE001 -- the input boundary (hvpmtl/cli.py): a file, folder or disk problem
        from hvpmtl.cli import report_input_error  # is one line and exit 2; anything else is said to be a bug
        code = report_input_error(e, name)
    if peer_lost:
        os._exit(code)  # a process group with a dead peer can hang in its own teardown
    if ours:
        destroy_process_group()
    return code
