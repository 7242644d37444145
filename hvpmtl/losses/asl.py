"""The multi-label objective (config `objectives.asl`): weighted ASL on the label decoder's logits.

`WeightedASLLoss` dispatches like `hvpmtl.losses.swav.sinkhorn_codes`: the Triton kernel
(`hvpmtl.kernels.weighted_asl`) on CUDA or under TRITON_INTERPRET=1, the fp32 reference
(`hvpmtl.losses.weighted_asl`) otherwise. Both take the same arguments and give the same numbers.
"""
import torch
import torch.nn as nn

from hvpmtl.kernels import use_triton
from hvpmtl.losses.weighted_asl import Targets, weighted_asl_reference


class WeightedASLLoss(nn.Module):
    """Weighted asymmetric loss module: the Triton kernel where `use_triton(logits)`, else the reference."""

    def __init__(
        self, eta: float = 10.0, gamma_pos: float = 4.0, gamma_neg: float = 1.0, clip: float = 0.0, eps: float = 1e-8
    ):
        super().__init__()
        if clip < 0 or clip >= 1:
            raise ValueError(f"WeightedASLLoss: clip must lie in [0, 1), got {clip}")
        self.eta, self.gamma_pos, self.gamma_neg, self.clip, self.eps = eta, gamma_pos, gamma_neg, clip, eps

    def forward(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        if use_triton(logits):
            # Imported per call, as in swav.py: Triton's jit loads only where the kernel runs, and a module
            # reloaded in interpreter mode (tests/kernels/conftest.py) is the one called.
            from hvpmtl.kernels.weighted_asl import weighted_asl as fn
        else:
            fn = weighted_asl_reference
        return fn(logits, targets, self.eta, self.gamma_pos, self.gamma_neg, self.clip, self.eps)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}"
