"""timm Swin / ViT backbone with SimMIM masking at the patch-embedding level.

The wrapped timm model is kept as `self.model` with its own parameter names, so an exported
state dict loads into `timm.create_model(name)` with no key mapping. The mask token lives
beside it (it is a pre-training part, not a backbone weight).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.models._manipulate import checkpoint_seq


def patch_size_of(name: str, img_size: int) -> int:
    """The patch-embedding size of timm `name` at `img_size`, without making its weights (built on the meta
    device: ~0.1 s instead of seconds), so the data loader can be set up before the model."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    return model.patch_embed.patch_size[0]


class MaskableBackbone(nn.Module):
    """Returns the last-stage feature map [B, H, W, D] (channels last) for Swin and ViT alike.

    forward(x, mask): mask is [B, Hp, Wp] bool at the patch grid (True = masked); masked patch
    embeddings are replaced by a learnable mask token before any block sees them.
    """

    def __init__(self, name: str, img_size: int = 224, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        if not name.startswith(("swin_", "vit_")):
            raise ValueError(f"backbone '{name}': only timm Swin (swin_*) and ViT (vit_*) models are supported")
        self.name = name
        self.is_vit = name.startswith("vit_")
        self.model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                                       drop_path_rate=drop_path_rate)
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.grad_checkpointing = grad_checkpointing
        pe = self.model.patch_embed
        self.patch_size = pe.patch_size[0]
        self.patch_grid = tuple(pe.grid_size)
        self.img_size = img_size
        self.embed_dim = self.model.num_features  # last stage width (768 Swin-T, 1024 Swin-B, 768 ViT-B)
        token_dim = pe.proj.out_channels  # width at the patch embedding (96 Swin-T, 768 ViT-B)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, token_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            h, w = self._out_hw(img_size)
        self.feature_grid = (h, w)
        self.stride = img_size // h  # 32 for Swin, 16 for ViT

    def _out_hw(self, img_size: int) -> tuple[int, int]:
        if self.is_vit:
            return self.patch_grid
        # Swin halves the grid at each of the stages after the first
        n = len(self.model.layers)
        return self.patch_grid[0] // 2 ** (n - 1), self.patch_grid[1] // 2 ** (n - 1)

    def _apply_mask(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # tokens [B, Hp, Wp, C]
        if mask is None:
            return tokens
        if mask.shape[1:] != tokens.shape[1:3]:
            raise ValueError(f"mask grid {tuple(mask.shape[1:])} does not match the patch grid "
                             f"{tuple(tokens.shape[1:3])} of {self.name}")
        w = mask.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        if self.is_vit:
            B = x.shape[0]
            t = m.patch_embed(x)  # [B, N, C] (flattened)
            hp, wp = self.patch_grid
            t = self._apply_mask(t.reshape(B, hp, wp, -1), mask).reshape(B, hp * wp, -1)
            t = m._pos_embed(t)
            t = m.patch_drop(t)
            t = m.norm_pre(t)
            t = checkpoint_seq(m.blocks, t) if self.grad_checkpointing and self.training else m.blocks(t)
            t = m.norm(t)
            t = t[:, m.num_prefix_tokens:]
            return t.reshape(B, hp, wp, -1)
        t = m.patch_embed(x)  # [B, Hp, Wp, C]
        t = self._apply_mask(t, mask)
        if getattr(m, "absolute_pos_embed", None) is not None:
            t = t + m.absolute_pos_embed
        t = m.layers(t)
        return m.norm(t)
