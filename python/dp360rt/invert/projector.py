"""PanoHead inversion as DiffPortrait360's ``3DNoise/projector_withseg.py`` does it (FACTS §9).

1. :func:`w_statistics`: w_avg / w_std of 10 000 mapped z (``RandomState(123)``) at the frontal
   camera; computed once per generator and cached (the authors recompute it every run).
2. :func:`project_w`: the learned camera shift (``t_mapping`` of the mean z) added to the target
   camera, then W projection: Adam on w (one row per layer), lr 0.1 with the cosine ramp, w noise
   ``w_std * 0.05 * max(0, 1 - t/0.75)^2``, loss ``0.1 * MSE(512²) + LPIPS-VGG16(256²) + w_norm``.
3. :func:`tune_pivot` (PTI): the generator's weights tuned at the fixed w with Adam (lr 3e-4),
   loss ``0.1 * MSE + LPIPS``; one copy of the generator, no copies per step.

Targets are uint8 [3, 512, 512] images; every render draws its renderer numbers from a
:class:`~dp360rt.panohead.draws.Draws` (a seed replays the reference's CPU draw order).
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..panohead.cameras import AUTHORS_PI, FOCAL, RADIUS, lookat_label
from ..panohead.draws import Draws
from ..panohead.generator import TriPlaneGenerator

RAY_START = 2.35            # both projector scripts set it on the loaded generator
W_AVG_SAMPLES = 10000
W_STEPS = 200               # inference.sh's --num_steps
PTI_STEPS = 5               # the script's --num_steps_pti default
SEED = 666

Progress = Callable[[str, int, int], None]


@dataclass
class WStats:
    """w_avg [1, 1, w_dim] float32, w_std (float), z_mean [1, z_dim] float64 (for the camera shift)."""
    w_avg: Tensor
    w_std: float
    z_mean: Tensor


@dataclass
class ProjectionLog:
    """Per-step record of :func:`project_w` (what the fixture's projector case stores)."""
    lr: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    w_grad: list[Tensor] = field(default_factory=list)
    w_after_step: list[Tensor] = field(default_factory=list)
    images_pool8: list[Tensor] = field(default_factory=list)


_STATS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, WStats]]" = weakref.WeakKeyDictionary()


def _mapping_version(g: TriPlaneGenerator) -> tuple:
    # in-place changes bump a tensor's _version: a cached w_avg is reused only for unchanged weights
    return tuple((p.data_ptr(), p._version) for p in g.backbone.mapping.parameters()) + \
        tuple((b.data_ptr(), b._version) for b in g.backbone.mapping.buffers()) + (str(next(g.parameters()).device),)


def stats_camera() -> Tensor:
    """The camera of the w statistics [1, 25]: pose sampler (3.14/2, 3.14/2), look-at origin, r 2.7."""
    return lookat_label(AUTHORS_PI / 2, AUTHORS_PI / 2, (0.0, 0.0, 0.0), RADIUS, FOCAL).float()


@torch.no_grad()
def w_statistics(g: TriPlaneGenerator, samples: int = W_AVG_SAMPLES, chunk: int = 2000) -> WStats:
    """w_avg, w_std and the mean z of ``samples`` z from ``RandomState(123)`` mapped (psi 1) at
    :func:`stats_camera`; cached per generator until its mapping weights change."""
    key = (_mapping_version(g), samples)
    hit = _STATS.get(g)
    if hit is not None and hit[0] == key:
        return hit[1]
    dev = next(g.parameters()).device
    z = np.random.RandomState(123).randn(samples, g.z_dim)
    c = stats_camera().to(dev)
    rows = []
    for i in range(0, samples, chunk):
        zi = torch.from_numpy(z[i:i + chunk]).to(dev)
        rows.append(g.backbone.mapping(zi, g._camera_label(c.expand(len(zi), -1)), 1, None)[:, 0].double())
    w = torch.cat(rows)                                  # [samples, w_dim]
    w_avg = w.float().double().mean(0, keepdim=True)
    w_std = float(((w.float().double() - w_avg) ** 2).sum() / samples) ** 0.5
    stats = WStats(w_avg.float().unsqueeze(0), w_std, torch.from_numpy(z.mean(0, keepdims=True)))
    _STATS[g] = (key, stats)
    return stats


def shifted_camera(g: TriPlaneGenerator, c: Tensor, stats: WStats) -> Tensor:
    """The target camera [1, 25] with ``t_mapping(mean z, c)`` added to its translation (c[3], c[7], c[11])."""
    with torch.no_grad():
        delta = g.t_mapping(stats.z_mean.to(c.device), c[:1].float(), 1.0, None).squeeze(1)
    out = c.float().clone()
    out[:, 3] += delta[:, 0]
    out[:, 7] += delta[:, 1]
    out[:, 11] += delta[:, 2]
    return out


