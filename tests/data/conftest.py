"""A small synthetic data set shared by the data tests (tiny images keep DALI fast on 2 cores)."""
import pytest

from hvpmtl.config import DataConfig
from hvpmtl.data.tools.synthetic import make_synthetic

NUM_TRAIN, NUM_HOLDOUT = 40, 10


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), NUM_TRAIN, seed=3, holdout=NUM_HOLDOUT)


def _tiny_cfg(syn, **kw) -> DataConfig:
    base = dict(format="synthetic", root=syn["root"], list_file=syn["list_file"], dictionary=syn["dictionary"],
                holdout_list=syn["holdout_list"], num_classes=24, img_size=64, mask_patch_size=32, num_threads=1,
                device="cpu", rand_augment_n=0, seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="session")
def tiny_cfg():
    """tiny_cfg(syn, **overrides) -> a CPU DataConfig for 64 px images with a 2x2 mask grid."""
    return _tiny_cfg

