"""``dp360rt bench``: per-stage latency of a whole generation, with warm-up and repeats.

Stages: text encoding, VAE encoding, back view, views (and per window), decoding, total (the
generation), NeRF fit (a fixed step count) and the render of one view. Writes ``bench.json`` (medians, all
repeats, peak memory, device and versions) and ``bench.png`` (bar chart of the medians).
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..capabilities import capabilities
from ..engine.pipeline import Pipeline
from .plots import bar_chart
from ..text.clip import empty_prompt_ids


def _sync(pipe: Pipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(pipe: Pipeline, fn) -> float:
    _sync(pipe)
    t = time.perf_counter()
    fn()
    _sync(pipe)
    return time.perf_counter() - t


@torch.no_grad()
def run_bench(pipe: Pipeline, out: str | Path, *, steps: int = 50, repeats: int = 3, warmup: int = 1,
              conditions: Any = None, portrait: Any = None, nerf_steps: int = 200,
              overwrite: bool = False) -> dict:
    """Time every stage ``warmup + repeats`` times (the NeRF fit with a fixed ``nerf_steps``,
    the render of one view at the generation's size); write ``bench.json`` and ``bench.png`` in
    ``out`` (a new folder, or an earlier one replaced with ``overwrite``) and return the report."""
    from ..io.checks import positive_int
    from ..io.images import synthetic_portrait
    from ..io.results import ResultDir, check_output_dir, write_text_atomic
    repeats = positive_int(repeats, "repeats")         # medians need at least one timed run
    warmup = positive_int(warmup, "warmup", minimum=0)
    nerf_steps = positive_int(nerf_steps, "nerf_steps")
    out = check_output_dir(out, overwrite)         # before an hour of timing, not after
    s = pipe.image_size
    portrait = portrait if portrait is not None else synthetic_portrait(s)
    img = synthetic_portrait(s).to(pipe.device)
    ids = empty_prompt_ids(pipe.nvs.cfg.text.max_position_embeddings).to(pipe.device)
    runs: list[dict[str, float]] = []
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        r: dict[str, float] = {}
        r["text"] = _timed(pipe, lambda: pipe.nvs.encode_text(ids))
        r["vae_encode"] = _timed(pipe, lambda: pipe.nvs.encode_image(img))
        t = time.perf_counter()
        res = pipe(portrait, conditions, steps=steps, seed=i)
        _sync(pipe)
        r["total"] = time.perf_counter() - t
        r["back_view"] = res.timings["back_view"]
        r["views"] = res.timings["views"]
        r["window (each)"] = res.timings["views"] / (res.views.shape[0] // pipe.nvs.frames)
        r["decode"] = res.timings["decode"]
        nerf = None

        def fit() -> None:
            nonlocal nerf
            nerf = res.fit_nerf(seconds=None, steps=nerf_steps, progress=False, tune_threads=False)

        r["nerf_fit"] = _timed(pipe, fit)
        r["nerf_render"] = _timed(pipe, lambda: nerf.render(res.cameras[0], s, s))
        if i >= warmup:
            runs.append(r)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    peak = (torch.cuda.max_memory_allocated() if pipe.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(pipe.device), "dtype": str(pipe.dtype),
        "compute_dtype": str(pipe.compute_dtype), "engine": pipe.engine,
        "config_model_channels": pipe.nvs.cfg.unet.model_channels, "image_size": s,
        "steps": steps, "repeats": repeats, "warmup": warmup, "median_s": med, "runs": runs,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if pipe.device.type == "cuda" else "process peak RSS",
        "python": platform.python_version(), "capabilities": capabilities(),
        "plan": pipe.plan.describe(4, pipe.nvs.frames) if pipe.plan else None,
    }
    with ResultDir(out, kind="bench", overwrite=overwrite) as rd:
        write_text_atomic(rd.path / "bench.json", json.dumps(report, indent=1))
        bar_chart({k: v for k, v in med.items()}, rd.path / "bench.png",
                  f"dp360rt bench: {pipe.engine} engine, {steps} steps, {pipe.device}, median of {repeats}")
        rd.commit()
    print(f"{'stage':<16} {'median s':>10}")
    for k, v in med.items():
        print(f"{k:<16} {v:10.3f}")
    print(f"peak memory {peak / 2**20:.0f} MiB ({report['peak_memory_kind']}); wrote {out / 'bench.json'}, {out / 'bench.png'}")
    return report
