"""HVP-MTL pre-training: set-up (`Pretrainer.__init__`), then a short loop (`train_one_epoch`, dinov2's do_train).

Started on every rank by launchers/pretrain.py (deepspeed, torchrun or srun), which hands over the step
hooks (online evaluation, image panels, the final backbone export: hvpmtl/eval/hooks.py). Exit codes: see
hvpmtl/train/runtime.py.
"""
from __future__ import annotations

import resource
import sys
import time

import torch
import torch.distributed as dist

from hvpmtl.config import ExperimentConfig
from hvpmtl.dist import Heartbeat
from hvpmtl.models.backbone import patch_size_of
from hvpmtl.models.collapse import CollapseMonitor
from hvpmtl.models.meta_arch import OBJECTIVES, HVPMetaArch
from hvpmtl.train import runtime
from hvpmtl.train.args import pretrain_parser
from hvpmtl.train.optim import build_optimizer
from hvpmtl.train.runtime import EXIT_NONFINITE, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, Trainer, seed_everything
from hvpmtl.train.schedules import lambda_lr, lr_schedule, momentum_schedule


class Pretrainer(Trainer):
    """hooks: objects with optional `after_step(trainer, batch)` (every rank, after each optimizer step's
    logging) and `at_end(trainer)` (every rank, after the last step's checkpoint)."""

    def __init__(self, cfg: ExperimentConfig, resume: str = "auto", hooks=()):
        super().__init__(cfg, resume)
        self.hooks = list(hooks)
        self.loader = self._build_loader()  # data errors surface here, before any model or engine exists
        o = cfg.optim
        self.steps_per_epoch = o.steps_per_epoch or max(1, len(self.loader) // o.grad_accum_steps)
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.momentum = momentum_schedule(cfg.objectives.distill, self.total_steps)

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.meta = HVPMetaArch(cfg, self.device, self.input_dtype, self.world)
        optimizer = build_optimizer(self.meta.student, o, self.meta.student.no_weight_decay_names())
        scheduler = lambda_lr(optimizer, lr_schedule(o, o.lr, self.steps_per_epoch))
        self.engine = self.build_engine(self.meta.student, optimizer, scheduler)
        self.meta.attach(self.engine)

        self.nonfinite_in_row = self.nonfinite_total = 0
        self.collapse_monitor = (CollapseMonitor(cfg.run.collapse_warn_steps, cfg.model.proto_out_dim)
                                 if cfg.run.collapse_warn_steps else None)
        self._bar = None
        seed_everything(cfg.run.seed + 1000 * self.rank + 1)  # ranks draw their own dropout / drop-path
        resumed = self.resume(self.loader)
        if resumed:
            self.nonfinite_total = resumed[0].get("nonfinite_total", 0)
            self.meta.load_state(*resumed)
        self.heartbeat = Heartbeat(self.rank, self.world)
        self.start_run(resumed, {"backbone": cfg.model.backbone})
        self._report_left_out()

    @property
    def teacher(self):
        return self.meta.teacher

    def _build_loader(self):
        cfg = self.cfg
        patch = patch_size_of(cfg.model.backbone, cfg.model.img_size)
        kw = dict(batch_size=cfg.optim.micro_batch_size, patch_size=patch, rank=self.rank, world_size=self.world,
                  dtype=self.input_dtype)
        if cfg.data.format == "tensors":
            from hvpmtl.data.tensor_source import TensorSource
            return TensorSource(cfg.data, device=self.device, **kw)
        from hvpmtl.data.pipeline import build_pretrain_loader
        return build_pretrain_loader(cfg.data, local_rank=self.local_rank, seed=cfg.data.seed, **kw)

    def _report_left_out(self) -> None:
        """Every sample the data left out, counted and shown: printed at start and set as an MLflow tag
        (a param could not change on resume); its numbers go into the first step's metrics."""
        self._left_out_seen = -1
        if self.is_main and getattr(self.loader, "skipped", None) is not None:
            desc = self.loader.skipped_description()
            self.log(f"data: {desc}")
            self.tracker.set_tags({"data.left_out": desc})

    def _data_metrics(self) -> dict:
        """data/left_out_* in metrics.jsonl and MLflow at the first step and whenever the count changes
        (samples that fail when read; rank 0's count)."""
        skipped = getattr(self.loader, "skipped", None)
        if skipped is None or skipped.left_out == self._left_out_seen:
            return {}
        self._left_out_seen = skipped.left_out
        return {f"data/left_out_{k}": float(v) for k, v in skipped.as_dict().items()}

    def save(self):
        return self.save_checkpoint(self.loader, {"nonfinite_total": self.nonfinite_total, **self.meta.client_state()},
                                    self.meta.rank_state())

    # ------------------------------------------------------------------ the loop
    def train_one_epoch(self) -> int | None:
        """Runs until the epoch ends, max steps, preemption or a non-finite stop; returns an exit code to
        stop with, or None to go on with the next epoch."""
        acc: dict[str, float] = {}
        sums: dict = {}  # numpy arrays on the host
        n_micro, preempt, t0 = 0, False, time.perf_counter()
        for batch in self.loader:
            result = self.meta.forward_backward(batch, self.step, preempt=self.preemption.requested)
            if result.nonfinite:
                if self._skip_nonfinite(result.nonfinite):
                    return EXIT_NONFINITE
                continue
            self.nonfinite_in_row = 0
            self.heartbeat.step = self.step
            for k, v in result.losses.items():
                acc[k] = acc.get(k, 0.0) + v
            for k, v in result.sums.items():
                sums[k] = sums[k] + v if k in sums else v
            n_micro, preempt = n_micro + 1, preempt or result.preempt
            if not result.boundary:
                continue
            self.step += 1
            self.meta.update_teacher(self.momentum[self.step])
            metrics = {k: v / n_micro for k, v in acc.items()}
            self._log_step(metrics, sums, time.perf_counter() - t0)
            acc, sums, n_micro, t0 = {}, {}, 0, time.perf_counter()
            for hook in self.hooks:
                getattr(hook, "after_step", lambda *a: None)(self, batch)
            if self.step % self.cfg.run.checkpoint_every == 0 or preempt:
                self.save()
            if preempt:
                self.log(f"preempted at step {self.step}: checkpoint saved, exiting with {EXIT_PREEMPTED} for requeue")
                return EXIT_PREEMPTED
            if self.step >= self.total_steps:
                return EXIT_OK
        return None

    def _skip_nonfinite(self, names) -> bool:
        """Counts a skipped micro-batch; True when too many came in a row (the last good state is saved)."""
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.log(f"step {self.step + 1}: non-finite {', '.join(names)}; micro-batch skipped "
                 f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all)")
        self.tracker.log_metrics({"nonfinite_skipped": self.nonfinite_total}, self.step)
        if self.nonfinite_in_row < self.cfg.run.max_nonfinite_in_row:
            return False
        self.log(f"stopping: {self.nonfinite_in_row} non-finite losses in a row (last from {', '.join(names)}); "
                 "saving the last good state")
        self.save()
        return True

    def _log_step(self, metrics: dict, sums: dict, dt: float) -> None:
        """The step's metrics to metrics.jsonl/MLflow and the console. Values that need a device read (the
        gradient norm) only every run.log_every steps."""
        logging_step = self.step % self.cfg.run.log_every == 0 or self.step == 1
        figures = self.meta.figures(sums)
        metrics.update(figures)
        if self.collapse_monitor is not None:  # host arithmetic on the step's reduced figures: no device read
            for msg in self.collapse_monitor.update(figures, self.step):
                self.log(msg)
        metrics.update(lr=self.engine.get_lr()[0], img_per_s=self.global_batch / max(dt, 1e-9), epoch=self.epoch)
        gn = self.engine.get_global_grad_norm() if logging_step else None
        if gn is not None:
            metrics["grad_norm"] = float(gn)
        if self.device.type == "cuda":
            metrics["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        metrics.update(self._data_metrics())
        self.tracker.log_metrics(metrics, self.step)
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", *OBJECTIVES, "img_per_s") if k in metrics},
                                  refresh=False)
        elif logging_step:
            keys = ("loss", *OBJECTIVES, "swav/code_entropy", "swav/protos_used", "lr", "img_per_s")
            parts = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            print(f"[hvpmtl] step {self.step}/{self.total_steps} {parts}", flush=True)

    def run(self) -> int:
        cfg = self.cfg
        if self.is_main and cfg.run.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step")
        self.log(f"{self.world} rank(s), {self.precision}, {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                 f"global batch {self.global_batch}, from step {self.step}")
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
                for hook in self.hooks:
                    getattr(hook, "at_end", lambda *a: None)(self)
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


def main(args=None, hooks=()) -> int:
    """argv list or parsed args (launchers/pretrain.py parses before the heavy imports, for a fast --help)."""
    return runtime.main(args, pretrain_parser, ExperimentConfig,
                        lambda cfg, resume: Pretrainer(cfg, resume, hooks), name="hvpmtl")
