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


def run_demo(out: str | Path, steps: int = 10, seed: int = 0) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output directory {out}: {e.strerror}. Fix: pass a writable --out") from e
    print("dp360rt demo: tiny random-weight models - the pictures are noise; real views need the official "
          "checkpoints (dp360rt generate --nvs model_state-340000.th --backview back_head-230000.th ...)")
    t = time.perf_counter()
    pipe = Pipeline.random("tiny", seed=seed)
    size = pipe.image_size
    res = pipe(synthetic_portrait(size), synthetic_conditions(32, size), steps=steps, seed=seed)
    res.timings["total"] = time.perf_counter() - t
    res.save(out)
    save_png(contact_sheet(res.views), out / "contact_sheet.png")
    (out / "timings.json").write_text(json.dumps(res.timings, indent=1))
    bar_chart({k: v for k, v in res.timings.items() if k != "total"}, out / "timings.png",
              f"dp360rt demo (tiny random weights, {steps} steps): seconds per stage")
    print(f"wrote {len(res.views)} views, back_view.png, contact_sheet.png, timings.json, timings.png to {out} "
          f"({res.timings['total']:.1f} s, {res.unet_calls} UNet calls)")
    return out
