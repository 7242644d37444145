"""Weight-decay groups."""

from hvpmtl.config import load_config
from hvpmtl.models.meta_arch import Student
from hvpmtl.train.optim import param_groups


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
