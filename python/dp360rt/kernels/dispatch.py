"""Kernel routing: the Triton kernels on a GPU, their PyTorch twins elsewhere.

``DP360RT_KERNELS=torch|triton`` overrides the choice (``auto`` or unset: Triton for CUDA tensors
when Triton imports, PyTorch otherwise). Forcing ``triton`` where it cannot run (a CPU tensor
without ``TRITON_INTERPRET=1``, or no Triton) is an error, never a silent fallback. Meta tensors
(FLOP counting) and tracing/export (``torch.jit.is_tracing``, ``torch.compiler.is_compiling``)
always take the PyTorch path. Inputs the kernels do not cover (other dtypes,
head dims above 256) take the PyTorch path too.

The Triton modules are imported lazily, on the first Triton call; whether Triton can run at all
comes from :mod:`.triton_env`.

Nothing has run these kernels on every GPU they may meet, so before the first Triton call per
(kernel, device, head dim, dtype) a small input is run through the kernel and its PyTorch twin
(:func:`self_check`). In ``auto`` mode a compile error or a mismatch warns once and that key takes
the twin from then on; with ``DP360RT_KERNELS=triton`` it raises. :func:`kernel_status` lists the
outcomes (``dp360rt info`` and :func:`dp360rt.capabilities` show them).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_env
from .shared_kv_attention import shared_kv_attention as _shared_kv_torch
from .temporal_attention import temporal_attention_reference

ENV = "DP360RT_KERNELS"
BACKENDS = ("torch", "triton")
# |kernel - twin| <= atol + rtol * |twin| on the self-check input, per dtype
CHECK_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
_checks: dict[tuple[str, str, int, str], str] = {}     # key -> "ok" or "fallback to torch: <why>"


def _tracing() -> bool:
    """Inside torch.jit tracing / torch.export / torch.compile (ONNX export): plain ops only."""
    try:
        if torch.jit.is_tracing():
            return True
        return bool(torch.compiler.is_compiling())
    except Exception:  # noqa: BLE001 - older torch without these helpers
        return False


def _device(device: torch.device | str | Tensor | None) -> torch.device:
    if isinstance(device, Tensor):
        return device.device
    return torch.device(device if device is not None else "cpu")


def kernel_backend(device: torch.device | str | Tensor | None = None) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (a device, its name, or a tensor)."""
    dev = _device(device)
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "auto") + BACKENDS:
        raise ValueError(f"{ENV}={forced!r}: expected one of 'torch', 'triton' or 'auto'")
    if dev.type == "meta" or forced == "torch" or _tracing():
        return "torch"
    if forced != "triton":
        return "triton" if dev.type == "cuda" and triton_env.can_run(dev) else "torch"
    missing = triton_env.unavailable(dev)
    if missing is not None:
        raise RuntimeError(f"{ENV}=triton but {missing[0]}. Fix: {missing[1]}, or set {ENV}=torch")
    return "triton"


def _triton_ok(q: Tensor, head_dim: int) -> bool:
    """Whether the Triton kernels take inputs of q's dtype and this head dim."""
    return q.dtype in triton_env.DTYPES and head_dim <= triton_env.MAX_HEAD_DIM


def _triton_kernel(name: str):
    """The Triton kernel ``name`` (``"shared_kv"`` or ``"temporal"``), imported on first use."""
    if name == "shared_kv":
        from .shared_kv_attention_triton import shared_kv_attention_triton
        return shared_kv_attention_triton
    from .temporal_attention_triton import temporal_attention_triton
    return temporal_attention_triton


