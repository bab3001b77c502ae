"""Checks of the sampler's parameters, shared by every entry point (``Pipeline.__call__``,
``Runtime`` construction, ``submit``/``stream``), and of the final latents before decoding.

A bad parameter never reaches the model: ``eta=nan`` or ``cfg_scale=inf`` would otherwise make
every view NaN, saved as a black picture. Types are not guessed: ``steps`` must be an int (``2.0``
and ``"2"`` are refused, as is ``True``), ``seed`` an int in [0, 2**64), a ``torch.Generator``, a
list of recorded draws or a noise source; a conditions tensor of an integer dtype is refused (its
value range is unknown: 0..255 or already [-1, 1]).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

_UNSET = object()


class SamplerParamError(ValueError):
    """A sampler parameter (steps, eta, cfg_scale, seed, conditions dtype) is of the wrong type or range."""


class NonFiniteLatentsError(FloatingPointError):
    """Sampling produced NaN or Inf latents; nothing is decoded or saved."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplerParamError(f"{name} must be a real number, got {value!r} ({type(value).__name__}). "
                                f"Fix: pass a float, e.g. {name}={0.5 if name == 'eta' else 3.0}")
    v = float(value)
    if not math.isfinite(v):
        raise SamplerParamError(f"{name}={v} is not finite: every view would be NaN. "
                                f"Fix: pass a finite {name} (the authors use {0.5 if name == 'eta' else 3.0})")
    return v


def check_sampler_params(*, steps: Any = _UNSET, eta: Any = _UNSET, cfg_scale: Any = _UNSET, seed: Any = _UNSET,
                         conditions: Any = None) -> None:
    """Refuse a bad sampler parameter with :class:`SamplerParamError` (message with a ``Fix:``).

    Only the parameters given are checked: steps (int >= 1, not bool), eta (finite, >= 0),
    cfg_scale (finite), seed (None, an int in [0, 2**64), a ``torch.Generator``, a list of recorded
    draws, or a callable noise source) and, when it is a tensor, conditions [N, 3, S, S] (a floating
    dtype). The step count's divisibility is checked later by the DDIM tables.
    """
    if steps is not _UNSET:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise SamplerParamError(f"steps must be an int, got {steps!r} ({type(steps).__name__}). "
                                    "Fix: pass an integer step count, e.g. steps=50")
        if steps < 1:
            raise SamplerParamError(f"steps={steps} must be >= 1. Fix: pass e.g. steps=50")
    if eta is not _UNSET:
        if _number("eta", eta) < 0:
            raise SamplerParamError(f"eta={eta} is negative; DDIM's eta is a noise scale >= 0. "
                                    "Fix: pass eta in [0, 1] (0.5 as the authors)")
    if cfg_scale is not _UNSET:
        _number("cfg_scale", cfg_scale)
    if seed is not _UNSET:
        _check_seed(seed)
    if isinstance(conditions, Tensor) and not conditions.dtype.is_floating_point:
        raise SamplerParamError(f"conditions tensor has dtype {conditions.dtype}; expected a floating tensor in "
                                "[-1, 1]. Fix: convert it, e.g. conditions.float() / 127.5 - 1 for 0..255 images")


def _check_seed(seed: Any) -> None:
    if seed is None or isinstance(seed, torch.Generator):
        return
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= seed < 2 ** 64:
            raise SamplerParamError(f"seed={seed} is outside [0, 2**64). Fix: pass a seed in that range, "
                                    "e.g. seed % 2**64")
        return
    if isinstance(seed, (list, tuple)):
        if all(isinstance(d, Tensor) for d in seed):
            return
        raise SamplerParamError("seed given as a list must hold recorded noise tensors only. "
                                "Fix: pass an int seed or the recorded draws")
    if callable(seed):
        return
    raise SamplerParamError(f"seed must be an int, a torch.Generator, recorded draws or a noise source, got "
                            f"{seed!r} ({type(seed).__name__}). Fix: pass an integer seed, e.g. seed=0")


def check_finite_latents(latents: Tensor, stage: str) -> None:
    """Raise :class:`NonFiniteLatentsError` naming ``stage`` (e.g. "the back view", "window 2")
    when the final latents [B, 4, h, w] hold NaN or Inf, so garbage is never decoded to black views."""
    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        raise NonFiniteLatentsError(
            f"{stage} produced {bad} NaN/Inf latent values out of {latents.numel()}; nothing was decoded. "
            "Fix: check the weights (dp360rt verify) and use fp32 or bf16 if fp16 overflows")
