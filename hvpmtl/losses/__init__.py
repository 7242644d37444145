"""One objective per file, each an fp32 PyTorch reference (Triton twins in hvpmtl.kernels)."""
import torch


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 whatever the model's dtype (float64 stays float64, for gradchecks)."""
    return t if t.dtype == torch.float64 else t.float()
