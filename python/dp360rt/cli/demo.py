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

from ..io.images import save_png, synthetic_conditions, synthetic_portrait
from .plots import bar_chart
from ..engine.pipeline import Pipeline


def contact_sheet(views: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """[N, 3, H, W] -> one [3, rows*H, cols*W] grid."""
    n, c, h, w = views.shape
    rows = math.ceil(n / cols)
    sheet = torch.ones(c, rows * h, cols * w)
    for i, v in enumerate(views):
        r, col = divmod(i, cols)
        sheet[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = v
    return sheet


def synthetic_head(out: Path, seconds: float, seed: int = 0, progress: bool = True) -> float:
    """What a fitted head looks like without official weights: the built-in synthetic head scene
    (dp360rt.nerf.synthetic, not a generated portrait) rendered on the sphere32 orbit at 64x64,
    fitted for ``seconds`` and orbited -> ``synthetic_head_views.png``, ``synthetic_head_orbit.mp4``.
    Returns the seconds it took."""
    from ..nerf import Nerf
    from ..nerf.video import orbit_video
    from ..nerf.synthetic import render_views
    tic = time.perf_counter()
    print(f"synthetic head scene (built in, NOT a generated portrait): fitting a NeRF for {seconds:g} s ...",
          flush=True)
    images, cams = render_views("head", size=64)
    save_png(contact_sheet(torch.stack([im.permute(2, 0, 1) for im in images])), out / "synthetic_head_views.png")
    head = Nerf(seed=seed)
    head.fit(images, cams, seconds=seconds, progress=progress)
    orbit_video(head, out / "synthetic_head_orbit.mp4", frames=60, fps=30)
    print(f"synthetic head: {head.stats['steps']} steps, training PSNR {head.stats['train_psnr']:.1f} dB; "
          "orbit it live in the browser: python -m dp360rt view --synthetic head", flush=True)
    return time.perf_counter() - tic


def run_demo(out: str | Path, steps: int = 10, seed: int = 0, nerf_seconds: float = 20.0,
             progress: bool = True, synthetic_seconds: float = 10.0, overwrite: bool = False) -> Path:
    """Tiny random-weight pipeline end to end: back view, 32 views, NeRF fit, orbit video, and
    the files a user looks at (views, contact sheet, ``orbit.mp4``, ``head.glb`` and ``head.ply``
    (the portable textured mesh and Gaussian splat), ``timings.json/png``) in ``out``;
    then the synthetic head scene fitted and orbited (``synthetic_head_*``, clearly named: the tiny
    model's views are noise, the head shows what a fitted NeRF looks like). ``out`` is built aside
    and moved into place when complete (an earlier one is replaced only with ``overwrite``)."""
    from ..io.results import ResultDir
    with ResultDir(out, kind="demo", overwrite=overwrite) as rd:   # checked before any work
        total = _demo_into(rd.path, steps, seed, nerf_seconds, progress, synthetic_seconds)
        out = rd.commit()
    print(f"wrote back_view.png, 000.png ... 031.png, cameras.json, contact_sheet.png, orbit.mp4, nerf/, head.glb, head.ply, "
          f"synthetic_head_views.png, synthetic_head_orbit.mp4, timings.json, timings.png to {out} "
          f"({total:.1f} s in all); browse them: python -m dp360rt view {out}")
    return out


def _demo_into(out: Path, steps: int, seed: int, nerf_seconds: float, progress: bool,
               synthetic_seconds: float) -> float:
    from ..io.results import write_text_atomic
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

    from ..nerf.video import orbit_video
    tic = time.perf_counter()
    nerf = res.fit_nerf(seconds=nerf_seconds, progress=progress, seed=seed)
    res.timings["nerf_fit"] = time.perf_counter() - tic
    nerf.save(out / "nerf")
    tic = time.perf_counter()
    frames = 60
    orbit_video(nerf, out / "orbit.mp4", frames=frames, fps=30)
    res.timings["orbit_render"] = time.perf_counter() - tic
    tic = time.perf_counter()       # the portable head: a textured GLB and a 3D Gaussian splat any engine loads
    from ..nerf.splat import EmptyFieldError
    try:
        nerf.export_glb(out / "head.glb", texture_size=512)
        nerf.export_splat(out / "head.ply", views=(list(res.views), res.cameras), steps=100)
    except EmptyFieldError as e:    # a very short fit of the noise views can leave no surface: say so, keep the rest
        (out / "head.glb").unlink(missing_ok=True)
        print(f"skipped the portable head (head.glb, head.ply): {e}", flush=True)
    res.timings["assets"] = time.perf_counter() - tic
    if synthetic_seconds > 0:
        res.timings["synthetic_head"] = synthetic_head(out, synthetic_seconds, seed, progress)
    res.timings["total"] = time.perf_counter() - t

    write_text_atomic(out / "timings.json", json.dumps(res.timings, indent=1))
    bar_chart({k: v for k, v in res.timings.items() if k != "total"}, out / "timings.png",
              f"dp360rt demo (tiny random weights, {steps} steps): seconds per stage")
    print(f"NeRF: {nerf.stats['steps']} steps, training PSNR {nerf.stats['train_psnr']:.1f} dB; "
          f"orbit video {frames} frames at {frames / res.timings['orbit_render']:.0f} fps")
    return res.timings["total"]
