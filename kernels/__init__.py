"""Triton kernels, installed as `hvpmtl.kernels` (never as a top-level `kernels`).

Each kernel has the signature of its fp32 PyTorch reference in `hvpmtl.losses`.
`use_triton(t)` decides where a call goes: CUDA tensors run the kernel; CPU tensors run the
reference unless TRITON_INTERPRET=1, in which case the kernel runs in Triton's interpreter
(that is how the CPU tests exercise the real kernel code).
"""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()
