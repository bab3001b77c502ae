"""The Triton kernels' first-use self-check, on CPU: a fake CUDA device (the dispatcher told the
tensors are Triton's) and injected kernels, broken or right."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from dp360rt.kernels import dispatch
from dp360rt.kernels.shared_kv_attention import shared_kv_attention as twin
from dp360rt.kernels.temporal_attention import temporal_attention_reference


@pytest.fixture
def fake_gpu(monkeypatch):
    """Routes CPU tensors to the 'Triton' path with kernels this test chooses; fresh check table."""
    monkeypatch.setattr(dispatch, "_checks", {})
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(dispatch, "kernel_backend",
                        lambda device=None: "torch" if os.environ.get(dispatch.ENV) == "torch" else "triton")
    calls = {"shared_kv": 0, "temporal": 0}
    kernels = {"shared_kv": lambda q, k, v, ks, vs: twin(q, k, v, ks, vs),
               "temporal": temporal_attention_reference}

    def lookup(name):
        def run(*a):
            calls[name] += 1
            return kernels[name](*a)
        return run
    monkeypatch.setattr(dispatch, "_triton_kernel", lookup)
    return kernels, calls


def _inputs(d=16):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 20, d, generator=g) for _ in range(3))
    ks, vs = (torch.randn(1, 2, 30, d, generator=g) for _ in range(2))
    return q, k, v, ks, vs


def test_good_kernel_is_used_after_one_check(fake_gpu):
    kernels, calls = fake_gpu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.shared_kv_attention(*_inputs())
        dispatch.shared_kv_attention(*_inputs())
    assert calls["shared_kv"] == 3                       # the check once, then both calls
    assert dispatch.kernel_status() == {"shared_kv cpu d=16 float32": "ok"}


@pytest.mark.parametrize("breakage", ["wrong", "raises"])
def test_broken_kernel_warns_once_and_falls_back(fake_gpu, breakage):
    kernels, calls = fake_gpu

    def broken(q, k, v, ks, vs):
        if breakage == "raises":
            raise RuntimeError("PTX compile failed (injected)")
        return twin(q, k, v, ks, vs) * 1.01
    kernels["shared_kv"] = broken
    x = _inputs()
    with pytest.warns(RuntimeWarning, match="failed its self-check.*using the PyTorch twin"):
        out = dispatch.shared_kv_attention(*x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no second warning
        out2 = dispatch.shared_kv_attention(*x)
    assert torch.equal(out, twin(*x)) and torch.equal(out2, out)
    assert calls["shared_kv"] == 1                       # only the self-check ran it
    status = dispatch.kernel_status()["shared_kv cpu d=16 float32"]
    assert status.startswith("fallback to torch: ") and ("injected" in status or "differ" in status), status
    from dp360rt.capabilities import capabilities
    assert capabilities()["triton_kernel_checks"] == dispatch.kernel_status()


def test_forced_triton_fails_loudly(fake_gpu, monkeypatch):
    kernels, _ = fake_gpu
    kernels["temporal"] = lambda q, k, v, f, h: temporal_attention_reference(q, k, v, f, h) + 1
    monkeypatch.setenv(dispatch.ENV, "triton")
    x = [torch.randn(16, 5, 32) for _ in range(3)]
    with pytest.raises(RuntimeError, match="temporal kernel failed its self-check.*Fix: unset DP360RT_KERNELS"):
        dispatch.temporal_attention(*x, 8, 4)


def test_forced_torch_never_runs_the_kernel(fake_gpu, monkeypatch):
    _, calls = fake_gpu
    monkeypatch.setenv(dispatch.ENV, "torch")
    dispatch.shared_kv_attention(*_inputs())
    dispatch.temporal_attention(*[torch.randn(16, 5, 32) for _ in range(3)], 8, 4)
    assert calls == {"shared_kv": 0, "temporal": 0} and dispatch.kernel_status() == {}


def test_kernels_serve_the_full_model_head_dims(fake_gpu):
    """The temporal kernel takes the motion modules' [B*F, S, heads*D] inputs by head dim D (SD1.5:
    320 channels in 8 heads of 40), not by channel count; head dims above 256 take the twin."""
    _, calls = fake_gpu
    x = [torch.randn(16, 5, 320) for _ in range(3)]
    assert torch.equal(dispatch.temporal_attention(*x, 8, 8), temporal_attention_reference(*x, 8, 8))
    assert calls["temporal"] == 2                        # the self-check, then the call
    dispatch.shared_kv_attention(*_inputs(d=264))
    dispatch.temporal_attention(*[torch.randn(16, 5, 528) for _ in range(3)], 8, 2)
    assert calls == {"shared_kv": 0, "temporal": 2}
