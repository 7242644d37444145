"""The one training runtime every trainer runs on, `Trainer`: the process group and device, the DeepSpeed engine,
seeding, checkpoint save/resume with each rank's RNG and data position, the run folder and MLflow, and THE loop
(`Trainer.run`: epochs, step hooks, checkpoints, preemption, the non-finite policy, a lost peer, progress, the
step's metrics, the tracker's close). A trainer supplies its micro-batch step (`train_micro_batch`), its
end-of-epoch evaluation, its checkpoint state and what it does at the end. Beside it: the exit codes
(exit_codes.py), the precision and DeepSpeed config (deepspeed_setup.py), the signal handler (preemption.py), the
progress bar (progress.py), and the entry that turns a config or data error into a message and exit 2 (entry.py).

Non-finite steps (issue 19). A micro-batch whose loss is not finite on some rank is not back-propagated
anywhere; an optimizer step that DeepSpeed skipped (ZeRO-1/2: inf/NaN gradient norm; read after `step()` from
`engine.was_step_applied()`, a Python bool: no host read) is counted (`train/skipped_steps`) and warned about.
Both count towards run.max_nonfinite_in_row (reset by an applied step); then run.on_nonfinite decides:
`rollback` reloads this run's last good checkpoint on every rank, the data moving on past the offending window
(+ run.rollback_skip_batches; in the metrics and the checkpoint's `rollbacks`), optionally with a scaled LR;
`stop` (or no checkpoint to go back to, or run.max_rollbacks spent) saves the state if it is finite and exits 4.
The step counter counts APPLIED optimizer steps: a skipped step moves neither it, nor DeepSpeed's LR schedule,
nor the EMA teacher, so the three always agree with the optimizer's real step count (a run of N steps may use
more batches). No checkpoint is written from a non-finite state (hvpmtl.checkpoint.nonfinite_state).
"""
from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hvpmtl import checkpoint
from hvpmtl.config import absolute_paths, check_batch_sizes, save_config
from hvpmtl.dist import Heartbeat, StepResult, apply_collective_timeout, init_distributed
from hvpmtl.train import perf, resume_changes
from hvpmtl.train.deepspeed_setup import DTYPES, build_ds_config, prepare_deepspeed, resolve_precision
from hvpmtl.train.exit_codes import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED
from hvpmtl.train.preemption import Preemption
from hvpmtl.train.progress import Eta, open_bar, show_step
from hvpmtl.train.stop_notes import clear_stop_note, exit_for_lost_peer, write_stop_note
from hvpmtl.train.tracking.check import connect
from hvpmtl.train.tracking.tracker import Tracker