def learning_rate(step: int, steps: int, initial: float = 0.1, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """The projector's lr at ``step`` of ``steps``: 0 at step 0, cosine ramp-down over the last quarter."""
    t = step / steps
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return initial * ramp * min(1.0, t / rampup)


def target_tensor(image) -> Tensor:
    """A uint8 target [3, 512, 512] from a PIL image / path: centre square, Lanczos to 512 (the authors' transform)."""
    from PIL import Image
    from ..io.images import open_image, to_rgb
    img = to_rgb(open_image(image) if not isinstance(image, Image.Image) else image)
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((512, 512), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _perceptual_input(images: Tensor) -> Tensor:
    """[-1, 1] images -> [0, 255], area-resized to 256² when larger (the authors' VGG input)."""
    x = (images + 1) * (255 / 2)
    if x.shape[2] > 256:
        x = F.interpolate(x, size=(256, 256), mode="area")
    return x


class _RayStart:
    """Set ``rendering_kwargs['ray_start']`` for a block and restore it after."""

    def __init__(self, g: TriPlaneGenerator, value: float):
        self.g, self.value = g, value

    def __enter__(self):
        self.saved = self.g.rendering_kwargs["ray_start"]
        self.g.rendering_kwargs["ray_start"] = float(self.value)

    def __exit__(self, *exc):
        self.g.rendering_kwargs["ray_start"] = self.saved


@torch.enable_grad()        # also inside a caller's no_grad (the pipeline runs under one)
def project_w(g: TriPlaneGenerator, target: Tensor, c: Tensor, perceptual: nn.Module, *, steps: int = W_STEPS,
              draws: Draws | None = None, ray_start: float = RAY_START, log: ProjectionLog | None = None,
              progress: Progress | None = None, until: int | None = None) -> tuple[Tensor, Tensor]:
    """W projection of ``target`` (uint8 [3, 512, 512]) seen from camera ``c`` [1, 25] (PanoHead
    label, before the camera shift) -> (w [1, num_ws, w_dim] after the last step, the shifted
    camera [1, 25]). ``perceptual``: images [N, 3, 256, 256] in [0, 255] -> features [N, F].
    ``until``: stop after that many steps of the ``steps``-step schedule (tests, benchmarks)."""
    if steps < 1:
        raise ValueError(f"projection steps must be >= 1, got {steps}. Fix: e.g. --w-steps 200")
    dev = next(g.parameters()).device
    draws = draws if draws is not None else Draws(SEED)
    stats = w_statistics(g)
    c = shifted_camera(g, c.to(dev), stats)
    target_images = target.unsqueeze(0).to(dev, torch.float32) / 255.0 * 2 - 1
    with torch.no_grad():
        target_features = perceptual(_perceptual_input(target_images))
    w_avg = stats.w_avg.to(dev).repeat(1, g.num_ws, 1)
    w_opt = w_avg.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w_opt], betas=(0.9, 0.999), lr=0.1)
    with _RayStart(g, ray_start):
        for step in range(steps if until is None else min(until, steps)):
            t = step / steps
            noise_scale = stats.w_std * 0.05 * max(0.0, 1.0 - t / 0.75) ** 2
            lr = learning_rate(step, steps)
            for group in opt.param_groups:
                group["lr"] = lr
            ws = w_opt + draws.randn(w_opt.shape, dev) * noise_scale
            images = g.synthesis(ws, c, noise_mode="const", draws=draws)["image"]
            perc = (target_features - perceptual(_perceptual_input(images))).square().sum(1).mean()
            mse = (target_images - images).square().mean()
            w_norm = (w_opt - w_avg).square().mean()
            loss = 0.1 * mse + perc + w_norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if log is not None:
                log.lr.append(lr)
                log.loss.append(float(loss.detach()))
                log.w_grad.append(w_opt.grad.detach().clone())
                log.images_pool8.append(F.avg_pool2d(images.detach(), 8))
            opt.step()
            if log is not None:
                log.w_after_step.append(w_opt.detach().clone())
            if progress:
                progress("inversion: W projection", step + 1, steps)
    return w_opt.detach(), c


@torch.enable_grad()
def tune_pivot(g: TriPlaneGenerator, target: Tensor, w: Tensor, c: Tensor, perceptual: nn.Module, *,
               steps: int = PTI_STEPS, lr: float = 3e-4, draws: Draws | None = None, ray_start: float = RAY_START,
               progress: Progress | None = None) -> TriPlaneGenerator:
    """Pivotal tuning: a copy of ``g`` whose weights are tuned for ``steps`` Adam steps so that
    ``synthesis(w, c)`` matches ``target`` (uint8 [3, 512, 512]); w [1, num_ws, w_dim] and the
    shifted camera c [1, 25] from :func:`project_w`. Returns the tuned copy in eval mode (``g`` is
    left unchanged)."""
    if steps < 0:
        raise ValueError(f"pivotal tuning steps must be >= 0, got {steps}. Fix: e.g. --pti-steps 5")
    dev = next(g.parameters()).device
    draws = draws if draws is not None else Draws(SEED + 1)
    tuned = copy.deepcopy(g).train().requires_grad_(True)
    tuned.rendering_kwargs["ray_start"] = float(ray_start)
    if steps:
        target_images = target.unsqueeze(0).to(dev, torch.float32) / 255.0 * 2 - 1
        with torch.no_grad():
            target_features = perceptual(_perceptual_input(target_images))
        w = w.to(dev).detach()
        # only the synthesis path gets gradients; Adam skips the others (as with all of G's parameters)
        opt = torch.optim.Adam([p for p in tuned.parameters()], betas=(0.9, 0.999), lr=lr)
        for step in range(steps):
            images = tuned.synthesis(w, c, noise_mode="const", draws=draws)["image"]
            perc = (target_features - perceptual(_perceptual_input(images))).square().sum(1).mean()
            loss = 0.1 * (target_images - images).square().mean() + perc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                progress("inversion: pivotal tuning", step + 1, steps)
    return tuned.eval().requires_grad_(False)
