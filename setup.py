"""hvpmtl: multi-task vision pre-training (HVP-MTL) on DeepSpeed, DALI and Triton."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "hvpmtl/__init__.py").read_text()).group(1)

# The Triton kernels live in the top-level kernels/ folder but are installed as
# hvpmtl.kernels: a top-level `kernels` module would collide with the PyPI package of that name.
packages = find_packages(include=["hvpmtl", "hvpmtl.*"]) + ["hvpmtl.kernels"]

setup(
    name="hvpmtl",
    version=VERSION,
    description="Large-scale multi-task vision pre-training (HVP-MTL): Swin/ViT backbones, "
    "Query2Label + weighted ASL, SwAV, SimMIM and momentum distillation on DeepSpeed ZeRO-2 and NVIDIA DALI",
    python_requires=">=3.11",  # hashlib.file_digest
    packages=packages,
    package_dir={"hvpmtl.kernels": "kernels"},
    install_requires=[
        # every package hvpmtl imports, declared (tests/test_dependencies.py); floors that are true.
        # torch and torchvision are installed together by tools/setup_env.sh (docs/INSTALL.md): the CPU-only
        # torch wheel breaks torchvision, and so timm. torch >= 2.14: the public dist.set_timeout (collective
        # timeouts of DeepSpeed's own groups); torch.serialization.safe_globals (safe loading) is older.
        "torch>=2.14",
        "torchvision>=0.29",
        "timm>=1.0.15",  # forward_intermediates, Swin's dynamic_img_size / always_partition
        "deepspeed>=0.15",
        "nvidia-dali-cuda130>=2.0",
        "triton>=3.0",
        "numpy",
        "pyyaml",
        "pillow",
        "pyarrow",  # the list-file parser and the data index
        "pydantic>=2",  # the configs
        "matplotlib",  # image panels
        "mlflow>=3.0",
        "pycocotools>=2.0.8",
        "segmentation-models-pytorch>=0.5",
        "contourpy",
        "boto3",  # data in S3-compatible object storage
        "botocore",  # its exceptions
        "safetensors",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "scikit-learn", "duckdb", "pandas", "moto[server]", "click", "packaging"]},
    entry_points={"console_scripts": ["hvpmtl=hvpmtl.cli:main"]},
)
