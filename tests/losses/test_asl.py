"""WeightedASLLoss: its arguments and where it sends a call (the kernel side: tests/kernels)."""
import pytest
import torch

from hvpmtl.losses.asl import WeightedASLLoss
from hvpmtl.losses.weighted_asl import weighted_asl_reference


def test_module_rejects_clip_outside_0_1():
    with pytest.raises(ValueError, match="clip"):
        WeightedASLLoss(clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        WeightedASLLoss(clip=-0.01)


def test_module_uses_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = WeightedASLLoss()
    assert (module.eta, module.gamma_pos, module.gamma_neg, module.clip) == (10.0, 4.0, 1.0, 0.0)
    z = torch.randn(4, 20, requires_grad=True)
    y = (torch.rand(4, 20) < 0.3).float()
    loss = module(z, y)
    assert loss.grad_fn is not None and "WeightedASL" not in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, weighted_asl_reference(z, y))


def test_module_passes_its_parameters_to_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = dict(eta=2.0, gamma_pos=1.0, gamma_neg=3.0, clip=0.05, eps=1e-6)
    z = torch.randn(3, 7, dtype=torch.float64)
    y = (torch.rand(3, 7) < 0.4).double()
    torch.testing.assert_close(WeightedASLLoss(**params)(z, y), weighted_asl_reference(z, y, **params))
    # and they matter: the default parameters give another value
    assert not torch.allclose(WeightedASLLoss()(z, y), weighted_asl_reference(z, y, **params))
