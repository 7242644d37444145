"""Collapse statistics of the self-supervised heads, computed on the device, reduced in one all-reduce.

A collapsed SwAV head maps every image to the same embedding: the only balanced assignment is then the
uniform one, which is trivially predicted (swav README, "stuck at ln(nmb_prototypes)"). These figures make
that visible while training:

  swav/code_entropy    mean over views of H(q_b) / ln K, q the Sinkhorn codes      1 = uniform codes (collapsed)
  swav/pred_entropy    mean over views of H(softmax(s_b / tau)) / ln K             1 = uniform predictions
  swav/protos_used     prototypes that are the argmax score of >= 1 view of the    1 = every view on one prototype
                       global batch (both views; at most min(K, 2 x batch))
  swav/z_std           per-dimension std over the global batch of the unit-norm    ~1/sqrt(d) healthy, -> 0 collapsed
                       embeddings z, averaged over dimensions (SimSiam, sec. 4.1)
  swav/z_rank          effective rank exp(H(eigenvalues / their sum)) of the       1 = on one line, 0 = identical
                       covariance of z over the global batch (Roy & Vetterli 2007):
                       catches the dimensional collapse z_std misses (z = +-v has z_std ~ 0.8/sqrt(d))
  distill/student_entropy, distill/teacher_entropy
                       mean over images of H(softmax(S / tau)) / ln C of the label similarities

The per-rank results are *sums* (counts, entropy sums, per-prototype win counts, the embeddings' sum and
z^T z, all float64) computed on the device without a host read: the student returns them as out["sums"],
HVPMetaArch packs them into the step's one SUM all-reduce with the losses, and the trainer adds the sums of
an optimizer step's micro-batches. `collapse_figures` turns such global sums (on the host) into the figures
above. `CollapseMonitor` (host side, every optimizer step) warns when a figure stays at its collapsed value for
`run.collapse_warn_steps` steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# Sums in float64 (as the losses' all-reduce): E[z^2] - E[z]^2 of identical fp32 embeddings would leave
# ~1e-4 of rounding where the collapsed value is 0. The tensors are small ([K] and [d] at most).
SUM_DTYPE = torch.float64


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 for bf16/fp16/fp32, float64 stays float64


def _log_classes(k: int) -> float:
    if k < 2:
        raise ValueError(f"a normalised entropy needs at least 2 classes, got {k}")
    return math.log(k)


def entropy_of_probs(p: torch.Tensor) -> torch.Tensor:
    """Per row of p [N, K] (rows sum to 1): H / ln K, with 0 log 0 = 0."""
    return torch.special.entr(p.to(_acc_dtype(p))).sum(dim=1) / _log_classes(p.shape[1])


def entropy_of_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row: H(softmax(logits / temperature)) / ln K, computed from log-probabilities (stable)."""
    logp = F.log_softmax(logits.to(_acc_dtype(logits)) / temperature, dim=1)
    return -(logp.exp() * logp).sum(dim=1) / _log_classes(logits.shape[1])


@torch.no_grad()
def swav_sums(scores: torch.Tensor, codes: torch.Tensor, z: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Sum-reducible SwAV statistics of one micro-batch on one rank.

    scores [N, K] (cosines to the prototypes), codes [N, K] (Sinkhorn, rows sum to 1), z [N, d] (unit norm),
    N = every view of the local batch. Returns {"swav/n": N, "swav/code_entropy": sum of normalised
    entropies, "swav/pred_entropy": idem, "swav/wins": [K] argmax-score counts, "swav/z_sum": [d],
    "swav/z_outer": [d, d] = z^T z}.
    """
    dt = SUM_DTYPE
    k = scores.shape[1]
    wins = torch.zeros(k, dtype=dt, device=scores.device)
    wins.index_add_(0, scores.argmax(dim=1), torch.ones(scores.shape[0], dtype=dt, device=scores.device))
    z = z.to(dt)
    return {
        "swav/n": torch.full((), float(scores.shape[0]), dtype=dt, device=scores.device),  # no host-to-device copy
        "swav/code_entropy": entropy_of_probs(codes).to(dt).sum(),
        "swav/pred_entropy": entropy_of_logits(scores, temperature).to(dt).sum(),
        "swav/wins": wins,
        "swav/z_sum": z.sum(dim=0),
        "swav/z_outer": z.t() @ z,
    }


@torch.no_grad()
def distill_sums(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Sum-reducible entropies of the distillation distributions softmax(S / tau) over the C classes."""
    dt = SUM_DTYPE
    return {
        "distill/n": torch.full((), float(student_sim.shape[0]), dtype=dt, device=student_sim.device),
        "distill/student_entropy": entropy_of_logits(student_sim, temperature).to(dt).sum(),
        "distill/teacher_entropy": entropy_of_logits(teacher_sim, temperature).to(dt).sum(),
    }


def collapse_figures(sums) -> dict[str, float]:
    """Global (already reduced) sums -> the figures of the module docstring. Host arithmetic in numpy on the
    values of the step's one host read (HVPMetaArch hands them over as numpy arrays), so it reads no device."""
    s = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}
    out: dict[str, float] = {}
    if "swav/n" in s:
        n = max(float(s["swav/n"]), 1.0)
        out["swav/code_entropy"] = float(s["swav/code_entropy"]) / n
        out["swav/pred_entropy"] = float(s["swav/pred_entropy"]) / n
        out["swav/protos_used"] = float(np.count_nonzero(s["swav/wins"] > 0))
        mean = s["swav/z_sum"] / n
        cov = s["swav/z_outer"] / n - np.outer(mean, mean)  # population covariance over the global batch
        out["swav/z_std"] = float(np.sqrt(np.clip(np.diagonal(cov), 0, None)).mean())
        out["swav/z_rank"] = effective_rank(cov)
    if "distill/n" in s:
        n = max(float(s["distill/n"]), 1.0)
        out["distill/student_entropy"] = float(s["distill/student_entropy"]) / n
        out["distill/teacher_entropy"] = float(s["distill/teacher_entropy"]) / n
    return out


