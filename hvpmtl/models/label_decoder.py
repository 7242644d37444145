"""Query2Label-style label decoder: C label embeddings query the last feature map.

Self-attention among the queries is off by default: with C = 11,166 classes it costs
O(C^2) memory per image and Query2Label reports little gain from it. Cross-attention runs
through scaled_dot_product_attention, so the [B, heads, C, HW] scores are never stored on GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def sine_position_embedding(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """2-D sine/cosine position embedding [h*w, dim] (DETR's, normalised coordinates)."""
    if dim % 4:
        raise ValueError(f"position embedding dim {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    y = yy.reshape(-1, 1) * omega
    x = xx.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(dtype)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, q, k, v):
        B, Lq, D = q.shape
        h = self.heads

        def split(t, proj):
            return proj(t).reshape(t.shape[0], t.shape[1], h, D // h).transpose(1, 2)

        qh, kh, vh = split(q, self.q), split(k, self.k), split(v, self.v)
        if qh.shape[0] != kh.shape[0]:  # queries shared by the batch
            qh = qh.expand(kh.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(out.shape[0], Lq, D))


class LabelDecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, self_attn: bool):
        super().__init__()
        self.self_attn = CrossAttention(dim, heads, dropout) if self_attn else None
        self.norm_sa = nn.LayerNorm(dim) if self_attn else None
        self.cross_attn = CrossAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, memory, memory_pos):
        """tgt None stands for the all-zero input of the first layer: the queries are then the label
        embeddings alone, shared by the batch, and no [B, C, d] zeros are made."""
        if tgt is None:
            tgt = self.norm1(self.drop(self.cross_attn(query_pos, memory + memory_pos, memory)))
        else:
            if self.self_attn is not None:
                qk = tgt + query_pos
                tgt = self.norm_sa(tgt + self.drop(self.self_attn(qk, qk, tgt)))
            tgt = self.norm1(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + memory_pos, memory)))
        return self.norm2(tgt + self.drop(self.ffn(tgt)))


class GroupFullyConnected(nn.Module):
    """ML-Decoder's group decoding head: G query outputs, each expanded to ceil(C / G) classes."""

    def __init__(self, num_classes: int, groups: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.per_group = -(-num_classes // groups)
        self.weight = nn.Parameter(torch.empty(groups, self.per_group, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.uniform_(self.weight, -1 / math.sqrt(dim), 1 / math.sqrt(dim))

    def forward(self, h):
        logits = torch.einsum("bgd,gkd->bgk", h, self.weight.to(h.dtype)).flatten(1)
        return logits[:, : self.num_classes] + self.bias


class GroupWiseLinear(nn.Module):
    """One weight vector per class: logits[b, c] = <h[b, c], W[c]> + bias[c]."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.uniform_(self.weight, -1 / math.sqrt(dim), 1 / math.sqrt(dim))

    def forward(self, h):
        return (h * self.weight).sum(-1) + self.bias


class LabelDecoder(nn.Module):
    """forward(features [B, H, W, d0]) -> (logits [B, C], embedding g [B, d]).

    g, the image embedding used by momentum distillation, is the mean of the last layer's
    per-class outputs: one vector that summarises what the decoder read from the image
    (docs/DESIGN.md explains the choice).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 768, layers: int = 2, heads: int = 8,
                 ffn_dim: int = 2048, dropout: float = 0.1, self_attn: bool = False,
                 grad_checkpointing: bool = False, groups: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.input_proj = nn.Linear(in_dim, dim)
        # Q0: one embedding per class. They are the decoder's queries (Query2Label) unless `groups` > 0,
        # where G group queries decode (ML-Decoder) and Q0 serves the distillation similarity only.
        self.label_embed = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.label_embed, std=0.02)
        self.group_embed = nn.Parameter(torch.randn(groups, dim) * 0.02) if groups else None
        self.layers = nn.ModuleList(LabelDecoderLayer(dim, heads, ffn_dim, dropout, self_attn) for _ in range(layers))
        self.classifier = GroupFullyConnected(num_classes, groups, dim) if groups else GroupWiseLinear(num_classes, dim)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, features: torch.Tensor):
        B, H, W, _ = features.shape
        memory = self.input_proj(features.reshape(B, H * W, -1))
        pos = sine_position_embedding(H, W, memory.shape[-1], memory.device, memory.dtype).unsqueeze(0)
        queries = self.group_embed if self.group_embed is not None else self.label_embed
        query_pos = queries.to(memory.dtype).unsqueeze(0)
        tgt = None
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                tgt = checkpoint(layer, tgt, query_pos, memory, pos, use_reentrant=False)
            else:
                tgt = layer(tgt, query_pos, memory, pos)
        return self.classifier(tgt), tgt.mean(dim=1)

    def label_similarity(self, embedding: torch.Tensor) -> torch.Tensor:
        """S(g, Q0): cosine similarity of each image embedding with every label embedding, [B, C]."""
        g = F.normalize(embedding.float(), dim=-1)
        q = F.normalize(self.label_embed.float(), dim=-1)
        return g @ q.t()
