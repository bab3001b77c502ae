"""Camera-condition (pose-hint) images for any orbit, rendered with the PanoHead generator.

DiffPortrait360's pose ControlNet reads one PanoHead render per view. The authors ship a fixed
set (``cam_condition/sphere32``: ``0000000.png`` ... ``0000031.png``, 512x512); which identity
(seed), truncation and renderer settings made those images is not stated in their code or
README, so this module does not claim to reproduce them. It renders the same *kind* of image
for any cameras: one fixed identity (``z`` from ``numpy.random.RandomState(seed)``, PanoHead's
``gen_samples`` convention), mapped with the frontal conditioning camera and truncation 0.7
(cutoff 14), constant layer noise, ray_start 2.35 (the value DiffPortrait360's PanoHead scripts
set), each frame's renderer draws from its own seeded generator (``render_seed + k``), converted to
8 bits as the authors convert frames (``x * 127.5 + 128``, clamped, truncated).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .cameras import FOCAL, RADIUS, lookat_label
from .draws import Draws
from .generator import TriPlaneGenerator

RAY_START = 2.35


def identity_ws(g: TriPlaneGenerator, seed: int = 0, truncation_psi: float = 0.7, truncation_cutoff: int | None = 14
                ) -> Tensor:
    """ws [1, num_ws, w_dim] of the identity ``seed``: z = RandomState(seed).randn(1, z_dim), the
    frontal conditioning camera (h = v = pi/2, look-at origin, radius 2.7)."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, g.z_dim)).float()
    dev = next(g.parameters()).device
    c = lookat_label(np.pi / 2, np.pi / 2, (0.0, 0.0, 0.0), RADIUS, FOCAL).float()
    cutoff = None if truncation_cutoff is None else min(int(truncation_cutoff), g.num_ws)
    with torch.no_grad():
        return g.mapping(z.to(dev), c.to(dev), truncation_psi, cutoff)


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] nominally in [-1, 1] -> uint8 [N, H, W, 3] as DiffPortrait360's frames
    (``(x * 127.5 + 128).clamp(0, 255)``, truncated)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def render_conditions(g: TriPlaneGenerator, cameras: Tensor, out_dir: str | Path, seed: int = 0,
                      truncation_psi: float = 0.7, render_seed: int = 0, ray_start: float = RAY_START,
                      noise_mode: str = "const", progress=None) -> Path:
    """Render one pose-hint PNG per camera into ``out_dir`` (``0000000.png`` ... plus
    ``cameras.json``), the layout of the authors' ``cam_condition/sphere32`` folder, which
    :class:`dp360rt.Pipeline` reads together with its cameras.

    cameras [K, 25] (PanoHead labels). The folder is written to a temporary sibling and renamed
    into place, so it is complete or absent; an existing ``out_dir`` is replaced only when the
    new one is complete. Returns the folder."""
    from ..nerf.cameras import write_cameras_json
    cameras = torch.as_tensor(cameras, dtype=torch.float64)
    if cameras.ndim != 2 or cameras.shape[1] != 25 or len(cameras) == 0:
        raise ValueError(f"cameras must be [K, 25] PanoHead labels, got {tuple(cameras.shape)}. Fix: 4x4 cam2world "
                         "row-major + 3x3 normalized intrinsics per camera")
    if not bool(torch.isfinite(cameras).all()):
        raise ValueError("cameras contain NaN or Inf. Fix: give finite camera numbers")
    from ..io.results import ResultDir
    with ResultDir(out_dir, kind="conditions", overwrite=True) as r:
        tmp = r.path
        ws = identity_ws(g, seed, truncation_psi)
        dev = ws.device
        saved = g.rendering_kwargs["ray_start"]
        g.rendering_kwargs["ray_start"] = float(ray_start)
        names = []
        try:
            for k, cam in enumerate(cameras):
                with torch.no_grad():
                    img = g.synthesis(ws, cam[None].float().to(dev), noise_mode=noise_mode,
                                      draws=Draws(render_seed + k))["image"]
                name = f"{k:07d}.png"
                Image.fromarray(to_uint8(img)[0]).save(tmp / name)
                names.append(name)
                if progress:
                    progress(k + 1, len(cameras))
        finally:
            g.rendering_kwargs["ray_start"] = saved
        write_cameras_json(tmp / "cameras.json", cameras, names)
        return r.commit(views=len(names))