def _check_case(name: str, device: torch.device, head_dim: int, dtype: torch.dtype):
    """(kernel args, PyTorch twin result) of the small self-check input for ``name``."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if name == "shared_kv":
        q, k, v = (rnd(2, 2, 24, head_dim) for _ in range(3))
        ks, vs = (rnd(1, 2, 40, head_dim) for _ in range(2))
        return (q, k, v, ks, vs), _shared_kv_torch(q.float(), k.float(), v.float(), ks.float(), vs.float())
    q, k, v = (rnd(16, 5, 2 * head_dim) for _ in range(3))
    return (q, k, v, 8, 2), temporal_attention_reference(q.float(), k.float(), v.float(), 8, 2)


def self_check(name: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel ``name`` may serve (device, head dim, dtype): run once per key on a
    small input against its PyTorch twin. On a compile/run error or a mismatch: with
    ``DP360RT_KERNELS=triton`` raise RuntimeError; otherwise warn once and return False (the
    caller takes the twin). The outcome is kept for :func:`kernel_status`."""
    key = (name, str(device), int(head_dim), str(dtype).replace("torch.", ""))
    if key not in _checks:
        try:
            args, want = _check_case(name, device, head_dim, dtype)
            got = _triton_kernel(name)(*args).float()
            atol, rtol = CHECK_TOL[dtype]
            bad = (got - want).abs() > atol + rtol * want.abs()
            why = (f"{int(bad.sum())} of {bad.numel()} outputs differ from the PyTorch twin by more than "
                   f"{atol:g} + {rtol:g}|ref| (max {float((got - want).abs().max()):.3g})") if bool(bad.any()) else None
            if not bool(torch.isfinite(got).all()):
                why = "non-finite outputs"
        except Exception as e:  # noqa: BLE001 - a compile error is a reason to fall back, whatever its type
            why = f"{type(e).__name__}: {e}"
        _checks[key] = "ok" if why is None else f"fallback to torch: {why}"
        if why is not None:
            msg = (f"Triton {name} kernel failed its self-check on {key[1]} (head dim {key[2]}, {key[3]}): {why}")
            if os.environ.get(ENV, "").strip().lower() == "triton":
                del _checks[key]           # forced: fail now and on every later call
                raise RuntimeError(f"{msg}. Fix: unset {ENV} (the PyTorch twin is used), or set {ENV}=torch")
            warnings.warn(f"{msg}; using the PyTorch twin for it", RuntimeWarning, stacklevel=3)
    return _checks[key] == "ok"


def probe(device: torch.device | str = "cuda", head_dims: tuple[int, ...] = (40, 80, 160),
          dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Self-check both kernels at the full model's head dims on ``device`` (what ``dp360rt info``
    shows on a GPU) unless the PyTorch twins are in use there; returns :func:`kernel_status`."""
    dev = torch.device(device)
    if kernel_backend(dev) == "triton":
        for d in head_dims:
            self_check("shared_kv", dev, d, dtype)
            self_check("temporal", dev, d, dtype)
    return kernel_status()


def kernel_status() -> dict[str, str]:
    """Self-check outcomes so far: ``"shared_kv cuda:0 d=40 float16" -> "ok" | "fallback to torch: ..."``."""
    return {f"{n} {dev} d={d} {dt}": v for (n, dev, d, dt), v in sorted(_checks.items())}


def shared_kv_attention(q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None) -> Tensor:
    """Attention of each frame's queries over ``[own keys ; shared keys]`` (see
    :func:`dp360rt.kernels.shared_kv_attention.shared_kv_attention`); ``ks=None``: plain attention.
    q, k, v: [B, H, N, D]; ks, vs: [1, H, M, D]."""
    if (kernel_backend(q.device) == "triton" and _triton_ok(q, q.shape[-1])
            and self_check("shared_kv", q.device, q.shape[-1], q.dtype)):
        return _triton_kernel("shared_kv")(q, k, v, ks, vs)
    if ks is None:
        return F.scaled_dot_product_attention(q, k, v)
    return _shared_kv_torch(q, k, v, ks, vs)


def temporal_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, heads: int) -> Tensor:
    """Attention across ``frames`` consecutive batch rows per token and head; q, k, v: [B*F, S, C]."""
    if (kernel_backend(q.device) == "triton" and _triton_ok(q, q.shape[-1] // heads)
            and self_check("temporal", q.device, q.shape[-1] // heads, q.dtype)):
        return _triton_kernel("temporal")(q, k, v, frames, heads)
    return temporal_attention_reference(q, k, v, frames, heads)
