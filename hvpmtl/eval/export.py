"""Export of the pre-trained backbone as timm-loadable safetensors."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def timm_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The wrapped timm model's own keys (MaskableBackbone.model), fp32, contiguous."""
    return {k: v.detach().float().cpu().contiguous() for k, v in backbone.model.state_dict().items()}


def save_timm_backbone(backbone, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(timm_state_dict(backbone), str(path), metadata={"format": "pt", "timm_model": backbone.name})
    return path
