"""Kernel routing: the Triton kernels on a GPU, their PyTorch twins elsewhere.

``DP360RT_KERNELS=torch|triton`` overrides the choice (``auto`` or unset: Triton for CUDA tensors
when Triton imports, PyTorch otherwise). Forcing ``triton`` where it cannot run (a CPU tensor
without ``TRITON_INTERPRET=1``, or no Triton) is an error, never a silent fallback. Meta tensors
(FLOP counting) and tracing/export (``torch.jit.is_tracing``, ``torch.compiler.is_compiling``)
always take the PyTorch path. Inputs the kernels do not cover (other dtypes,
head dims above 256) take the PyTorch path too.

The Triton modules are imported lazily, on the first Triton call.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .shared_kv_attention import shared_kv_attention as _shared_kv_torch

ENV = "DP360RT_KERNELS"
BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


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
        return "triton" if dev.type == "cuda" and _triton_import_error() is None else "torch"
    err = _triton_import_error()
    if err is not None:
        raise RuntimeError(f"{ENV}=triton but triton cannot be imported ({err}). "
                           f"Fix: install triton, or set {ENV}=torch")
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{ENV}=triton but the tensors are on {dev.type!r}, not CUDA, and the Triton "
                           f"interpreter is off. Fix: run on a CUDA device, set TRITON_INTERPRET=1 (slow, "
                           f"for testing), or set {ENV}=torch")
    return "triton"


def _triton_ok(q: Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


def shared_kv_attention(q: Tensor, k: Tensor, v: Tensor, ks: Tensor | None, vs: Tensor | None) -> Tensor:
    """Attention of each frame's queries over ``[own keys ; shared keys]`` (see
    :func:`dp360rt.kernels.shared_kv_attention.shared_kv_attention`); ``ks=None``: plain attention.
    q, k, v: [B, H, N, D]; ks, vs: [1, H, M, D]."""
    if kernel_backend(q.device) == "triton" and _triton_ok(q):
        from .shared_kv_attention_triton import shared_kv_attention_triton
        return shared_kv_attention_triton(q, k, v, ks, vs)
    if ks is None:
        return F.scaled_dot_product_attention(q, k, v)
    return _shared_kv_torch(q, k, v, ks, vs)


def temporal_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, heads: int) -> Tensor:
    """Attention across ``frames`` consecutive batch rows per token and head; q, k, v: [B*F, S, C]."""
    from .temporal_attention_triton import temporal_attention_reference
    if kernel_backend(q.device) == "triton" and _triton_ok(q) and q.shape[-1] // heads <= 256:
        from .temporal_attention_triton import temporal_attention_triton
        return temporal_attention_triton(q, k, v, frames, heads)
    return temporal_attention_reference(q, k, v, frames, heads)
