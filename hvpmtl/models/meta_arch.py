"""HVP-MTL meta-architecture: the student (trained by DeepSpeed) and its momentum teacher side by side.

The student is the nn.Module that DeepSpeed wraps: its forward takes a batch plus the teacher's
targets and returns every objective. The teacher (EMA of backbone + label decoder) is kept in
fp32 outside the engine: no gradients, no optimizer state, no ZeRO partitioning, and it is
updated only at gradient-accumulation boundaries.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from hvpmtl.config import ExperimentConfig
from hvpmtl.losses.distillation import symmetric_kl_loss
from hvpmtl.losses.simmim import simmim_loss
from hvpmtl.losses.swav import sinkhorn_codes, swapped_prediction_loss
from hvpmtl.losses.weighted_asl import WeightedASLLoss
from hvpmtl.models.backbone import MaskableBackbone
from hvpmtl.models.collapse import distill_sums, swav_sums
from hvpmtl.models.heads import MIMDecoder, PrototypeHead
from hvpmtl.models.label_decoder import LabelDecoder

OBJECTIVES = ("asl", "swav", "mim", "distill")


class Student(nn.Module):
    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        m, ob = cfg.model, cfg.objectives
        self.cfg = cfg
        self.backbone = MaskableBackbone(m.backbone, m.img_size, m.drop_path_rate, m.grad_checkpointing)
        d0 = self.backbone.embed_dim
        self.weights = {k: getattr(ob, k).weight if getattr(ob, k).enabled else 0.0 for k in OBJECTIVES}
        w = self.weights
        # Heads of switched-off objectives are not built: no dead parameters in the optimizer or ZeRO buckets.
        self.label_decoder = LabelDecoder(
            d0, cfg.data.num_classes, m.decoder_dim, m.decoder_layers, m.decoder_heads, m.decoder_ffn_dim,
            m.decoder_dropout, m.decoder_self_attn, m.grad_checkpointing, m.decoder_groups,
        ) if w["asl"] or w["distill"] else None
        self.prototype_head = PrototypeHead(d0, m.proto_hidden_dim, m.proto_out_dim,
                                            m.num_prototypes, m.proto_head_norm) if w["swav"] else None
        self.mim_decoder = MIMDecoder(d0, self.backbone.stride) if w["mim"] else None
        self.asl = WeightedASLLoss(ob.asl.eta, ob.asl.gamma_pos, ob.asl.gamma_neg, ob.asl.clip, ob.asl.eps)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases (handled by ndim)."""
        names = {"backbone.mask_token", "label_decoder.label_embed", "label_decoder.group_embed",
                 "prototype_head.prototypes.weight"}
        nwd = getattr(self.backbone.model, "no_weight_decay", None)
        for n in (nwd() if nwd else ()):
            names.add(f"backbone.model.{n}")
        return names

    def _asl(self, logits, labels):
        # sum over classes, mean over the batch: the step does not depend on the split of the global batch
        return self.asl(logits, labels) / logits.shape[0]

    def forward(self, view1, view2, mask, labels, teacher_sim=None, queue=None, freeze_prototypes: bool = False):
        """Returns a dict: 'loss' (weighted total) and each enabled objective's unweighted value, plus
        'z1', 'z2' (detached SwAV embeddings for the queue) and 'collapse' (hvpmtl.models.collapse sums)."""
        # With half-precision weights (DeepSpeed bf16), autocast inside the module: the engine's forward
        # runs with autocast off, and fp32 tensors made on the fly (timm Swin's shifted-window attention
        # mask on H100, seen 2026-11-26) would otherwise meet bf16 activations in a matmul.
        dtype = self.backbone.mask_token.dtype
        with torch.autocast(view1.device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
            return self._forward(view1, view2, mask, labels, teacher_sim, queue, freeze_prototypes)

    def _forward(self, view1, view2, mask, labels, teacher_sim, queue, freeze_prototypes):
        ob = self.cfg.objectives
        w = self.weights
        out: dict[str, torch.Tensor] = {}
        collapse: dict[str, torch.Tensor] = {}
        need_view2 = w["swav"] > 0 or w["asl"] > 0
        feat1 = self.backbone(view1, mask if w["mim"] > 0 else None)
        feat2 = self.backbone(view2) if need_view2 else None
        total = feat1.new_zeros((), dtype=torch.float32)
        if w["asl"] > 0 or w["distill"] > 0:
            logits1, g1 = self.label_decoder(feat1)
            if w["asl"] > 0:
                logits2, _ = self.label_decoder(feat2)
                out["asl"] = (self._asl(logits1, labels) + self._asl(logits2, labels)) / 2
            if w["distill"] > 0:
                if teacher_sim is None:
                    raise ValueError("distillation is enabled but no teacher targets were given")
                student_sim = self.label_decoder.label_similarity(g1)
                out["distill"] = symmetric_kl_loss(student_sim, teacher_sim, ob.distill.temperature)
                collapse.update(distill_sums(student_sim, teacher_sim, ob.distill.temperature))
        if w["swav"] > 0:
            head = self.prototype_head
            # view1 "unmasked": one more forward, so SwAV's codes and predictions come from whole images
            swav_feat1 = self.backbone(view1) if ob.swav.view1 == "unmasked" and w["mim"] > 0 else feat1
            z1, s1 = head(swav_feat1)
            z2, s2 = head(feat2)
            if freeze_prototypes:  # SwAV keeps prototypes fixed for the first iterations
                p = head.unit_prototypes().detach()
                s1, s2 = z1 @ p.t(), z2 @ p.t()
            with torch.no_grad():
                q1 = self._codes(s1, queue[0] if queue is not None else None)
                q2 = self._codes(s2, queue[1] if queue is not None else None)
            out["swav"] = swapped_prediction_loss(s1, s2, q1, q2, ob.swav.temperature)
            out["z1"], out["z2"] = z1.detach(), z2.detach()
            collapse.update(swav_sums(torch.cat([s1, s2]), torch.cat([q1, q2]), torch.cat([z1, z2]),
                                      ob.swav.temperature))
        if w["mim"] > 0:
            rec = self.mim_decoder(feat1)
            out["mim"] = simmim_loss(rec, view1, mask)
        for k in OBJECTIVES:
            if k in out:
                total = total + w[k] * out[k]
        out["loss"] = total
        out["collapse"] = collapse
        return out

    def _codes(self, scores, queue_z):
        sw = self.cfg.objectives.swav
        n = scores.shape[0]
        if queue_z is not None and queue_z.numel():
            p = self.prototype_head.unit_prototypes()
            scores = torch.cat([queue_z.to(p.dtype) @ p.t(), scores])
        return sinkhorn_codes(scores.float(), sw.epsilon, sw.sinkhorn_iters, sw.t_max)[-n:]


class Teacher(nn.Module):
    """EMA copy of the student's backbone + label decoder; produces the distillation targets."""

    def __init__(self, student: Student):
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone).float()
        self.label_decoder = copy.deepcopy(student.label_decoder).float()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval: no dropout / drop-path in the targets
        return super().train(False)

    @torch.no_grad()
    def forward(self, view1: torch.Tensor) -> torch.Tensor:
        _, g = self.label_decoder(self.backbone(view1))
        return self.label_decoder.label_similarity(g)

    def ema_pairs(self, student: Student):
        t = list(self.backbone.parameters()) + list(self.label_decoder.parameters())
        s = list(student.backbone.parameters()) + list(student.label_decoder.parameters())
        return t, s

    @torch.no_grad()
    def update(self, student: Student, momentum: float):
        """t <- m t + (1 - m) s, in fp32 whatever the student's dtype."""
        t, s = self.ema_pairs(student)
        s32 = [p.detach().to(torch.float32) for p in s]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s32, alpha=1.0 - momentum)


def teacher_momentum(cfg: ExperimentConfig, step: int, total_steps: int) -> float:
    d = cfg.objectives.distill
    if d.momentum_schedule == "constant" or total_steps <= 0:
        return d.momentum
    # BYOL/DINO cosine: m goes from momentum to momentum_end over the run
    return d.momentum_end - (d.momentum_end - d.momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2
