"""``dp360rt demo``: the whole pipeline on a tiny random-weight model, on any machine, in seconds.

The pictures are noise-like (random weights): the demo shows the pipeline, files and timings. Real
views need the official checkpoints: ``dp360rt generate --nvs ... --backview ...``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .images import save_png
from .plots import bar_chart
from .pipeline import Pipeline


def synthetic_conditions(n: int = 32, size: int = 64) -> torch.Tensor:
    """Stand-in camera condition images [n, 3, size, size] in [-1, 1]: a shaded disc whose
    shading turns with the orbit azimuth (the authors' renders are not redistributable here)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = (xs ** 2 + ys ** 2 < 0.6).float()
    out = []
    for i in range(n):
        az = 2 * math.pi * i / n
        shade = 0.5 + 0.5 * (xs * math.cos(az) + ys * 0.3)
        img = torch.stack([shade * disc, (1 - shade) * disc, 0.5 * disc])
        out.append(img * 2 - 1)
    return torch.stack(out)


def synthetic_portrait(size: int = 64) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    face = ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 < 1).float()
    img = torch.stack([0.9 * face + 0.1, 0.7 * face + 0.1, 0.6 * face + 0.1])
    return (img * 2 - 1)[None]


def contact_sheet(views: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """[N, 3, H, W] -> one [3, rows*H, cols*W] grid."""
    n, c, h, w = views.shape
    rows = math.ceil(n / cols)
    sheet = torch.ones(c, rows * h, cols * w)
    for i, v in enumerate(views):
        r, col = divmod(i, cols)
        sheet[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = v
    return sheet


def run_demo(out: str | Path, steps: int = 10, seed: int = 0, nerf_seconds: float = 20.0,
             progress: bool = True, overwrite: bool = False) -> Path:
    """Tiny random-weight pipeline end to end: back view, 32 views, NeRF fit, orbit video, and
    the files a user looks at (views, contact sheet, ``orbit.mp4``, ``timings.json/png``) in ``out``."""
    from .results import ResultDir
    with ResultDir(out, kind="demo", overwrite=overwrite) as rd:   # checked before any work; moved into place at the end
        _demo_into(rd.path, steps, seed, nerf_seconds, progress)
        return rd.commit()


def _demo_into(out: Path, steps: int, seed: int, nerf_seconds: float, progress: bool) -> None:
    from .results import write_text_atomic
    print("dp360rt demo: tiny random-weight models - the pictures are noise; real views need the official "
          "checkpoints (dp360rt generate --nvs model_state-340000.th --backview back_head-230000.th ...)")
    t = time.perf_counter()
    pipe = Pipeline.random("tiny", seed=seed)
    size = pipe.image_size
    res = pipe(synthetic_portrait(size), synthetic_conditions(32, size), steps=steps, seed=seed)
    res.write_into(out)
    save_png(contact_sheet(res.views), out / "contact_sheet.png")
    print(f"generated the back view and {len(res.views)} views ({res.unet_calls} UNet calls); "
          f"fitting a NeRF for {nerf_seconds:g} s ...", flush=True)

    from .nerf.export import orbit_video
    tic = time.perf_counter()
    nerf = res.fit_nerf(seconds=nerf_seconds, progress=progress, seed=seed)
    res.timings["nerf_fit"] = time.perf_counter() - tic
    nerf.save(out / "nerf")
    tic = time.perf_counter()
    frames = 60
    orbit_video(nerf, out / "orbit.mp4", frames=frames, fps=30)
    res.timings["orbit_render"] = time.perf_counter() - tic
    res.timings["total"] = time.perf_counter() - t

    write_text_atomic(out / "timings.json", json.dumps(res.timings, indent=1))
    bar_chart({k: v for k, v in res.timings.items() if k != "total"}, out / "timings.png",
              f"dp360rt demo (tiny random weights, {steps} steps): seconds per stage")
    print(f"NeRF: {nerf.stats['steps']} steps, training PSNR {nerf.stats['train_psnr']:.1f} dB; "
          f"orbit video {frames} frames at {frames / res.timings['orbit_render']:.0f} fps")
    print(f"wrote back_view.png, 000.png ... 031.png, cameras.json, contact_sheet.png, orbit.mp4, nerf/, "
          f"timings.json, timings.png ({res.timings['total']:.1f} s in all)")
