"""Windows: the 8-frame groups the 360° views are sampled in, their pre-drawn noises, and the
authors' loop over them (the reference engine; :mod:`.fast` is the fast one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from ..io.images import CONDITION_COUNT, ImageError
from ..model import DiffPortrait360
from .noise import NoiseSource, RecordedNoise
from .reference import sample_reference

CONDITION_WINDOWS = CONDITION_COUNT // 8


@dataclass
class Window:
    """One window of frames to sample: hints [F, 3, H, W], optional feature latent, its noises."""

    index: int
    hint: Tensor
    feature_latent: Tensor | None
    noise: RecordedNoise


def prepare_windows(model: DiffPortrait360, conditions: Tensor, features: Tensor | None, steps: int,
                    noise: NoiseSource) -> list[Window]:
    """Encode feature frames and pre-draw every window's noises in the reference's draw order:
    per window, [feature posterior], start latent, [q_sample noise], one draw per step."""
    f = model.frames
    n = conditions.shape[0]
    if n % f:
        raise ImageError(f"{n} condition images cannot be split into windows of {f} frames")
    dev = conditions.device
    h, w = conditions.shape[2] // 8, conditions.shape[3] // 8
    shape = (f, model.cfg.unet.in_channels, h, w)
    windows = []
    for i in range(n // f):
        feat = None
        if features is not None:
            mean, logvar = model.encode_image(features[i * f:(i + 1) * f])
            feat = model.sample_latent(mean, logvar, noise(mean.shape, dev))
        draws = [noise(shape, dev) for _ in range(steps + 1 + (feat is not None))]
        windows.append(Window(i, conditions[i * f:(i + 1) * f], feat, RecordedNoise(draws)))
    return windows


def sample_windows_reference(model: DiffPortrait360, windows: list[Window], *, context: Tensor, ref_front: Tensor,
                             ref_back: list[Tensor], steps: int, eta: float, cfg_scale: float,
                             progress: Callable[[int, int], None] | None = None) -> tuple[list[Tensor], int]:
    """The authors' loop: each window sampled on its own with references repeated over the batch."""
    out, calls = [], 0
    for w in windows:
        f = w.hint.shape[0]
        r = sample_reference(model, context=context.expand(f, -1, -1), hint=w.hint,
                             ref_front=ref_front.expand(f, -1, -1, -1),
                             ref_back=[b.expand(f, -1, -1, -1) for b in ref_back],
                             steps=steps, eta=eta, cfg_scale=cfg_scale, feature_latent=w.feature_latent,
                             noise=w.noise, progress=progress)
        out.append(r.latent)
        calls += r.unet_calls
    return out, calls