ROLLED_BACK = "rolled back"  # the non-finite policy's answer when the loop goes on from a reloaded checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """The state, set-up and loop every trainer shares; each subclass builds its loader (`self.loader`),
    model and engine, sets `total_steps` / `steps_per_epoch`, and supplies the hooks below.

    Set-up order: process group and batch sizes (cheap, so config errors come first), then the
    subclass's data loader (data errors before any model), then the model and the DeepSpeed engine.

    hooks: objects with optional `at_start(trainer)` (every rank, before the loop's first step),
    `after_step(trainer, batch)` (every rank, after each optimizer step's logging) and `at_end(trainer)`
    (every rank, after the last step's checkpoint)."""

    log_prefix = "[hvpmtl]"
    progress_desc = "train"
    max_epochs: int | None = None  # None: steps alone end the run
    checkpoint_every_steps = 0  # 0: not by steps
    checkpoint_every_epochs = 0  # 0: not by epochs
    loss_prefix = ""  # the losses' metric names: loss, asl, ... or train/loss, ...
    console_keys: tuple[str, ...] = ("loss", "lr", "img_per_s")

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
        # the config keys this resume changes: applied from the resumed step, or refused here (issue 23)
        self.config_changes = resume_changes.changes_at_resume(self.run_state.choice, cfg)
        self.step, self.epoch = 0, 0
        self.tracker = None
        self.preemption = None
        self.hooks: list = []
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.skipped_steps = 0  # optimizer steps DeepSpeed skipped (inf/NaN gradient norm), in the run
        self.rollbacks: list[dict] = []  # the run's rollbacks (kept in checkpoints): steps, tag, batches skipped
        self.batches_seen = 0  # micro-batches taken from the loader in the run (the rollback window's measure)
        self._skip_batches = 0  # micro-batches still to drop after a rollback
        self._lr_scale_until = 0  # steps before this one run at run.rollback_lr_scale x the schedule's LR
        self.unsaved: str = ""  # why the last save was refused (non-finite state), '' after a save
        self.perf: perf.StepPerf | None = None  # made at the first step (hvpmtl/train/perf.py)
        self._flops_counted = False
        self._saved_step = -1
        self._bar = None
        self._eta: Eta | None = None  # made by run(); a step run outside it shows no time left
        self.heartbeat = None
        self.peer_lost = False  # set when a collective lost a peer: the process group cannot be torn down cleanly

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"{self.log_prefix} {msg}", flush=True)

    @property
    def loader(self):
        return self._loader

    @loader.setter
    def loader(self, loader) -> None:
        """A trainer sets its loader before it builds the model: a resumed position from another data set or
        data order is refused right here (the loader says what differs), not after minutes of set-up."""
        self._loader = loader
        choice = self.run_state.choice
        data = choice.rank_state.get("data") if choice is not None else None
        if data is not None and hasattr(loader, "check_resume"):
            loader.check_resume(data)

    def _apply_schedule(self, fresh: tuple[list, list] | None, client: dict) -> None:
        """After a load: this config's optimizer settings and LR schedule at the resumed step; said when changed."""
        if fresh is None:
            return
        resume_changes.restore_scheduler(self.engine.lr_scheduler, fresh)
        was, now = client.get("schedule") or {}, self._schedule_shape()
        if self.config_changes or (was and was != now):
            changed = resume_changes.describe(self.config_changes) or "no config key"
            self.log(f"resumed at step {self.step} with changes: {changed}. Applied from step {self.step + 1}: "
                     f"lr {self.current_lr():.4g} now; schedule: {resume_changes.describe_schedule(was, now)}")

    def _schedule_shape(self) -> dict:
        return resume_changes.schedule_shape(self.cfg.optim, self.steps_per_epoch, self.total_steps, self.global_batch)

    def build_engine(self, model, optimizer, scheduler):
        import deepspeed

        self.ds_config = build_ds_config(self.cfg, self.global_batch, self.precision)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config, dist_init_required=False)
        apply_collective_timeout(self.cfg.run.collective_timeout_s)  # DeepSpeed's own groups too
        return engine

    def resume(self, loader):
        """Loads the checkpoint agreed at start-up into the engine, and this rank's RNG and data position;
        returns (client_state, rank_state) or None for a fresh start. The subclass restores its own keys."""
        fresh = resume_changes.scheduler_settings(self.engine)  # read before the load puts the checkpoint's
        found = checkpoint.resume(self.engine, self.run_state, log=self.log)
        if found is None:
            return None
        _, client, rank_state = found
        self.step, self.epoch = client["step"], client["epoch"]
        self.nonfinite_total = client.get("nonfinite_total", 0)
        self.skipped_steps = client.get("skipped_steps", 0)
        self.rollbacks = list(client.get("rollbacks", []))
        self.batches_seen = client.get("batches_seen", 0)
        self._lr_scale_until = client.get("lr_scale_until", 0)
        self._saved_step = self.step
        loader.load_state_dict(rank_state["data"])
        if getattr(loader, "resume_note", ""):
            self.log(f"data: {loader.resume_note}")
        checkpoint.set_rng_state(rank_state["rng"])
        self._apply_schedule(fresh, client)
        self._apply_lr_scale()
        return client, rank_state

    def restore_state(self, client: dict, rank_state: dict) -> None:
        """A trainer's own keys of a checkpoint reloaded by a rollback (the engine, step and counters are
        restored by the runtime; the data position and RNG move on). Default: pre-training's meta-arch (the EMA
        teacher, the SwAV queue)."""
        meta = getattr(self, "meta", None)
        if meta is not None and hasattr(meta, "load_state"):
            meta.load_state(client, rank_state)

    def finite_also(self) -> tuple:
        """(name, module) pairs checked finite with the engine's state before every save (pre-training: its EMA
        teacher)."""
        return ()

    def save_checkpoint(self, loader, client: dict, rank_state: dict) -> Path | None:
        """Saves unless the state holds inf/NaN on some rank (then nothing is written, `latest` stays on the
        last good tag, `self.unsaved` says why, and None is returned)."""
        client = {"step": self.step, "epoch": self.epoch, "mlflow_run_id": self.tracker.run_id,
                  "nonfinite_total": self.nonfinite_total, "skipped_steps": self.skipped_steps,
                  "rollbacks": self.rollbacks, "batches_seen": self.batches_seen,
                  "lr_scale_until": self._lr_scale_until, "schedule": self._schedule_shape(), **client}
        # the config trained with, per rank (read before the model is built when the run resumes: issue 23)
        rank_state = {"rng": checkpoint.rng_state(), "data": loader.state_dict(), "config": absolute_paths(self.cfg),
                      **rank_state}
        try:
            path = checkpoint.save(self.engine, self.run_state, self.step, client, rank_state,
                                   self.cfg.run.keep_checkpoints, also=self.finite_also())
        except checkpoint.NonFiniteState as e:
            self.unsaved = str(e)
            latest = self.ckpt_dir / "latest"
            self.log(f"{e}; nothing written, the last good checkpoint stays "
                     f"{latest.read_text().strip() if latest.is_file() else '(none)'}")
            return None
        self.unsaved = ""
        self._saved_step = self.step
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
        elif self.config_changes:  # config.yaml above is what trains from now on; MLflow is told from which step
            self.tracker.log_config_changes(self.config_changes, self.step)
            self.tracker.log_artifact(self.out_dir / "config.yaml", f"config/step_{self.step}")

    # ------------------------------------------------------------------ what a trainer supplies
    def train_micro_batch(self, batch) -> StepResult:
        """Forward, backward and (at a boundary) optimizer step of one micro-batch, with one reduction over ranks
        (hvpmtl.dist.reduce_step); a non-finite loss on any rank means no rank back-propagated."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """After each optimizer step, before its metrics (pre-training: the EMA teacher)."""

    def step_figures(self, sums: dict) -> dict[str, float]:
        """Figures of one optimizer step from its micro-batches' reduced sums (host arithmetic only)."""
        return {}

    def evaluate_epoch(self) -> dict[str, float]:
        """At the end of each epoch (and of the run): metrics to log, the same on every rank."""
        return {}

    def save(self) -> Path:
        raise NotImplementedError

    def finish(self) -> None:
        """After the last checkpoint of a run that finished (export, final hooks)."""
        for hook in self.hooks:
            getattr(hook, "at_end", lambda *a: None)(self)

    def describe(self) -> str:
        return (f"{self.world} rank(s), {self.precision}, {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                f"global batch {self.global_batch}, from step {self.step}")

    def current_lr(self) -> float:
        return self.engine.get_lr()[0]

    def optimizer_step_skipped(self) -> bool:
        """After an accumulation boundary's engine.step(): did DeepSpeed skip the update (ZeRO-1/2 overflow
        on an inf/NaN gradient norm)? A Python bool DeepSpeed sets in step(): no device read."""
        return not self.engine.was_step_applied()

    # ------------------------------------------------------------------ the loop
    def _micro_batch(self, batch):
        """The trainer's micro-batch step; the run's first finite one also counts its FLOPs (FlopCounterMode)."""
        if self._flops_counted:
            return self.train_micro_batch(batch)
        result, flops = perf.count_flops(self.train_micro_batch, batch)
        if not result.nonfinite:
            self._flops_counted = True
            self.perf.flops_per_image = flops / self.cfg.optim.micro_batch_size
            self.log(f"perf: {self.perf.flops_per_image / 1e9:.4g} GFLOPs per image (forward and backward)")
        return result

    def train_one_epoch(self) -> int | None:
        """Runs until the epoch's batches are used up (None), or the step budget (EXIT_OK), preemption or a
        non-finite stop: returns the exit code to stop with."""
        acc: dict[str, float] = {}
        sums: dict = {}  # numpy arrays on the host
        n_micro, preempt, t0 = 0, False, time.perf_counter()
        if self.perf is None:
            self.perf = perf.start_step_perf(self.engine, self.device, self.precision, self.cfg.run.peak_tflops,
                                             self.world, self.log)
        pf = self.perf
        pf.other_s += pf.lap()  # since the last step: the epoch's evaluation, set_epoch
        for batch in self.loader:
            pf.data_wait_s += pf.lap()
            self.batches_seen += 1
            if self._skip_batches > 0:  # past the offending window, after a rollback
                self._skip_batches -= 1
                continue
            result = self._micro_batch(batch)
            pf.step_s += pf.lap()
            if result.nonfinite:
                code = self._skip_nonfinite(result.nonfinite)
                if code == ROLLED_BACK:  # the window's partial sums belong to the discarded weights
                    acc, sums, n_micro, t0 = {}, {}, 0, time.perf_counter()
                elif code is not None:
                    return code
                continue
            if self.heartbeat is not None:
                self.heartbeat.step = self.step
            for k, v in result.losses.items():
                acc[k] = acc.get(k, 0.0) + v
            for k, v in result.sums.items():
                sums[k] = sums[k] + v if k in sums else v
            n_micro, preempt = n_micro + 1, preempt or result.preempt
            if not result.boundary:
                continue
            if self.optimizer_step_skipped():  # no update: step, LR schedule and teacher stay where they are
                acc, sums, n_micro, t0 = {}, {}, 0, time.perf_counter()
                code = self._skipped_step()
                if code not in (None, ROLLED_BACK):
                    return code
                continue  # a preemption request is sticky: the next micro-batch carries it again
            self.nonfinite_in_row = 0
            self.step += 1
            self._apply_lr_scale()
            self.after_optimizer_step()
            self._log_step({f"{self.loss_prefix}{k}": v / n_micro for k, v in acc.items()}, sums,
                           n_micro * self.cfg.optim.micro_batch_size * self.world, time.perf_counter() - t0)
            acc, sums, n_micro, t0 = {}, {}, 0, time.perf_counter()
            for hook in self.hooks:
                getattr(hook, "after_step", lambda *a: None)(self, batch)
            if preempt or (self.checkpoint_every_steps and self.step % self.checkpoint_every_steps == 0):
                self.save()
            if preempt:
                saved = "not saved (not finite; a requeue resumes the last good one)" if self.unsaved else "saved"
                self.log(f"preempted at step {self.step}: checkpoint {saved}, exiting with {EXIT_PREEMPTED} "
                         "for requeue")
                return EXIT_PREEMPTED
            pf.other_s += pf.lap()  # hooks (evaluation, panels) and checkpoints: in the next step's figures
            if self.step >= self.total_steps:
                return EXIT_OK
        return None

    def _skip_nonfinite(self, names):
        """Counts a skipped micro-batch, then the policy: None (go on), ROLLED_BACK or an exit code."""
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        self.log(f"step {self.step + 1}: non-finite {', '.join(names)}; micro-batch skipped "
                 f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all)")
        self.tracker.log_metrics({"nonfinite_skipped": self.nonfinite_total}, self.step)
        return self._nonfinite_policy(f"non-finite losses (last from {', '.join(names)})")

    def _skipped_step(self):
        """Counts an optimizer step DeepSpeed skipped, then the policy: None, ROLLED_BACK or an exit code."""
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        norm = self.engine.get_global_grad_norm()  # DeepSpeed sets a Python float (inf) when it skips
        norm = f"{norm:g}" if isinstance(norm, (int, float)) else "not finite"
        self.log(f"step {self.step + 1}: DeepSpeed skipped the optimizer step (gradient norm {norm}); step, LR "
                 f"schedule and EMA teacher stay at step {self.step} ({self.nonfinite_in_row} in a row, "
                 f"{self.skipped_steps} skipped steps in all)")
        self.tracker.log_metrics({"train/skipped_steps": self.skipped_steps}, self.step)
        return self._nonfinite_policy("skipped optimizer steps")

    def _nonfinite_policy(self, what: str):
        """run.on_nonfinite once run.max_nonfinite_in_row events came in a row: None below the limit, ROLLED_BACK,
        or EXIT_NONFINITE (stop; the state is saved only if it is finite)."""
        r = self.cfg.run
        if self.nonfinite_in_row < r.max_nonfinite_in_row:
            return None
        if r.on_nonfinite == "rollback":
            if len(self.rollbacks) >= r.max_rollbacks:
                self.log(f"giving up: {len(self.rollbacks)} rollback(s) already (run.max_rollbacks={r.max_rollbacks})")
            elif self._rollback(what):
                return ROLLED_BACK
        self.log(f"stopping: {self.nonfinite_in_row} {what} in a row; saving the last good state")
        self.save()
        return EXIT_NONFINITE

    def _rollback(self, what: str) -> bool:
        """Reloads this run's newest good checkpoint on every rank; the data moves on. False: none to go back to."""
        found = checkpoint.rollback(self.engine, self.run_state, log=self.log)
        if found is None:
            self.log(f"{self.nonfinite_in_row} {what} in a row and no checkpoint of this run to roll back to")
            return False
        tag, client, rank_state = found
        r, in_row = self.cfg.run, self.nonfinite_in_row
        record = {"from_step": self.step, "to_step": int(client["step"]), "tag": tag.name, "epoch": self.epoch,
                  "batches": self.batches_seen - int(client.get("batches_seen", 0)) + r.rollback_skip_batches,
                  "reason": what}
        self.step = record["to_step"]
        self.restore_state(client, rank_state)
        self.rollbacks.append(record)
        self.nonfinite_in_row = 0
        self._skip_batches = r.rollback_skip_batches
        self._saved_step = self.step
        if r.rollback_lr_steps and r.rollback_lr_scale != 1:
            self._lr_scale_until = self.step + r.rollback_lr_steps
        self._apply_lr_scale()
        if self._bar is not None:
            self._bar.n = self.step
        lr = (f"; LR x{r.rollback_lr_scale:g} until step {self._lr_scale_until}"
              if self._lr_scale_until > self.step else "")
        self.log(f"rolled back after {in_row} {what} in a row: from step {record['from_step']} to {tag.name}; the "
                 f"data moves on, {record['batches']} micro-batches per rank skipped (rollback {len(self.rollbacks)} "
                 f"of at most {r.max_rollbacks}){lr}")
        self.tracker.log_metrics({"train/rollbacks": len(self.rollbacks), "train/rollback_to_step": record["to_step"],
                                  "train/rollback_from_step": record["from_step"],
                                  "train/rollback_skipped_batches": record["batches"]}, self.step)
        return True

    def _apply_lr_scale(self) -> None:
        """Within a rollback's LR window: every parameter group at rollback_lr_scale x the schedule's LR (from the
        scheduler's own value, so it never compounds; the next scheduler step restores the schedule)."""
        sched = getattr(self.engine, "lr_scheduler", None)
        if sched is None or self.step >= self._lr_scale_until:
            return
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr * self.cfg.run.rollback_lr_scale

    def _log_step(self, metrics: dict, sums: dict, images: int, dt: float) -> None:
        """The one place a step's metrics are assembled: to metrics.jsonl/MLflow every step, to the console on
        logging steps (or the progress bar). Values that need a device read (the gradient norm) only every
        run.log_every steps."""
        logging_step = self.step % self.cfg.run.log_every == 0 or self.step == 1
        metrics.update(self.step_figures(sums))
        metrics.update(lr=self.current_lr(), img_per_s=images / max(dt, 1e-9), epoch=self.epoch)
        metrics["train/skipped_steps"] = self.skipped_steps
        gn = self.engine.get_global_grad_norm() if logging_step else None
        if gn is not None:
            metrics["grad_norm"] = float(gn)
        if self.device.type == "cuda":
            metrics["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.perf is not None:
            metrics.update(self.perf.figures(images, self.device))
        self.tracker.log_metrics(metrics, self.step)
        if self.is_main:
            show_step(self._bar, metrics, [k for k in self.console_keys if k in metrics], logging_step,
                      f"{self.log_prefix} step {self.step}/{self.total_steps} epoch {self.epoch} "
                      f"{self._eta.text(self.step) if self._eta is not None else ''}".rstrip())

    def _end_epoch(self, used_up: bool) -> None:
        """The epoch's evaluation (logged), the epoch count, and a checkpoint every checkpoint_every_epochs."""
        metrics = self.evaluate_epoch()
        if metrics:
            metrics["epoch"] = self.epoch
            self.tracker.log_metrics(metrics, self.step)
            self.log(f"epoch {self.epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if not used_up:
            return
        self.epoch += 1
        if self.checkpoint_every_epochs and self.epoch % self.checkpoint_every_epochs == 0:
            self.save()

    def _more(self) -> bool:
        return self.step < self.total_steps and (self.max_epochs is None or self.epoch < self.max_epochs)

    def run(self) -> int:
        self._bar = open_bar(self.cfg, self.is_main, self.total_steps, self.step, self.progress_desc)
        self._eta = Eta(self.step, self.total_steps)
        self.log(self.describe())
        self.heartbeat = Heartbeat(self.rank, self.world)
        clear_stop_note(self.out_dir, self.rank)  # a previous process's
        code = EXIT_OK
        try:
            for hook in self.hooks:  # before the first step (the online evaluation of a new run's random init)
                getattr(hook, "at_start", lambda *a: None)(self)
            while self._more():
                self.loader.set_epoch(self.epoch)
                result = self.train_one_epoch()
                if result not in (None, EXIT_OK):
                    code = result
                    break
                self._end_epoch(used_up=result is None)
            if code == EXIT_OK:
                if self._saved_step != self.step:
                    self.save()
                if self.unsaved:  # the final state is not finite: not a finished run
                    self.log(f"stopping: {self.unsaved}")
                    code = EXIT_NONFINITE
                else:
                    self.finish()
        except Exception as e:  # noqa: BLE001 -- a lost peer is reported; an input error noted; all else re-raised
            lost = self.heartbeat.lost_ranks() if isinstance(e, (RuntimeError, dist.DistError)) else ""
            if not lost:
                # this rank stops on an input error (a bad image, a full disk: exit 2); its peers, which then lose
                # it in a collective, read why and stop with the same exit code instead of "a peer died" (exit 5)
                if self.world > 1:
                    write_stop_note(self.out_dir, self.rank, e)
                raise
            self.peer_lost = True  # entry.py exits at once
            code = exit_for_lost_peer(self.out_dir, self.world, self.rank, f"{self.log_prefix} rank {self.rank}",
                                      self.step + 1, lost, e)
        finally:
            self.heartbeat.close()
            if self._bar is not None:
                self._bar.close()
            self.tracker.close("FINISHED" if code in (EXIT_OK, EXIT_PREEMPTED) else "FAILED")
        return code
