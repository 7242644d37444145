"""LR schedule (hand-derived values) and weight-decay groups."""
import math

import pytest
import torch

from hvpmtl.config import load_config
from hvpmtl.models.meta_arch import Student
from hvpmtl.train.optim import lr_factor, param_groups


def test_warmup_then_cosine_hand_values():
    lr, min_lr = 1e-4, 1e-7
    # 10 warm-up steps: step 0 -> 1/10, step 9 -> 1
    assert lr_factor(0, 10, 110, lr, min_lr) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, lr, min_lr) == pytest.approx(1.0)
    # right after warm-up: the peak
    assert lr_factor(10, 10, 110, lr, min_lr) * lr == pytest.approx(lr)
    # half-way through the cosine: (lr + min_lr) / 2
    assert lr_factor(60, 10, 110, lr, min_lr) * lr == pytest.approx((lr + min_lr) / 2)
    # a quarter: min + (lr - min) * (1 + cos(pi/4)) / 2
    assert lr_factor(35, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    # the end and beyond: min_lr
    assert lr_factor(110, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr)
    assert lr_factor(500, 10, 110, lr, min_lr) * lr == pytest.approx(min_lr)


def test_no_decay_on_norms_biases_mask_token_label_embeddings_prototypes():
    cfg = load_config("configs/test_tiny.yaml")
    s = Student(cfg)
    groups = param_groups(s, 0.05, s.no_weight_decay_names())
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    named = dict(s.named_parameters())
    for name in ("backbone.mask_token", "label_decoder.label_embed", "prototype_head.prototypes.weight",
                 "backbone.model.pos_embed", "backbone.model.cls_token", "backbone.model.norm.weight",
                 "backbone.model.blocks.0.attn.qkv.bias"):
        assert id(named[name]) in no_decay, name
    for name in ("backbone.model.blocks.0.attn.qkv.weight", "label_decoder.input_proj.weight",
                 "mim_decoder.conv.weight"):
        assert id(named[name]) in decay, name
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == sum(1 for p in s.parameters() if p.requires_grad)