def effective_rank(cov: np.ndarray) -> float:
    """exp of the entropy of the normalised eigenvalues of a covariance matrix; 0 for a zero matrix."""
    eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
    total = float(eig.sum())
    if total <= 1e-12:
        return 0.0
    p = eig[eig > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@dataclass
class CollapseThresholds:
    """A figure is at its collapsed value when it is on the wrong side of its threshold."""
    entropy_max: float = 0.99  # code / prediction / student entropy >= this: (nearly) uniform
    z_std_min: float = 0.1  # z_std * sqrt(d) <= this: embeddings (nearly) identical; healthy ~ 1
    z_rank_min: float = 2.0  # z_rank <= this: embeddings on (nearly) a line (measured 1.4-1.8 in the dead demo)
    protos_used_min: int = 1  # protos_used <= this: every view on one prototype


class CollapseMonitor:
    """Host side, fed the logged figures of every optimizer step: one warning when a figure has stayed at its
    collapsed value for `patience` consecutive steps, one note when it leaves it again."""

    def __init__(self, patience: int, embed_dim: int, thresholds: CollapseThresholds | None = None):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 step, got {patience}")
        self.patience, self.embed_dim = patience, embed_dim
        self.th = thresholds or CollapseThresholds()
        self.streak: dict[str, int] = {}  # figure -> consecutive collapsed steps
        self.warned: set[str] = set()

    def collapsed(self, figures: dict[str, float]) -> dict[str, str]:
        """{figure: why} for the figures at a collapsed value in this step."""
        th, out = self.th, {}
        for key in ("swav/code_entropy", "swav/pred_entropy", "distill/student_entropy"):
            if key in figures and figures[key] >= th.entropy_max:
                out[key] = f"{key}={figures[key]:.4f} >= {th.entropy_max} (uniform)"
        if "swav/z_std" in figures:
            ratio = figures["swav/z_std"] * math.sqrt(self.embed_dim)
            if ratio <= th.z_std_min:
                out["swav/z_std"] = (f"swav/z_std={figures['swav/z_std']:.4g} <= {th.z_std_min} / sqrt({self.embed_dim})"
                                     f" (healthy ~ {1 / math.sqrt(self.embed_dim):.3g}: identical embeddings)")
        if "swav/z_rank" in figures and figures["swav/z_rank"] <= th.z_rank_min:
            out["swav/z_rank"] = f"swav/z_rank={figures['swav/z_rank']:.3g} <= {th.z_rank_min} (embeddings on one line)"
        if "swav/protos_used" in figures and figures["swav/protos_used"] <= th.protos_used_min:
            out["swav/protos_used"] = f"swav/protos_used={figures['swav/protos_used']:.0f} (every view on one prototype)"
        return out

    def update(self, figures: dict[str, float], step: int) -> list[str]:
        """Messages to print for this step (empty when nothing changed)."""
        now = self.collapsed(figures)
        msgs = []
        for key in set(self.streak) | set(now):
            if key in now:
                self.streak[key] = self.streak.get(key, 0) + 1
                if self.streak[key] >= self.patience and key not in self.warned:
                    self.warned.add(key)
                    msgs.append(f"collapse warning at step {step}: {now[key]} for {self.streak[key]} steps")
            else:
                self.streak.pop(key, None)
                if key in self.warned:
                    self.warned.discard(key)
                    msgs.append(f"collapse over at step {step}: {key}={figures.get(key, float('nan')):.4g}")
        return sorted(msgs)

    @property
    def active(self) -> list[str]:
        """Figures currently warned about."""
        return sorted(self.warned)
