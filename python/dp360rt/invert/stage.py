"""Stage 1 of a generation, 3D-aware noise: invert the portrait into PanoHead and render the 32
feature frames at the orbit cameras (DiffPortrait360's ``3DNoise`` step, FACTS §9).

``Inverter(panohead=FILE, vgg=FILE)`` loads both networks once; ``inverter(image, camera)`` ->
:class:`Inversion` (w, shifted camera, the 32 frames as uint8, timings). The frames enter
:class:`dp360rt.Pipeline` as ``features`` exactly as a feature folder does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..panohead.cameras import diffportrait_orbit
from ..panohead.conditions import to_uint8
from ..panohead.draws import Draws
from ..panohead.generator import TriPlaneGenerator
from .projector import PTI_STEPS, RAY_START, SEED, W_STEPS, Progress, project_w, stats_camera, target_tensor, tune_pivot


def reference_draws(seed: int = SEED) -> Draws:
    """Draws in the authors' order after ``torch.manual_seed(seed)``: the pose sampler's two
    (zero-weighted) normal numbers first, then every draw of the projection, tuning and frames."""
    d = Draws(seed)
    d.randn((1, 1))
    d.randn((1, 1))
    return d


def _frame_draws(g: TriPlaneGenerator, draws: Draws, n: int) -> Draws:
    """Draws for one batched render of ``n`` frames that equal ``n`` renders of one frame each
    (per frame: coarse jitter, then importance samples, as the reference renders them one by one)."""
    r = int(g.neural_rendering_resolution)
    s, imp = g.rendering_kwargs["depth_resolution"], g.rendering_kwargs["depth_resolution_importance"]
    jitter, fine = [], []
    for _ in range(n):
        jitter.append(draws.rand((1, r * r, s, 1)))
        if imp:
            fine.append(draws.rand((r * r, imp)))
    return Draws(recorded=[torch.cat(jitter)] + ([torch.cat(fine)] if imp else []))


@torch.no_grad()
def render_frames(g: TriPlaneGenerator, w: Tensor, cameras: Tensor | None = None, draws: Draws | None = None,
                  batch: int = 8, ray_start: float = RAY_START, progress: Progress | None = None) -> np.ndarray:
    """The feature frames: ``g.synthesis(w, c)`` (constant layer noise) at each camera [K, 25]
    (default: the 32 sphere32 orbit cameras, without the camera shift, as the authors render them)
    in batches of ``batch`` -> uint8 [K, 512, 512, 3] (``x * 127.5 + 128``, clamped, as the authors)."""
    dev = next(g.parameters()).device
    cams = diffportrait_orbit(range(32)) if cameras is None else torch.as_tensor(cameras)
    cams = cams.to(dev, torch.float32)
    draws = draws if draws is not None else Draws(SEED)
    saved = g.rendering_kwargs["ray_start"]
    g.rendering_kwargs["ray_start"] = float(ray_start)
    out = []
    try:
        for i in range(0, len(cams), batch):
            c = cams[i:i + batch]
            d = _frame_draws(g, draws, len(c)) if draws.recorded is None else draws
            img = g.synthesis(w.to(dev).expand(len(c), -1, -1), c, noise_mode="const", draws=d)["image"]
            out.append(to_uint8(img))
            if progress:
                progress("3D-aware noise: feature renders", min(i + batch, len(cams)), len(cams))
    finally:
        g.rendering_kwargs["ray_start"] = saved
    return np.concatenate(out)


@dataclass
class Inversion:
    """Result of :class:`Inverter`: w [1, num_ws, w_dim]; camera [1, 25] the input camera,
    camera_shifted [1, 25] with PanoHead's learned shift; frames uint8 [32, 512, 512, 3];
    projected uint8 [512, 512, 3] (the tuned generator seen from the shifted camera); target uint8
    [3, 512, 512]; timings in seconds per part."""
    w: Tensor
    camera: Tensor
    camera_shifted: Tensor
    frames: np.ndarray
    projected: np.ndarray
    target: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def features(self, size: int) -> Tensor:
        """The frames as the pipeline's ``features`` [32, 3, size, size] in [-1, 1], converted as a
        feature folder's PNGs are (:func:`dp360rt.io.images.load_frames`)."""
        from ..io.images import pil_to_tensor
        return torch.stack([pil_to_tensor(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in self.frames])

    def save(self, out_dir: str | Path) -> Path:
        """Write ``features/000.png`` ... ``031.png`` (a ``--features`` folder), ``projected.png``,
        ``target.png``, ``w.safetensors`` (w and both cameras), ``timings.json`` and ``inversion.json``
        (settings, timings), all or nothing: built beside ``out_dir`` and moved into place (an earlier
        inversion there is replaced)."""
        from safetensors.torch import save_file
        from ..io.results import ResultDir, write_text_atomic
        with ResultDir(out_dir, kind="inversion", overwrite=True) as r:
            tmp = r.path
            (tmp / "features").mkdir()
            for k, f in enumerate(self.frames):
                Image.fromarray(f).save(tmp / "features" / f"{k:03d}.png")
            Image.fromarray(self.projected).save(tmp / "projected.png")
            Image.fromarray(self.target.permute(1, 2, 0).numpy()).save(tmp / "target.png")
            save_file({"w": self.w.float().cpu().contiguous(), "camera": self.camera.float().cpu().contiguous(),
                       "camera_shifted": self.camera_shifted.float().cpu().contiguous()}, str(tmp / "w.safetensors"))
            write_text_atomic(tmp / "timings.json", json.dumps(self.timings, indent=1))
            write_text_atomic(tmp / "inversion.json", json.dumps({"settings": self.settings, "timings": self.timings,
                                                                  "camera": self.camera.flatten().tolist()}, indent=1))
            return r.commit(frames=len(self.frames))


class Inverter:
    """PanoHead inversion with a VGG16 perceptual loss (stage 1 of a generation).

    ``panohead``: a file (``.pkl`` or converted ``.safetensors``) or a loaded
    :class:`~dp360rt.panohead.TriPlaneGenerator`; ``vgg``: NVIDIA's ``vgg16.pt`` (or a state dict
    file, :mod:`dp360rt.invert.vgg_file`) or a module. ``w_steps`` / ``pti_steps``: the authors'
    200 / 5; ``batch``: frames per render call. The generator's w statistics are computed on the
    first call and kept."""

    def __init__(self, panohead: Any, vgg: Any, *, device: str | torch.device = "cpu", w_steps: int = W_STEPS,
                 pti_steps: int = PTI_STEPS, seed: int = SEED, batch: int = 8):
        for name, v, lo in (("w_steps", w_steps, 1), ("pti_steps", pti_steps, 0), ("batch", batch, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}. Fix: e.g. {name}="
                                 f"{ {'w_steps': W_STEPS, 'pti_steps': PTI_STEPS, 'batch': 8}[name]}")
        if isinstance(vgg, (str, Path)):
            from .vgg_file import load_vgg
            vgg = load_vgg(vgg, device)
        if isinstance(panohead, (str, Path)):
            from ..panohead.weights import load_generator
            panohead = load_generator(panohead, device)
        self.g, self.vgg = panohead.to(device).eval(), vgg.to(device).eval()
        self.w_steps, self.pti_steps, self.seed, self.batch = w_steps, pti_steps, seed, batch

    @classmethod
    def random(cls, config: str = "tiny", seed: int = 0, **kw: Any) -> "Inverter":
        """Random PanoHead (``config``) and tiny VGG16 weights: real code paths, meaningless frames."""
        from ..panohead.configs import load_spec
        from ..panohead.weights import build_generator
        from .vgg import random_vgg
        torch.manual_seed(seed)          # the layers' own initialisation, as `dp360rt conditions --random`
        return cls(build_generator(load_spec(config)), random_vgg(seed=seed), **kw)

    def __call__(self, image: Any, camera: Tensor | None = None, progress: Progress | None = None) -> Inversion:
        """Invert ``image`` (a path, PIL image or uint8 [3, 512, 512] tensor; the 512² face crop)
        seen from ``camera`` ([25] or [1, 25] PanoHead label, e.g. ``dp360rt crop``'s; default the
        frontal camera) and render the 32 feature frames."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        target = image if isinstance(image, Tensor) else target_tensor(image)
        if target.dtype != torch.uint8 or tuple(target.shape) != (3, 512, 512):
            raise ValueError(f"inversion target must be uint8 [3, 512, 512], got {target.dtype} {tuple(target.shape)}. "
                             "Fix: pass the 512² face crop (dp360rt crop) as an image")
        cam = stats_camera() if camera is None else torch.as_tensor(camera, dtype=torch.float32).reshape(1, -1)
        if cam.shape != (1, 25) or not bool(torch.isfinite(cam).all()):
            raise ValueError(f"the portrait's camera must be 25 finite numbers, got {tuple(cam.shape)}. Fix: pass "
                             "camera.json's camera from dp360rt crop")
        dev = next(self.g.parameters()).device
        draws = reference_draws(self.seed)
        w, c_shift = project_w(self.g, target, cam.to(dev), self.vgg, steps=self.w_steps, draws=draws,
                               progress=progress)
        timings["w_projection"] = time.perf_counter() - t
        t = time.perf_counter()
        tuned = tune_pivot(self.g, target, w, c_shift, self.vgg, steps=self.pti_steps, draws=draws,
                           progress=progress)
        timings["pivotal_tuning"] = time.perf_counter() - t
        t = time.perf_counter()
        frames = render_frames(tuned, w, draws=draws, batch=self.batch, progress=progress)
        with torch.no_grad():
            proj = tuned.synthesis(w, c_shift, noise_mode="const", draws=Draws(self.seed))["image"]
        timings["feature_renders"] = time.perf_counter() - t
        del tuned
        settings = {"w_steps": self.w_steps, "pti_steps": self.pti_steps, "seed": self.seed, "ray_start": RAY_START,
                    "frames": len(frames), "batch": self.batch}
        return Inversion(w.cpu(), cam.cpu(), c_shift.cpu(), frames, to_uint8(proj)[0], target.cpu(), timings, settings)
