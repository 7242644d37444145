"""What both trainers share: exit codes, the process group and device, precision, the DeepSpeed config,
seeding, checkpoint save/resume with each rank's RNG and data position, the run folder and MLflow,
preemption, and the `main` wrapper that turns a config or data error into a message and exit code 2.

Exit codes: 0 finished, 2 config or data error (a message, no traceback), 3 preempted (checkpoint saved,
requeue me), 4 too many non-finite losses, 5 another rank died or hung (named in the message), 6 the run's
saved state cannot be used safely (output_dir locked by another job, no loadable checkpoint, a load that
failed half-way, --resume none into a used folder, lock lost: hvpmtl.train.checkpoint.CheckpointError).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl.config import ConfigError, check_batch_sizes, load_config, save_config
from hvpmtl.data.issues import DataError
from hvpmtl.dist import apply_collective_timeout, init_distributed
from hvpmtl.train import checkpoint
from hvpmtl.train.tracking import Tracker, connect

EXIT_OK, EXIT_CONFIG, EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_PEER_LOST = 0, 2, 3, 4, 5
EXIT_CHECKPOINT = checkpoint.EXIT_CHECKPOINT  # 6
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(cfg) -> str:
    if cfg.run.precision != "auto":
        return cfg.run.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def build_ds_config(cfg, world_size: int, precision: str) -> dict:
    path = Path(cfg.run.ds_config)
    if not path.is_absolute() and not path.exists():  # the shipped ds_configs/, from any working directory
        path = Path(__file__).resolve().parents[2] / path
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"run.ds_config: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"run.ds_config: {path} is not valid JSON: {e}") from None
    ds.pop("_comment", None)
    o = cfg.optim
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: '{key}' is set from the experiment config (optim.*); remove it from the JSON")
    ds["train_batch_size"] = check_batch_sizes(cfg, world_size)
    ds["train_micro_batch_size_per_gpu"] = o.micro_batch_size
    ds["gradient_accumulation_steps"] = o.grad_accum_steps
    ds["gradient_clipping"] = o.grad_clip
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": True, "initial_scale_power": 16} if precision == "fp16" else {"enabled": False}
    return ds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Preemption:
    """SIGUSR1 (Slurm's --signal) or SIGTERM: finish the step, checkpoint, exit 3."""

    def __init__(self):
        self.requested = False
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def prepare_deepspeed() -> None:
    """On a machine without CUDA: DeepSpeed's CPU accelerator, without its shared-memory all-reduce op
    (inference only, and a 60 s JIT build on first use)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


class Trainer:
    """The state and set-up both trainers share; each subclass builds its loader, model and loop.

    Set-up order: process group and batch sizes (cheap, so config errors come first), then the
    subclass's data loader (data errors before any model), then the model and the DeepSpeed engine."""

    log_prefix = "[hvpmtl]"

    def __init__(self, cfg, resume: str = "auto"):
        prepare_deepspeed()
        self.cfg = cfg
        self.rank, self.local_rank, self.world = init_distributed(cfg.run.collective_timeout_s)
        self.is_main = self.rank == 0
        self.global_batch = check_batch_sizes(cfg, self.world)  # fills in optim.grad_accum_steps
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        # MLflow reached (or its absence decided) in seconds, before minutes of data, model and DeepSpeed set-up
        self.tracking_reach = connect(cfg, self.is_main, self.device)
        self.precision = resolve_precision(cfg)
        self.input_dtype = DTYPES[self.precision]
        self.out_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        # the output_dir lock and the resume decision, agreed by all ranks before anything is built
        self.run_state = checkpoint.open_run(self.out_dir, resume, log=self.log)
        self.step, self.epoch = 0, 0
        self.tracker = None
        self.preemption = None

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"{self.log_prefix} {msg}", flush=True)

    def build_engine(self, model, optimizer, scheduler):
        import deepspeed

        self.ds_config = build_ds_config(self.cfg, self.world, self.precision)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config, dist_init_required=False)
        apply_collective_timeout(self.cfg.run.collective_timeout_s)  # DeepSpeed's own groups too
        return engine

    def resume(self, loader):
        """Loads the checkpoint agreed at start-up into the engine, and this rank's RNG and data position;
        returns (client_state, rank_state) or None for a fresh start. The subclass restores its own keys."""
        found = checkpoint.resume(self.engine, self.run_state, log=self.log)
        if found is None:
            return None
        _, client, rank_state = found
        self.step, self.epoch = client["step"], client["epoch"]
        loader.load_state_dict(rank_state["data"])
        checkpoint.set_rng_state(rank_state["rng"])
        return client, rank_state

    def save_checkpoint(self, loader, client: dict, rank_state: dict) -> Path:
        client = {"step": self.step, "epoch": self.epoch, "mlflow_run_id": self.tracker.run_id, **client}
        rank_state = {"rng": checkpoint.rng_state(), "data": loader.state_dict(), **rank_state}
        path = checkpoint.save(self.engine, self.run_state, self.step, client, rank_state, self.cfg.run.keep_checkpoints)
        self.log(f"checkpoint {path}")
        return path

    def start_run(self, resumed, tags: dict) -> None:
        """Preemption handler, MLflow (a resumed run continues its MLflow run), config.yaml and ds_config.json."""
        run_id = resumed[0].get("mlflow_run_id") if resumed else None
        self.preemption = Preemption()
        self.tracker = Tracker(self.cfg, active=self.is_main, run_id=run_id, reach=self.tracking_reach)
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        (self.out_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        if run_id is None:
            self.tracker.log_artifact(self.out_dir / "config.yaml", "config")
            self.tracker.log_artifact(self.out_dir / "ds_config.json", "config")
            self.tracker.set_tags({"world_size": self.world, "precision": self.precision, **tags})


def main(args, parser, schema, make_trainer, name: str = "hvpmtl") -> int:
    """argv (or parsed args) -> config -> trainer -> its exit code. A config or data error, during set-up or
    later, is one line on stderr and exit 2 on every rank, no traceback."""
    if not isinstance(args, argparse.Namespace):
        args = parser().parse_args(args)
    ours = not dist.is_initialized()  # the process group is torn down by whoever made it
    code = EXIT_CONFIG
    try:
        cfg = load_config(args.config, args.overrides, schema=schema)
        code = make_trainer(cfg, args.resume).run()
    except ConfigError as e:
        print(f"{name}: config error: {e}", file=sys.stderr, flush=True)
    except DataError as e:
        print(f"{name}: data error: {e}", file=sys.stderr, flush=True)
    except checkpoint.CheckpointError as e:  # nothing trained from it; the lock is released at exit
        print(f"{name}: checkpoint error: {e}", file=sys.stderr, flush=True)
        code = EXIT_CHECKPOINT
    if code == EXIT_PEER_LOST:
        os._exit(code)  # a process group with a dead peer can hang in its own teardown
    if ours and dist.is_initialized():
        dist.destroy_process_group()
    return code
