"""One objective per file: fp32 PyTorch references (their Triton twins in kernels/) and the objectives that
pick one of the two (asl.py, swav.py)."""
import torch


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 whatever the model's dtype (float64 stays float64, for gradchecks)."""
    return t if t.dtype == torch.float64 else t.float()
