"""HVP-MTL meta-architecture: the student (trained by DeepSpeed), its momentum teacher, the SwAV queue and
the step's precision, owned together by `HVPMetaArch` (dinov2's SSLMetaArch).

The student is the nn.Module that DeepSpeed wraps: its forward takes a batch plus the teacher's targets and
returns every objective. The teacher (EMA of backbone + label decoder) is kept in fp32 outside the engine:
no gradients, no optimizer state, no ZeRO partitioning, updated only at gradient-accumulation boundaries.

`HVPMetaArch.forward_backward(batch, step)` runs one micro-batch and returns a `StepResult`; the losses,
the non-finite flags, the preemption flag and the heads' diagnostic sums travel in ONE all-reduce, read
on the host once (the step cannot decide to back-propagate without it). Nothing else in the step reads
a device value.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from hvpmtl.config import ExperimentConfig
from hvpmtl.dist import StepResult, reduce_step
from hvpmtl.losses.asl import WeightedASLLoss
from hvpmtl.losses.distillation import symmetric_kl_loss
from hvpmtl.losses.simmim import simmim_loss
from hvpmtl.losses.swav import sinkhorn_codes, swapped_prediction_loss
from hvpmtl.models.backbone import MaskableBackbone
from hvpmtl.models.collapse import collapse_figures, distill_sums, swav_sums
from hvpmtl.models.heads import MIMDecoder, PrototypeHead
from hvpmtl.models.label_decoder import LabelDecoder

OBJECTIVES = ("asl", "swav", "mim", "distill")


def autocast(device_type: str, dtype: torch.dtype):
    """The one precision policy: autocast to bf16/fp16, nothing for fp32. Used by the student's forward (inside
    the engine, which turns an outer autocast off) and the teacher's."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))


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

    def _autocast(self, x: torch.Tensor):
        # With half-precision weights (DeepSpeed bf16) the forward runs under autocast to their dtype: fp32 tensors
        # a model makes on the fly (timm Swin's shifted-window attention mask) must not meet bf16 activations in a
        # matmul.
        return autocast(x.device.type, self.backbone.mask_token.dtype)

    def forward(self, view1, view2, mask, labels, teacher_sim=None, queue=None, freeze_prototypes: bool = False,
                world_size: int = 1):
        """Returns a dict: 'loss' (weighted total) and each enabled objective's unweighted value, plus
        'z1', 'z2' (detached SwAV embeddings for the queue) and 'sums' (the heads' collapse statistics,
        hvpmtl.models.collapse, summed over ranks by HVPMetaArch). Every rank has the same number of rows:
        the Sinkhorn codes span `world_size` times the local rows."""
        with self._autocast(view1):
            return self._forward(view1, view2, mask, labels, teacher_sim, queue, freeze_prototypes, world_size)

    def _forward(self, view1, view2, mask, labels, teacher_sim, queue, freeze_prototypes, world_size):
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
            # both views in one head forward, as SwAV: BatchNorm statistics over both views, one collective
            z, s = head(torch.cat([swav_feat1, feat2]))
            (z1, z2), (s1, s2) = z.chunk(2), s.chunk(2)
            if freeze_prototypes:  # SwAV keeps prototypes fixed for the first iterations
                p = head.unit_prototypes().detach()
                s1, s2 = z1 @ p.t(), z2 @ p.t()
            with torch.no_grad():
                q1 = self._codes(s1, queue[0] if queue is not None else None, world_size)
                q2 = self._codes(s2, queue[1] if queue is not None else None, world_size)
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
        out["sums"] = collapse
        return out

    def _codes(self, scores, queue_z, world_size: int):
        sw = self.cfg.objectives.swav
        n = scores.shape[0]
        if queue_z is not None and queue_z.numel():
            p = self.prototype_head.unit_prototypes()
            scores = torch.cat([queue_z.to(p.dtype) @ p.t(), scores])
        return sinkhorn_codes(scores.float(), sw.epsilon, sw.sinkhorn_iters, sw.t_max,
                              global_batch=scores.shape[0] * world_size)[-n:]

    @torch.no_grad()
    def inspect(self, view1, view2, mask, world_size: int = 1) -> dict[str, torch.Tensor]:
        """What the heads make of a few images, for the image panels (eval mode is the caller's): 'reconstruction'
        of the masked view 1, label 'logits' of view 1, and the prototype 'scores' of both views (view 1 rows
        first) with their Sinkhorn 'codes' and embeddings 'z'. Collective when `world_size` > 1: every rank calls it."""
        out = {}
        with self._autocast(view1):
            if self.mim_decoder is not None:
                out["reconstruction"] = self.mim_decoder(self.backbone(view1, mask)).float()
            feat1 = self.backbone(view1)
            if self.label_decoder is not None:
                out["logits"] = self.label_decoder(feat1)[0].float()
            if self.prototype_head is not None:
                z, scores = self.prototype_head(torch.cat([feat1, self.backbone(view2)]))
                out["scores"], out["z"] = scores.float(), z.float()
                out["codes"] = self._codes(out["scores"], None, world_size)
        return out


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


