"""Kernel tests run the real Triton code in Triton's interpreter, on CPU tensors.

TRITON_INTERPRET=1 must be set when the @triton.jit decorators run (triton.language's own helpers
included), so tests/conftest.py sets it for the whole session; the fixtures below also make sure
the kernel module they hand out was imported in interpreter mode.
"""
import importlib

import pytest


def interpreted_module(name: str, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module(name)
    if not module.INTERPRETED:
        module = importlib.reload(module)
    assert module.INTERPRETED
    return module


@pytest.fixture
def asl_kernel(monkeypatch):
    return interpreted_module("hvpmtl.kernels.weighted_asl", monkeypatch)


@pytest.fixture
def sinkhorn_kernel(monkeypatch):
    return interpreted_module("hvpmtl.kernels.sinkhorn", monkeypatch)
