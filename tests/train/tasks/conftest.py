"""Small dense data (the synthetic scenes as COCO instances and ADE20K label maps) and a backbone exported from
the session's tiny pre-training, for the detection and segmentation fine-tuning tests."""
import pytest


@pytest.fixture(scope="session")
def dense(tmp_path_factory):
    from hvpmtl.data.tools.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("dense"), 4, seed=3, coco=True, coco_train=8, coco_val=4,
                          ade20k=True, ade20k_train=8, ade20k_val=4)


@pytest.fixture(scope="session")
def exported_tiny(pretrain_run, tmp_path_factory):
    """configs/test_tiny.yaml's student (ViT-Tiny at 64 px) as `hvpmtl export` writes it."""
    from hvpmtl.eval.export import export_run

    return export_run(pretrain_run["dir"], tmp_path_factory.mktemp("exp_dense") / "bb.safetensors")
