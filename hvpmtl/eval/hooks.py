"""The evaluation that runs inside a pre-training run, as step hooks handed to the trainer by
launchers/pretrain.py (hvpmtl/train never imports hvpmtl/eval):

  OnlineEval      every run.eval_every steps, and at step 0 of a new run (the random init, the baseline every
                  later evaluation is printed beside), every rank: kNN / linear-probe mAP of the evaluated backbone
  ImagePanels     every run.image_log_every steps, every rank (rank 0 logs): MLflow image panels
  ExportBackbone  after the last step, rank 0: <run.output_dir>/backbone.safetensors (timm keys), to MLflow too

A hook sees the trainer: cfg, step, rank, world, device, is_main, out_dir, tracker, engine, meta (the
HVPMetaArch: student, teacher, eval_backbone) and log(). The backbone evaluated and exported is the one
`hvpmtl export`/`hvpmtl eval` take by default at that step (hvpmtl.schedules.default_weights: the student until
the EMA teacher has left its random start).
"""
from __future__ import annotations


def evaluated_backbone(trainer):
    """(backbone, 'teacher'|'student', why) at the trainer's current step."""
    from hvpmtl.schedules import default_weights

    which, why = default_weights(trainer.cfg, trainer.step, trainer.meta.teacher is not None)
    return trainer.meta.eval_backbone(which), which, why


class OnlineEval:
    def __init__(self):
        self.evaluator = None  # made at the first evaluation: the held-out list is read once per run
        self.random_init: dict[str, float] | None = None  # the scores at step 0: the untrained baseline

    def at_start(self, trainer) -> None:
        if not trainer.cfg.run.eval_every:
            return
        if trainer.step == 0:
            self._evaluate(trainer)
        elif trainer.is_main:  # a resumed run: its step-0 scores from metrics.jsonl
            from hvpmtl.eval.online import random_init_scores
            self.random_init = random_init_scores(trainer.out_dir / "metrics.jsonl")

    def after_step(self, trainer, batch) -> None:
        every = trainer.cfg.run.eval_every
        if not every or trainer.step % every:
            return
        self._evaluate(trainer)

    def _evaluate(self, trainer) -> None:
        from hvpmtl.eval.online import OnlineEvaluator, console_line

        if self.evaluator is None:
            self.evaluator = OnlineEvaluator(trainer.cfg, device=trainer.device, rank=trainer.rank,
                                             world_size=trainer.world)
        scores = self.evaluator(evaluated_backbone(trainer)[0])
        trainer.tracker.log_metrics(scores, trainer.step)
        if trainer.step == 0:
            self.random_init = scores
        trainer.log(console_line(trainer.step, scores, self.random_init))


class ImagePanels:
    PANEL_IMAGES = 8

    def __init__(self):
        self.batch = None  # a fixed set of images for the panels, from the first step
        self.whole = None  # their whole images (rank 0), for the labels panel

    def after_step(self, trainer, batch) -> None:
        if self.batch is None:
            self.batch = {k: v[:self.PANEL_IMAGES].detach().clone() for k, v in batch.items()}
        every = trainer.cfg.run.image_log_every
        if not every or (trainer.step % every and trainer.step != trainer.total_steps):  # and at the last step
            return
        from hvpmtl.eval.visualize import log_panels, whole_images

        if trainer.is_main and self.whole is None:
            self.whole = whole_images(trainer.loader, self.batch["index"].view(-1).tolist(),
                                      trainer.cfg.data.allow_outside_root)

        log_panels(trainer.tracker, trainer.engine.module, self.batch, trainer.cfg, trainer.step,
                   world_size=trainer.world, is_main=trainer.is_main, whole=self.whole)


class ExportBackbone:
    def at_end(self, trainer) -> None:
        if not trainer.is_main:
            return
        from hvpmtl.eval.export import save_timm_backbone

        backbone, which, why = evaluated_backbone(trainer)
        path = save_timm_backbone(backbone, trainer.out_dir / "backbone.safetensors",
                                  {"which": which, "step": trainer.step, "run_id": trainer.run_state.run_id})
        trainer.tracker.log_artifact(path, "backbone")
        trainer.log(f"backbone ({which}: {why}) exported to {path}")


def pretrain_hooks() -> list:
    return [OnlineEval(), ImagePanels(), ExportBackbone()]
