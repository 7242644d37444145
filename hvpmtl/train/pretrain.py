"""HVP-MTL pre-training: set-up (`Pretrainer.__init__`) and its step (`train_micro_batch`: the meta-arch's
forward_backward), run by the one loop of hvpmtl/train/runtime.py.

Started on every rank by launchers/pretrain.py (deepspeed, torchrun or srun), which hands over the step
hooks (online evaluation, image panels, the final backbone export: hvpmtl/eval/hooks.py). Exit codes: see
hvpmtl/train/runtime.py.
"""
from __future__ import annotations

from hvpmtl.config import ExperimentConfig
from hvpmtl.dist import StepResult
from hvpmtl.models.backbone import patch_size_of
from hvpmtl.models.collapse import CollapseMonitor
from hvpmtl.models.meta_arch import OBJECTIVES, HVPMetaArch
from hvpmtl.train import entry
from hvpmtl.train.args import pretrain_parser
from hvpmtl.train.optim import build_optimizer
from hvpmtl.train.runtime import Trainer, seed_everything
from hvpmtl.schedules import lambda_lr, lr_schedule, momentum_schedule


class Pretrainer(Trainer):
    """hooks: see runtime.Trainer (online evaluation, image panels, the final export)."""

    progress_desc = "pretrain"
    console_keys = ("loss", *OBJECTIVES, "swav/code_entropy", "swav/protos_used", "lr", "img_per_s")

    def __init__(self, cfg: ExperimentConfig, resume: str = "auto", hooks=()):
        super().__init__(cfg, resume)
        self.hooks = list(hooks)
        self.checkpoint_every_steps = cfg.run.checkpoint_every
        self.loader = self._build_loader()  # data errors surface here, before any model or engine exists
        o = cfg.optim
        self.steps_per_epoch = o.steps_per_epoch or max(1, len(self.loader) // o.grad_accum_steps)
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.momentum = momentum_schedule(cfg.objectives.distill, self.total_steps)  # total_steps: the run's own length

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.meta = HVPMetaArch(cfg, self.device, self.input_dtype, self.world)
        optimizer = build_optimizer(self.meta.student, o, self.meta.student.no_weight_decay_names())
        scheduler = lambda_lr(optimizer, lr_schedule(o, o.lr, self.steps_per_epoch, length=self.total_steps))
        self.engine = self.build_engine(self.meta.student, optimizer, scheduler)
        self.meta.attach(self.engine)

        self.collapse_monitor = (CollapseMonitor(cfg.run.collapse_warn_steps, cfg.model.proto_out_dim)
                                 if cfg.run.collapse_warn_steps else None)
        seed_everything(cfg.run.seed + 1000 * self.rank + 1)  # ranks draw their own dropout / drop-path
        resumed = self.resume(self.loader)
        if resumed:
            self.meta.load_state(*resumed)
        self.start_run(resumed, {"backbone": cfg.model.backbone})
        self._report_left_out()

    def finite_also(self) -> tuple:
        return (("teacher", self.meta.teacher),)

    def _build_loader(self):
        cfg = self.cfg
        patch = patch_size_of(cfg.model.backbone, cfg.model.img_size)
        kw = dict(batch_size=cfg.optim.micro_batch_size, patch_size=patch, rank=self.rank, world_size=self.world,
                  dtype=self.input_dtype)
        if cfg.data.format == "tensors":
            from hvpmtl.data.loaders.tensor_source import TensorSource
            return TensorSource(cfg.data, device=self.device, **kw)
        from hvpmtl.data.loaders.pretrain import build_pretrain_loader
        return build_pretrain_loader(cfg.data, local_rank=self.local_rank, seed=cfg.data.seed, **kw)

    def _report_left_out(self) -> None:
        """Every sample the data left out, counted and shown: printed at start, and the counts fixed at start set
        as MLflow tags (a param could not change on resume), not one-point metric charts."""
        skipped = getattr(self.loader, "skipped", None)
        if self.is_main and skipped is not None:
            desc = self.loader.skipped_description()
            self.log(f"data: {desc}")
            self.tracker.set_tags({"data.left_out": desc, "data.samples": skipped.total,
                                   "data.left_out.parse_errors": skipped.parse_errors,
                                   "data.left_out.skip_list": skipped.skip_list,
                                   "data.left_out.skip_corrupt": skipped.skip_corrupt})

    def _data_metrics(self) -> dict:
        """Every step, so they draw lines (a zero reads as none): data/left_out, the samples left out so far for
        any reason, and data/failed_reads, those that failed when read (rank 0's count)."""
        skipped = getattr(self.loader, "skipped", None)
        if skipped is None:
            return {}
        return {"data/left_out": float(skipped.left_out), "data/failed_reads": float(skipped.runtime)}

    def save(self):
        return self.save_checkpoint(self.loader, self.meta.client_state(), self.meta.rank_state())

    # ------------------------------------------------------------------ the step, for runtime's loop
    def train_micro_batch(self, batch) -> StepResult:
        return self.meta.forward_backward(batch, self.step, preempt=self.preemption.requested)

    def after_optimizer_step(self) -> None:
        self.meta.update_teacher(self.momentum[self.step])

    def step_figures(self, sums: dict) -> dict[str, float]:
        figures = self.meta.figures(sums)
        if self.collapse_monitor is not None:  # host arithmetic on the step's reduced figures: no device read
            for msg in self.collapse_monitor.update(figures, self.step):
                self.log(msg)
        return {**figures, **self._data_metrics()}


def main(args=None, hooks=()) -> int:
    """argv list or parsed args (launchers/pretrain.py parses before the heavy imports, for a fast --help)."""
    return entry.main(args, pretrain_parser, ExperimentConfig,
                      lambda cfg, resume: Pretrainer(cfg, resume, hooks), name="hvpmtl")
