"""Fine-tuning of a pre-trained backbone through DeepSpeed, every downstream task on the one loop of
hvpmtl/train/runtime.py. The config's `task` picks model, data and metric (hvpmtl/train/tasks/):

    classification  ImageFolder, top-1/top-5           (SimMIM's recipe; configs/finetune_simmim.yaml)
    multilabel      list files, mAP                    (data.train_list / data.val_list)
    detection       COCO layout, Mask R-CNN, box/mask AP (COCOeval)    (configs/det_*.yaml)
    segmentation    ADE20K layout, UperNet, mIoU/mAcc/aAcc             (configs/seg_*.yaml)

Started on every rank by launchers/finetune.py (deepspeed, torchrun or srun):

    deepspeed launchers/finetune.py --config configs/finetune_simmim.yaml \
        --set model.init=runs/x/backbone.safetensors --set data.train_dir=... --set data.val_dir=...

The backbone comes from model.init (an `hvpmtl export` file, read by hvpmtl.checkpoint.read_backbone_file)
or at random (model.random_init); AdamW with layer-wise LR decay; the learning
rate warms up from optim.warmup_lr to its peak (`peak_lr`: optim.lr, as in pre-training), then follows
optim.schedule (cosine, poly or step) to the end of optim.epochs or optim.max_steps. After every epoch the
task evaluates on all ranks; the best figure is kept and the model's predictions are logged as an image
panel. At the end the fine-tuned model is written as safetensors (model.safetensors). Set-up, checkpoints,
MLflow, preemption and exit codes as pre-training.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hvpmtl import checkpoint
from hvpmtl.config import FinetuneConfig
from hvpmtl.dist import StepResult, average_buffers, reduce_step
from hvpmtl.schedules import lambda_lr, lr_schedule
from hvpmtl.train import entry
from hvpmtl.train.args import finetune_parser
from hvpmtl.train.runtime import Trainer, seed_everything


def make_task(trainer):
    task = trainer.cfg.resolved_task
    if task == "detection":
        from hvpmtl.train.tasks.detection import DetectionTask
        return DetectionTask(trainer)
    if task == "segmentation":
        from hvpmtl.train.tasks.segmentation import SegmentationTask
        return SegmentationTask(trainer)
    from hvpmtl.train.tasks.classification import ClassificationTask
    return ClassificationTask(trainer)


def peak_lr(cfg: FinetuneConfig, global_batch: int) -> float:
    """optim.lr; with optim.lr_scale_batch N, the linear scaling rule: optim.lr x global batch / N."""
    o = cfg.optim
    return o.lr * global_batch / o.lr_scale_batch if o.lr_scale_batch else o.lr


class Finetuner(Trainer):
    log_prefix = "[hvpmtl finetune]"
    progress_desc = "finetune"
    loss_prefix = "train/"
    console_keys = ("train/loss", "lr", "img_per_s")

    def __init__(self, cfg: FinetuneConfig, resume: str = "auto"):
        super().__init__(cfg, resume)
        o = cfg.optim
        self.max_epochs = o.epochs
        self.checkpoint_every_epochs = cfg.run.checkpoint_every_epochs
        self.task = make_task(self)
        self.metric = self.task.metric
        self.task.build_loaders()  # data errors surface here, before any model or engine exists
        self.loader, self.num_classes = self.task.loader, self.task.num_classes

        seed_everything(cfg.run.seed)  # identical head initialisation on every rank
        model = self.task.build_model()
        self.lr = peak_lr(cfg, self.global_batch)
        self.steps_per_epoch = max(1, len(self.loader) // o.grad_accum_steps)
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps:
            self.total_steps = min(self.total_steps, o.max_steps)
        optimizer = torch.optim.AdamW(self.task.param_groups(model, self.lr), lr=self.lr, betas=tuple(o.betas))
        schedule = lr_schedule(o, self.lr, self.steps_per_epoch, start=o.warmup_lr, total_steps=self.total_steps,
                               length=self.total_steps)
        self.engine = self.build_engine(model, optimizer, lambda_lr(optimizer, schedule))

        self.best = 0.0
        seed_everything(cfg.run.seed + 1000 * self.rank + 1)  # ranks draw their own drop-path / mixup
        resumed = self.resume(self.loader)
        if resumed:
            self.best = resumed[0].get("best", resumed[0].get("best_top1", 0.0))  # best_top1: before multi-label
        self.start_run(resumed, {"backbone": cfg.model.backbone, "init": cfg.model.init or "random",
                                 "task": cfg.resolved_task})
        if self.is_main:
            (self.out_dir / "classes.json").write_text(json.dumps(self.task.classes))

    def save(self) -> Path:
        return self.save_checkpoint(self.loader, {"best": self.best}, {})

    # ------------------------------------------------------------------ the step, for runtime's loop
    def train_micro_batch(self, batch) -> StepResult:
        """One collective and one host read per micro-batch: the loss (and its parts), their finiteness and the
        preemption flag of every rank; a non-finite loss on any rank means no rank back-propagates (runtime's
        policy counts it)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        loss, parts = self.task.loss(self.engine, batch)
        result = reduce_step({"loss": loss, **parts}, {}, self.preemption.requested, self.world)
        result.boundary = boundary
        if not result.nonfinite:
            self.engine.backward(loss)
            self.engine.step()
        return result

    def current_lr(self) -> float:
        return max(self.engine.get_lr())  # the head's (layer decay scales the rest)

    def evaluate_epoch(self) -> dict[str, float]:
        model = self.engine.module
        average_buffers(model, self.world)  # one BatchNorm state on every rank, evaluated and saved
        was_training = model.training
        model.eval()
        try:
            metrics = self.task.evaluate(model)
            panel = self.task.panel(model) if self.is_main else None
        finally:
            model.train(was_training)
        if panel is not None:
            self.tracker.log_image(panel, f"panels/{self.cfg.resolved_task}_step{self.step:07d}.png")
        self.best = max(self.best, metrics[self.metric])
        metrics[self.metric.replace("/", "/best_", 1)] = self.best
        return metrics

    def export_model(self) -> Path | None:
        """The fine-tuned model as safetensors (fp32 master weights under bf16/fp16)."""
        from safetensors.torch import save_file

        if not self.is_main:
            return None
        state = self.engine.module.state_dict()
        if self.precision != "fp32":  # the module holds rounded copies: the checkpoint's fp32 master weights
            state = checkpoint.read_weights(checkpoint.candidates(self.ckpt_dir)[0], "student")[0]
        path = self.out_dir / "model.safetensors"
        meta = {"format": "pt", "timm_model": self.cfg.model.backbone, "img_size": str(self.cfg.model.img_size),
                "num_classes": str(self.num_classes), "task": self.cfg.resolved_task, **self.task.export_metadata()}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(path), metadata=meta)
        self.tracker.log_artifact(path, "model")
        return path

    def describe(self) -> str:
        return (f"{self.world} rank(s), {self.precision}, {self.cfg.resolved_task}: {self.cfg.optim.epochs} epochs "
                f"x {self.steps_per_epoch} steps ({self.total_steps} in all), global batch {self.global_batch}, "
                f"peak lr {self.lr:.3g}, {self.task.describe()}, from epoch {self.epoch}")

    def finish(self) -> None:
        if (path := self.export_model()) is not None:
            self.log(f"fine-tuned model written to {path}")


def main(args=None) -> int:
    """argv list or parsed args (launchers/finetune.py parses before the heavy imports, for a fast --help)."""
    return entry.main(args, finetune_parser, FinetuneConfig, Finetuner, name="hvpmtl finetune")
