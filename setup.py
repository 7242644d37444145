"""hvpmtl: multi-task vision pre-training (HVP-MTL) on DeepSpeed, DALI and Triton."""
from setuptools import find_packages, setup

# The Triton kernels live in the top-level kernels/ folder but are installed as
# hvpmtl.kernels: a top-level `kernels` module would collide with the PyPI package of that name.
packages = find_packages(include=["hvpmtl", "hvpmtl.*"]) + ["hvpmtl.kernels"]

setup(
    name="hvpmtl",
    version="0.1.0",
    description="Large-scale multi-task vision pre-training (HVP-MTL): Swin/ViT backbones, "
    "Query2Label + weighted ASL, SwAV, SimMIM and momentum distillation on DeepSpeed ZeRO-2 and NVIDIA DALI",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"hvpmtl.kernels": "kernels"},
    install_requires=[
        # torch and torchvision are pinned together by tools/setup_env.sh (see docs/INSTALL.md):
        # the CPU-only torch wheel breaks torchvision, and so timm.
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "deepspeed>=0.15",
        "nvidia-dali-cuda130>=2.0",
        "triton>=3.0",
        "numpy",
        "pyyaml",
        "pillow",
        "mlflow>=3.0",
        "pycocotools>=2.0.8",
        "segmentation-models-pytorch>=0.5",
        "contourpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
    entry_points={"console_scripts": ["hvpmtl=hvpmtl.cli:main"]},
)
