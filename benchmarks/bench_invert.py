"""PanoHead inversion (stage 1 of a generation from a raw photo) timed part by part.

Random PanoHead weights of a spec (speed does not depend on weight values) and a VGG16 of the real
widths (``--vgg-widths full``) or the tiny test one. Times: the w statistics (10 000 mapped z) on
the first call and from the cache; W projection and pivotal tuning per step; the 32 feature
renders batched and one frame per call (as the authors render them); the one copy of the
generator PTI makes (the authors make one per run plus one per saved step). Render times are for 32 frames (``--frames`` fewer are scaled up). Prints the recipe's
total (200 + 5 steps + 32 renders) as dp360rt runs it and as the authors' loop would cost with
the same per-step time (w statistics every run, one-by-one renders, the extra copies).

    python benchmarks/bench_invert.py [--config tiny|full] [--device cpu|cuda] [--w-steps 3] [--pti-steps 2]
                                      [--vgg-widths tiny|full] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from dp360rt.invert import Inverter, VGG16LPIPS, project_w, random_vgg, reference_draws, render_frames, tune_pivot
from dp360rt.invert.projector import stats_camera, w_statistics
from dp360rt.panohead.cameras import diffportrait_orbit


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, dev: str):
    _sync(dev)
    t = time.perf_counter()
    r = fn()
    _sync(dev)
    return time.perf_counter() - t, r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--w-steps", type=int, default=3, help="W projection steps timed (the recipe has 200)")
    ap.add_argument("--pti-steps", type=int, default=2, help="pivotal tuning steps timed (the recipe has 5)")
    ap.add_argument("--vgg-widths", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--frames", type=int, default=32, help="feature renders timed (the recipe has 32; scaled to 32)")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = a.device
    inv = Inverter.random(a.config, device=dev)
    g = inv.g
    vgg = (VGG16LPIPS().to(dev).eval().requires_grad_(False) if a.vgg_widths == "full" else random_vgg().to(dev))
    target = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    cam = stats_camera().to(dev)
    res: dict = {"config": a.config, "device": dev, "vgg_widths": a.vgg_widths, "torch": torch.__version__,
                 "machine": torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or "cpu",
                 "threads": torch.get_num_threads()}

    res["w_stats_first_s"], _ = _timed(lambda: w_statistics(g), dev)
    res["w_stats_cached_s"], _ = _timed(lambda: w_statistics(g), dev)
    d = reference_draws()
    project_w(g, target, cam, vgg, steps=200, draws=d, until=1)            # warm-up
    t, (w, c) = _timed(lambda: project_w(g, target, cam, vgg, steps=200, draws=d, until=a.w_steps), dev)
    res["w_step_s"] = t / a.w_steps
    t_copy, _ = _timed(lambda: copy.deepcopy(g), dev)
    res["generator_copy_s"] = t_copy
    t, tuned = _timed(lambda: tune_pivot(g, target, w, c, vgg, steps=a.pti_steps, draws=d), dev)
    res["pti_step_s"] = max(t - t_copy, 0.0) / max(a.pti_steps, 1)
    cams = diffportrait_orbit(range(a.frames), 32)
    scale = 32 / a.frames
    t, _ = _timed(lambda: render_frames(tuned, w, cams, draws=d, batch=8), dev)
    res["renders_batched_s"] = t * scale
    t, _ = _timed(lambda: render_frames(tuned, w, cams, draws=d, batch=1), dev)
    res["renders_one_by_one_s"] = t * scale
    ours = (res["w_stats_cached_s"] + 200 * res["w_step_s"] + t_copy + 5 * res["pti_step_s"]
            + res["renders_batched_s"])
    # the authors' loop: statistics every run, a copy in project() and in project_pti() plus one per
    # saved PTI step (steps 0 and 4 of 5), frames one by one; the same per-step time
    authors = (res["w_stats_first_s"] + t_copy + 200 * res["w_step_s"] + t_copy + 5 * res["pti_step_s"]
               + 2 * t_copy + res["renders_one_by_one_s"])
    res["recipe_total_s"] = {"dp360rt": ours, "authors_loop_same_kernels": authors}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


# -- pytest-benchmark (tiny settings) ----------------------------------------------------------
def test_invert_tiny(benchmark, tmp_path):
    """This script at tiny settings in its own process (`pytest benchmarks --benchmark-json out.json`)."""
    from script_runner import run_script
    run_script(benchmark, "bench_invert.py", ["--frames", "4"], tmp_path)


if __name__ == "__main__":
    raise SystemExit(main())

