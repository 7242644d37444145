"""HVP-MTL pre-training: set-up (`Pretrainer.__init__`) apart from the loop (`train_one_epoch`).

Started on every rank by launchers/pretrain.py (deepspeed, torchrun or srun). Exit codes:
0 finished, 2 config error, 3 preempted (checkpoint saved, requeue me), 4 too many non-finite losses,
5 another rank died or hung (named in the message; the job cannot go on without it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl.config import ConfigError, ExperimentConfig, check_batch_sizes, load_config, save_config
from hvpmtl.dist import Heartbeat, all_reduce_mean, any_rank, init_distributed
from hvpmtl.models.collapse import CollapseMonitor, add_sums, all_reduce_sums, collapse_figures
from hvpmtl.models.meta_arch import OBJECTIVES, Student, Teacher, teacher_momentum
from hvpmtl.train import checkpoint
from hvpmtl.train.optim import build_optimizer, build_scheduler
from hvpmtl.train.tracking import Tracker

EXIT_OK, EXIT_CONFIG, EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_PEER_LOST = 0, 2, 3, 4, 5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="HVP-MTL pre-training (run through deepspeed, torchrun or srun)")
    p.add_argument("--config", required=True, help="experiment YAML (configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=2e-4 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in run.output_dir, if any), none, or a checkpoint dir")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def resolve_precision(cfg: ExperimentConfig) -> str:
    if cfg.run.precision != "auto":
        return cfg.run.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def build_ds_config(cfg: ExperimentConfig, world_size: int, precision: str) -> dict:
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
    ds["train_micro_batch_size_per_gpu"] = o.micro_batch_size
    ds["gradient_accumulation_steps"] = o.grad_accum_steps
    ds["train_batch_size"] = check_batch_sizes(cfg, world_size)
    ds["gradient_clipping"] = o.grad_clip
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 16} if precision == "fp16" else {"enabled": False}
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


class Pretrainer:
    def __init__(self, cfg: ExperimentConfig, resume: str = "auto"):
        prepare_deepspeed()
        import deepspeed

        self.cfg = cfg
        self.rank, self.local_rank, self.world = init_distributed(cfg.run.collective_timeout_s)
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.precision = resolve_precision(cfg)
        ds_config = build_ds_config(cfg, self.world, self.precision)
        self.out_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.student = Student(cfg)
        self.teacher = Teacher(self.student).to(self.device) if self.student.weights["distill"] > 0 else None
        if cfg.run.compile:  # in place: parameter names (and so checkpoints, exports) are unchanged
            for m in (self.student.backbone, self.student.label_decoder,
                      *((self.teacher.backbone, self.teacher.label_decoder) if self.teacher else ())):
                if m is not None:
                    m.compile()
        self.loader = self._build_loader()
        o = cfg.optim
        self.steps_per_epoch = o.steps_per_epoch or max(1, len(self.loader) // o.grad_accum_steps)
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps:
            self.total_steps = min(self.total_steps, o.max_steps)
        optimizer = build_optimizer(self.student, o, self.student.no_weight_decay_names())
        scheduler = build_scheduler(optimizer, o, self.steps_per_epoch, o.epochs * self.steps_per_epoch)
        self.engine, _, _, _ = deepspeed.initialize(model=self.student, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, dist_init_required=False)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.ds_config = ds_config

        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.queue = None
        self._collapse_sums = None  # this optimizer step's collapse statistics (sums over its micro-batches)
        self.collapse_monitor = (CollapseMonitor(cfg.run.collapse_warn_steps, cfg.model.proto_out_dim)
                                 if cfg.run.collapse_warn_steps else None)
        self._panel_batch = None
        self._bar = None
        run_id = None
        # per-rank seed for dropout / drop-path, so ranks do not draw the same masks
        seed_everything(cfg.run.seed + 1000 * self.rank + 1)
        if resume != "none":
            run_id = self._resume(resume)
        self.preemption = Preemption()
        self.heartbeat = Heartbeat(self.rank, self.world)
        self.tracker = Tracker(cfg, active=self.is_main, run_id=run_id)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            (self.out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
            if run_id is None:
                self.tracker.log_artifact(self.out_dir / "config.yaml", "config")
                self.tracker.log_artifact(self.out_dir / "ds_config.json", "config")
                self.tracker.set_tags({"world_size": self.world, "precision": self.precision,
                                       "backbone": cfg.model.backbone})

    # ------------------------------------------------------------------ set-up helpers
    def _build_loader(self):
        cfg = self.cfg
        kw = dict(batch_size=cfg.optim.micro_batch_size, patch_size=self.student.backbone.patch_size,
                  rank=self.rank, world_size=self.world)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        if cfg.data.format == "tensors":
            from hvpmtl.data.tensor_source import TensorSource
            return TensorSource(cfg.data, device=self.device, dtype=dtype, **kw)
        from hvpmtl.data.pipeline import build_pretrain_loader
        return build_pretrain_loader(cfg.data, local_rank=self.local_rank, seed=cfg.data.seed, dtype=dtype, **kw)

    def _resume(self, resume: str):
        found = checkpoint.resume(self.engine, self.ckpt_dir, resume, log=self.log)
        if found is None:
            return None
        _, client, rank_state = found
        self.step, self.epoch = client["step"], client["epoch"]
        self.nonfinite_total = client.get("nonfinite_total", 0)
        if self.teacher is not None and client.get("teacher") is not None:
            self.teacher.load_state_dict(client["teacher"])
        self.loader.load_state_dict(rank_state["data"])
        self.queue = rank_state.get("queue")
        checkpoint.set_rng_state(rank_state["rng"])
        return client.get("mlflow_run_id")

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[hvpmtl] {msg}", flush=True)

    def save(self) -> Path:
        client = {"step": self.step, "epoch": self.epoch, "nonfinite_total": self.nonfinite_total,
                  "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                  "mlflow_run_id": self.tracker.run_id}
        rank_state = {"rng": checkpoint.rng_state(), "data": self.loader.state_dict(), "queue": self.queue}
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state, self.cfg.run.keep_checkpoints)
        self.log(f"checkpoint {path}")
        return path

    # ------------------------------------------------------------------ one micro-batch
    def _queue_for_step(self):
        sw = self.cfg.objectives.swav
        if not sw.queue_length or self.step < sw.queue_start_step or self.queue is None:
            return None
        return self.queue

    def _push_queue(self, z1, z2):
        sw = self.cfg.objectives.swav
        if not sw.queue_length:
            return
        per_rank = max(1, sw.queue_length // self.world)
        new = torch.stack([z1.float(), z2.float()])
        self.queue = new if self.queue is None else torch.cat([new, self.queue], dim=1)[:, :per_rank]

    def forward_backward(self, batch) -> dict | None:
        """Forward + backward of one micro-batch. Returns the unweighted losses, or None when any rank
        saw a non-finite loss (then no rank steps on this micro-batch)."""
        cfg = self.cfg
        v1 = batch["view1"].to(self.device, self.input_dtype, non_blocking=True)
        v2 = batch["view2"].to(self.device, self.input_dtype, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, torch.float32, non_blocking=True)
        teacher_sim = None
        if self.teacher is not None:
            with torch.autocast(self.device.type, dtype=self.input_dtype, enabled=self.input_dtype != torch.float32):
                teacher_sim = self.teacher(v1).float()
        freeze = self.step < cfg.objectives.swav.freeze_prototypes_steps
        out = self.engine(v1, v2, mask, labels, teacher_sim=teacher_sim, queue=self._queue_for_step(),
                          freeze_prototypes=freeze)
        losses = {k: out[k].detach() for k in (*OBJECTIVES, "loss") if k in out}
        bad = [k for k, v in losses.items() if k != "loss" and not torch.isfinite(v)]
        if not torch.isfinite(losses["loss"]) and not bad:
            bad = ["loss"]
        if any_rank(bool(bad), self.device):
            self._nonfinite = bad or ["(on another rank)"]
            return None
        self.engine.backward(out["loss"])
        self.engine.step()
        if "z1" in out:
            self._push_queue(out["z1"], out["z2"])
        self._collapse_sums = add_sums(self._collapse_sums, out.get("collapse") or {})
        return {k: v.item() for k, v in losses.items()}

    def _collapse_metrics(self) -> dict[str, float]:
        """The step's collapse figures over the global batch (one all-reduce), and the monitor's warnings."""
        sums, self._collapse_sums = self._collapse_sums, None
        if not sums:
            return {}
        reduced = collapse_figures(all_reduce_sums(sums))
        figures = dict(zip(reduced, torch.stack(list(reduced.values())).tolist()))  # one host sync
        if self.collapse_monitor is not None:
            for msg in self.collapse_monitor.update(figures, self.step):
                self.log(msg)
        return figures

    # ------------------------------------------------------------------ the loop
    def train_one_epoch(self) -> int | None:
        """Runs until the epoch ends, max steps, preemption or a non-finite stop; returns an exit code to
        stop with, or None to go on with the next epoch."""
        cfg = self.cfg
        gbs = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * self.world
        acc: dict[str, float] = {}
        n_micro = 0
        t0 = time.perf_counter()
        for batch in self.loader:
            boundary = self.engine.is_gradient_accumulation_boundary()
            losses = self.forward_backward(batch)
            if losses is None:
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                self.log(f"step {self.step + 1}: non-finite {', '.join(self._nonfinite)}; micro-batch skipped "
                         f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all)")
                self.tracker.log_metrics({"nonfinite_skipped": self.nonfinite_total}, self.step)
                if self.nonfinite_in_row >= cfg.run.max_nonfinite_in_row:
                    self.log(f"stopping: {self.nonfinite_in_row} non-finite losses in a row "
                             f"(last from {', '.join(self._nonfinite)}); saving the last good state")
                    self.save()
                    return EXIT_NONFINITE
                continue
            self.nonfinite_in_row = 0
            self.heartbeat.step = self.step
            for k, v in losses.items():
                acc[k] = acc.get(k, 0.0) + v
            n_micro += 1
            if not boundary:
                continue
            self.step += 1
            if self.teacher is not None:
                self.teacher.update(self.engine.module, teacher_momentum(cfg, self.step, self.total_steps))
            dt = time.perf_counter() - t0
            metrics = {k: v / n_micro for k, v in acc.items()}
            metrics["preempt"] = 1.0 if self.preemption.requested else 0.0
            metrics = all_reduce_mean(metrics, self.device)
            preempt = metrics.pop("preempt") > 0
            metrics.update(self._collapse_metrics())
            metrics.update(self._step_metrics(gbs, dt))
            self.tracker.log_metrics(metrics, self.step)
            self._progress(metrics)
            acc, n_micro = {}, 0
            t0 = time.perf_counter()
            self._periodic_eval(batch)
            if self.step % cfg.run.checkpoint_every == 0 or preempt:
                self.save()
            if preempt:
                self.log(f"preempted at step {self.step}: checkpoint saved, exiting with {EXIT_PREEMPTED} for requeue")
                return EXIT_PREEMPTED
            if self.step >= self.total_steps:
                return EXIT_OK
        return None

    def _periodic_eval(self, batch) -> None:
        """Online linear-probe/kNN on the held-out split (all ranks) and MLflow image panels (rank 0)."""
        cfg = self.cfg
        if self._panel_batch is None:  # a fixed set of images for the panels, from the first step
            self._panel_batch = {k: v[:8].detach().clone() for k, v in batch.items()}
        if cfg.run.eval_every and self.step % cfg.run.eval_every == 0:
            from hvpmtl.eval.online import evaluate_online
            backbone = self.teacher.backbone if self.teacher is not None else self.engine.module.backbone
            results = evaluate_online(backbone, cfg, device=self.device, rank=self.rank, world_size=self.world)
            self.tracker.log_metrics(results, self.step)
        if cfg.run.image_log_every and self.is_main and self.step % cfg.run.image_log_every == 0:
            from hvpmtl.eval.visualize import log_panels
            log_panels(self.tracker, self.engine.module, self._panel_batch, cfg, self.step)

    def _step_metrics(self, gbs: int, dt: float) -> dict:
        m = {"lr": self.engine.get_lr()[0], "img_per_s": gbs / max(dt, 1e-9), "epoch": self.epoch}
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            m["grad_norm"] = float(gn)
        if self.device.type == "cuda":
            m["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource
            m["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return m

    def _progress(self, metrics: dict) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", *OBJECTIVES, "img_per_s") if k in metrics},
                                  refresh=False)
        elif self.step % self.cfg.run.log_every == 0 or self.step == 1:
            keys = ("loss", *OBJECTIVES, "swav/code_entropy", "swav/protos_used", "lr", "img_per_s")
            parts = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            print(f"[hvpmtl] step {self.step}/{self.total_steps} {parts}", flush=True)

    def run(self) -> int:
        cfg = self.cfg
        if self.is_main and cfg.run.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step")
        self.log(f"{self.world} rank(s), {self.precision}, {self.total_steps} steps "
                 f"({self.steps_per_epoch}/epoch), global batch "
                 f"{cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * self.world}, from step {self.step}")
        code = EXIT_OK
        try:
            while self.step < self.total_steps:
                self.loader.set_epoch(self.epoch)
                result = self.train_one_epoch()
                if result is not None:
                    code = result
                    break
                self.epoch += 1
            if code == EXIT_OK:
                if self.step % cfg.run.checkpoint_every != 0:
                    self.save()
                self._export_backbone()
        except (RuntimeError, dist.DistError) as e:
            lost = self.heartbeat.lost_ranks()
            if not lost:
                raise
            # a collective failed because a peer died or hung: say which, instead of a bare gloo/NCCL error
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"[hvpmtl] rank {self.rank}: a collective failed at step {self.step + 1}: {lost}. "
                  f"The job cannot continue; restart it with --resume auto from the last checkpoint. "
                  f"({type(e).__name__}: {first})", file=sys.stderr, flush=True)
            code = EXIT_PEER_LOST
        finally:
            self.heartbeat.close()
            if self._bar is not None:
                self._bar.close()
            self.tracker.close("FINISHED" if code in (EXIT_OK, EXIT_PREEMPTED) else "FAILED")
        return code

    def _export_backbone(self):
        if not self.is_main:
            return
        from hvpmtl.eval.export import save_timm_backbone
        src = self.teacher.backbone if self.teacher is not None else self.engine.module.backbone
        path = save_timm_backbone(src, self.out_dir / "backbone.safetensors")
        self.tracker.log_artifact(path, "backbone")
        self.log(f"backbone exported to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"hvpmtl: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        trainer = Pretrainer(cfg, args.resume)
    except ConfigError as e:
        print(f"hvpmtl: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    code = trainer.run()
    if code == EXIT_PEER_LOST:
        os._exit(code)  # a process group with a dead peer can hang in its own teardown
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
