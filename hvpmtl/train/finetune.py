"""Single-label fine-tuning of a pre-trained backbone on an ImageFolder, through DeepSpeed (SimMIM's recipe).

Started on every rank by launchers/finetune.py (deepspeed, torchrun or srun):

    deepspeed launchers/finetune.py --config configs/finetune_simmim.yaml \
        --set model.init=runs/x/backbone.safetensors --set data.train_dir=... --set data.val_dir=...

A timm model with a fresh `num_classes` head is initialised from an exported backbone (timm
resamples position embeddings / relative-position tables when the size differs) or at random;
AdamW with layer-wise LR decay (timm's param_groups_layer_decay), linear warm-up from warmup_lr,
then cosine to min_lr, per step; label smoothing, optional mixup/cutmix (timm.data.Mixup); top-1
(and top-5) on data.val_dir after every epoch; checkpoints through hvpmtl.train.checkpoint;
MLflow through the engine's Tracker. Exit codes: 0 done, 2 config error, 3 preempted (requeue).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hvpmtl.config import ConfigError
from hvpmtl.data.issues import DataError
from hvpmtl.dist import all_reduce_mean, any_rank, init_distributed
from hvpmtl.eval.finetune_config import FinetuneConfig, load_finetune_config, save_finetune_config
from hvpmtl.train import checkpoint
from hvpmtl.train.pretrain import (EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, Preemption, build_ds_config,
                                   prepare_deepspeed, resolve_precision, seed_everything)
from hvpmtl.train.tracking import Tracker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fine-tune a pre-trained backbone (run through deepspeed, torchrun or srun)")
    p.add_argument("--config", required=True, help="fine-tuning YAML (configs/finetune_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=10 (repeatable)")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint dir")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model and optimizer


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """timm classifier; weights from model.init (any `hvpmtl export` format) unless random_init."""
    import timm
    from safetensors.torch import save_file

    from hvpmtl.eval.export import read_backbone_file

    m = cfg.model
    kw = dict(num_classes=num_classes, img_size=m.img_size, drop_path_rate=m.drop_path_rate, global_pool=m.global_pool)
    if m.backbone.startswith("vit_") and m.global_pool == "avg":
        kw["fc_norm"] = False  # keep the pre-trained final norm, pool after it (as the pre-training features)
    if m.random_init:
        return timm.create_model(m.backbone, pretrained=False, **kw)
    state, _ = read_backbone_file(m.init)
    with tempfile.TemporaryDirectory() as tmp:  # timm's file loader adapts sizes; give it safetensors
        f = Path(tmp) / "init.safetensors"
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(f))
        model = timm.create_model(m.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)), **kw)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    head = {k for k in own if k.startswith(("head.", "fc_norm."))}
    missing = sorted(set(own) - set(state) - head)
    if unexpected or missing:
        raise ConfigError(f"model.init {m.init}: does not fit timm '{m.backbone}' (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}); was it exported from another architecture?")
    return model


def param_groups(model: nn.Module, cfg: FinetuneConfig, lr: float) -> list[dict]:
    """Layer-wise LR decay groups; each group's lr is lr x its layer scale (the schedule multiplies it)."""
    from timm.optim import param_groups_layer_decay

    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(model, cfg.optim.weight_decay, no_weight_decay_list=nwd,
                                      layer_decay=cfg.optim.layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def finetune_lr(step: int, warmup_steps: int, total_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """SimMIM's per-step schedule: linear from warmup_lr to lr over the warm-up, then cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_lr(cfg: FinetuneConfig, global_batch: int) -> float:
    return cfg.optim.base_lr * global_batch / cfg.optim.lr_scale_batch


# ----------------------------------------------------------------------------- trainer


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, resume: str = "auto"):
        import deepspeed

        from hvpmtl.data.imagefolder import build_imagefolder_loader

        self.cfg = cfg
        self.rank, self.local_rank, self.world = init_distributed(cfg.run.collective_timeout_s)
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.precision = resolve_precision(cfg)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        ds_config = build_ds_config(cfg, self.world, self.precision)
        self.out_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        d, o = cfg.data, cfg.optim
        common = dict(device=d.device, num_threads=d.num_threads, local_rank=self.local_rank, dtype=self.input_dtype)
        self.train_loader = build_imagefolder_loader(d.train_dir, o.micro_batch_size, cfg.model.img_size, train=True,
                                                     rank=self.rank, world_size=self.world, seed=d.seed, **common)
        self.val_loader = build_imagefolder_loader(d.val_dir, o.micro_batch_size, cfg.model.img_size, train=False,
                                                   rank=self.rank, world_size=self.world, **common)
        classes = self.train_loader.classes
        if self.val_loader.classes != classes:
            raise ConfigError(f"data.val_dir {d.val_dir}: class folders differ from data.train_dir {d.train_dir}")
        self.num_classes = cfg.model.num_classes or len(classes)
        if self.num_classes < len(classes):
            raise ConfigError(f"model.num_classes={self.num_classes} but {d.train_dir} has {len(classes)} classes")

        seed_everything(cfg.run.seed)  # identical head initialisation on every rank
        model = build_model(cfg, self.num_classes)
        self.global_batch = ds_config["train_batch_size"]
        self.lr = peak_lr(cfg, self.global_batch)
        self.steps_per_epoch = max(1, len(self.train_loader) // o.grad_accum_steps)
        self.total_steps = o.epochs * self.steps_per_epoch
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        optimizer = torch.optim.AdamW(param_groups(model, cfg, self.lr), lr=self.lr, betas=tuple(o.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: finetune_lr(s, warmup, self.total_steps, self.lr, o.warmup_lr, o.min_lr) / self.lr)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, dist_init_required=False)
        self.mixup = None
        if d.mixup > 0 or d.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                               switch_prob=d.mixup_switch_prob, mode="batch", label_smoothing=d.label_smoothing,
                               num_classes=self.num_classes)

        self.step, self.epoch, self.best_top1 = 0, 0, 0.0
        seed_everything(cfg.run.seed + 1000 * self.rank + 1)  # ranks draw their own drop-path / mixup
        run_id = self._resume(resume) if resume != "none" else None
        self.preemption = Preemption()
        self.tracker = Tracker(cfg, active=self.is_main, run_id=run_id)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_finetune_config(cfg, self.out_dir / "config.yaml")
            (self.out_dir / "classes.json").write_text(json.dumps(classes))
            if run_id is None:
                self.tracker.log_artifact(self.out_dir / "config.yaml", "config")
                self.tracker.set_tags({"world_size": self.world, "precision": self.precision,
                                       "backbone": cfg.model.backbone, "init": cfg.model.init or "random"})

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[hvpmtl finetune] {msg}", flush=True)

    def _resume(self, resume: str):
        found = checkpoint.resume(self.engine, self.ckpt_dir, resume, log=self.log)
        if found is None:
            return None
        _, client, rank_state = found
        self.step, self.epoch, self.best_top1 = client["step"], client["epoch"], client.get("best_top1", 0.0)
        self.train_loader.load_state_dict(rank_state["data"])
        checkpoint.set_rng_state(rank_state["rng"])
        return client.get("mlflow_run_id")

    def save(self, next_epoch: int) -> Path:
        client = {"step": self.step, "epoch": next_epoch, "best_top1": self.best_top1,
                  "mlflow_run_id": self.tracker.run_id}
        rank_state = {"rng": checkpoint.rng_state(), "data": self.train_loader.state_dict()}
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state, self.cfg.run.keep_checkpoints)
        self.log(f"checkpoint {path}")
        return path

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 2:  # mixup/cutmix soft targets (label smoothing included)
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.data.label_smoothing)

    def train_one_epoch(self) -> int | None:
        cfg = self.cfg
        self.engine.train()
        acc, n = 0.0, 0
        t0 = time.perf_counter()
        for batch in self.train_loader:
            x = batch["image"].to(self.device, self.input_dtype, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            boundary = self.engine.is_gradient_accumulation_boundary()
            loss = self._loss(self.engine(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite fine-tuning loss at step {self.step + 1} (epoch {self.epoch})")
            self.engine.backward(loss)
            self.engine.step()
            acc += loss.item()
            n += 1
            if not boundary:
                continue
            self.step += 1
            if self.step % cfg.run.log_every == 0 or self.step == 1:
                m = all_reduce_mean({"train/loss": acc / n}, self.device)
                m["lr"] = max(self.engine.get_lr())  # the head's (layer decay scales the others down)
                m["img_per_s"] = n * cfg.optim.micro_batch_size * self.world / max(time.perf_counter() - t0, 1e-9)
                self.tracker.log_metrics(m, self.step)
                self.log(f"epoch {self.epoch} step {self.step}/{self.total_steps} "
                         + " ".join(f"{k}={v:.4g}" for k, v in m.items()))
                acc, n, t0 = 0.0, 0, time.perf_counter()
            if any_rank(self.preemption.requested, self.device):
                self.save(self.epoch)
                self.log(f"preempted at step {self.step}: checkpoint saved, exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        return None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """top-1 / top-5 (percent) and mean cross-entropy over every validation image, all ranks summed."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        k = min(5, self.num_classes)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # n, top1, top5, loss
        try:
            for batch in self.val_loader:
                x = batch["image"].to(self.device, self.input_dtype)
                y = batch["label"].to(self.device)
                logits = model(x).float()
                topk = logits.topk(k, dim=1).indices
                sums[0] += y.numel()
                sums[1] += (topk[:, 0] == y).sum()
                sums[2] += (topk == y[:, None]).any(dim=1).sum()
                sums[3] += F.cross_entropy(logits, y, reduction="sum")
        finally:
            model.train(was_training)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(sums)
        n = max(1.0, float(sums[0]))
        return {"val/top1": 100 * float(sums[1]) / n, f"val/top{k}": 100 * float(sums[2]) / n,
                "val/loss": float(sums[3]) / n, "val/images": float(sums[0])}

    def export_model(self) -> Path | None:
        """The fine-tuned classifier as timm safetensors (fp32 master weights under bf16/fp16)."""
        from safetensors.torch import save_file

        state = self.engine.module.state_dict()
        if self.precision != "fp32":
            tag = checkpoint.candidates(self.ckpt_dir)[0]
            if self.is_main:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        if not self.is_main:
            return None
        path = self.out_dir / "model.safetensors"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(path),
                  metadata={"format": "pt", "timm_model": self.cfg.model.backbone,
                            "img_size": str(self.cfg.model.img_size), "num_classes": str(self.num_classes)})
        self.tracker.log_artifact(path, "model")
        return path

    def run(self) -> int:
        cfg = self.cfg
        self.log(f"{self.world} rank(s), {self.precision}, {cfg.optim.epochs} epochs x {self.steps_per_epoch} steps, "
                 f"global batch {self.global_batch}, peak lr {self.lr:.3g}, {self.num_classes} classes, "
                 f"from epoch {self.epoch}")
        code = EXIT_OK
        try:
            while self.epoch < cfg.optim.epochs:
                self.train_loader.set_epoch(self.epoch)
                result = self.train_one_epoch()
                if result is not None:
                    code = result
                    break
                metrics = self.evaluate()
                self.best_top1 = max(self.best_top1, metrics["val/top1"])
                metrics.update({"epoch": self.epoch, "val/best_top1": self.best_top1})
                self.tracker.log_metrics(metrics, self.step)
                self.log(f"epoch {self.epoch}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                self.epoch += 1
                if self.epoch % cfg.run.checkpoint_every_epochs == 0 or self.epoch == cfg.optim.epochs:
                    self.save(self.epoch)
            if code == EXIT_OK:
                path = self.export_model()
                if path is not None:
                    self.log(f"fine-tuned model written to {path}")
        finally:
            self.tracker.close("FINISHED" if code in (EXIT_OK, EXIT_PREEMPTED) else "FAILED")
        return code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"hvpmtl finetune: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    prepare_deepspeed()
    try:
        trainer = Finetuner(cfg, args.resume)
    except (ConfigError, DataError) as e:
        print(f"hvpmtl finetune: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    code = trainer.run()
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