class HVPMetaArch:
    """Owns the student, the teacher, the SwAV queue (per rank), the prototype freeze and the precision.

    `attach(engine)` hands it the DeepSpeed engine that wraps `student`; then `forward_backward` trains one
    micro-batch and `update_teacher` moves the EMA teacher once per optimizer step."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, dtype: torch.dtype, world_size: int):
        self.cfg, self.device, self.dtype, self.world = cfg, device, dtype, world_size
        self.student = Student(cfg)
        self.teacher = Teacher(self.student).to(device) if self.student.weights["distill"] > 0 else None
        if cfg.run.compile:  # in place: parameter names (and so checkpoints, exports) are unchanged
            for m in (self.student.backbone, self.student.label_decoder,
                      *((self.teacher.backbone, self.teacher.label_decoder) if self.teacher else ())):
                if m is not None:
                    m.compile()
        self.queue = None  # [2, L, d] embeddings of earlier batches (this rank's)
        self.engine = None

    def attach(self, engine) -> None:
        self.engine = engine

    def eval_backbone(self, which: str = "student") -> MaskableBackbone:
        """The backbone of the EMA 'teacher' or of the 'student'. Which one is evaluated and exported is
        hvpmtl.schedules.default_weights's choice for the run's length (the eval hooks ask it)."""
        return self.teacher.backbone if which == "teacher" else self.engine.module.backbone

    # ------------------------------------------------------------------ the step
    def forward_backward(self, batch: dict, step: int, preempt: bool = False) -> StepResult:
        """Forward + backward + optimizer step (at a boundary) of one micro-batch; `step` is the number of
        optimizer steps done. The batch comes from the loader already in the step's dtype."""
        sw = self.cfg.objectives.swav
        boundary = self.engine.is_gradient_accumulation_boundary()
        v1, v2, mask, labels = (batch[k].to(self.device, non_blocking=True)
                                for k in ("view1", "view2", "mask", "labels"))
        teacher_sim = None
        if self.teacher is not None:
            with autocast(self.device.type, self.dtype):
                teacher_sim = self.teacher(v1).float()
        queue = self.queue if sw.queue_length and step >= sw.queue_start_step else None
        out = self.engine(v1, v2, mask, labels, teacher_sim=teacher_sim, queue=queue,
                          freeze_prototypes=step < sw.freeze_prototypes_steps, world_size=self.world)
        result = self._reduce({k: out[k].detach() for k in (*OBJECTIVES, "loss") if k in out},
                              out.get("sums", {}), preempt)
        result.boundary = boundary
        if result.nonfinite:
            return result
        self.engine.backward(out["loss"])
        self.engine.step()
        if "z1" in out and sw.queue_length:
            self._push_queue(out["z1"], out["z2"])
        return result

    def _reduce(self, losses: dict, sums: dict, preempt: bool) -> StepResult:
        return reduce_step(losses, sums, preempt, self.world)

    def _push_queue(self, z1, z2) -> None:
        per_rank = max(1, self.cfg.objectives.swav.queue_length // self.world)
        new = torch.stack([z1.float(), z2.float()])
        self.queue = new if self.queue is None else torch.cat([new, self.queue], dim=1)[:, :per_rank]

    def figures(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Logged figures from one optimizer step's diagnostic sums (host arrays, summed over micro-batches and
        ranks): the collapse figures of the global batch (hvpmtl.models.collapse), numpy on the host."""
        return collapse_figures(sums)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self.teacher is not None:
            self.teacher.update(self.engine.module, momentum)

    # ------------------------------------------------------------------ checkpoint state
    def client_state(self) -> dict:
        """Saved once (rank 0's copy): the teacher."""
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def rank_state(self) -> dict:
        """Saved per rank: the SwAV queue holds this rank's embeddings."""
        return {"queue": self.queue}

    def load_state(self, client: dict, rank_state: dict) -> None:
        if self.teacher is not None and client.get("teacher") is not None:
            self.teacher.load_state_dict(client["teacher"])
        self.queue = rank_state.get("queue")
