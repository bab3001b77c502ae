"""PanoHead generator latency: one 512x512 render (``G.synthesis``) at the released size.

Random weights of the ``full`` spec (speed does not depend on weight values): tri-grid backbone at
256², background network at 128², neural rendering at 64² with 48 + 48 samples per ray, 8x
super-resolution to 512². Times the whole call and its parts (mapping, tri-grid, volume render +
background + raw RGB, super-resolution) with warm-up and repeats; float32 on every device.

    python benchmarks/bench_panohead.py [--config full|tiny] [--device cpu|cuda] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dp360rt.panohead.cameras import diffportrait_orbit
from dp360rt.panohead.configs import load_spec
from dp360rt.panohead.weights import build_generator


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, dev: str, repeats: int) -> dict:
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return {"median_s": sorted(times)[len(times) // 2], "all_s": times}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = a.device
    torch.manual_seed(0)
    g = build_generator(load_spec(a.config)).to(dev)
    c = diffportrait_orbit([0]).float().to(dev)
    z = torch.randn(1, g.z_dim, device=dev)
    with torch.no_grad():
        ws = g.mapping(z, c, 0.7, 14)
        planes = g.planes(ws, noise_mode="const")
        parts = {
            "mapping": lambda: g.mapping(z, c, 0.7, 14),
            "trigrid_backbone": lambda: g.planes(ws, noise_mode="const"),
            "synthesis_512": lambda: g.synthesis(ws, c, noise_mode="const", draws=0),
        }
        res = {name: _time(fn, dev, a.repeats) for name, fn in parts.items()}
    out = {"config": a.config, "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else
           (platform.processor() or "cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "neural_rendering_resolution": g.neural_rendering_resolution,
           "samples_per_ray": g.rendering_kwargs["depth_resolution"] + g.rendering_kwargs["depth_resolution_importance"],
           "planes_shape": list(planes.shape), **res}
    if dev.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"PanoHead {a.config} on {out['device']} ({out['threads']} threads): one 512² render "
          f"{res['synthesis_512']['median_s']:.3f} s (tri-grid backbone {res['trigrid_backbone']['median_s']:.3f} s, "
          f"mapping {res['mapping']['median_s'] * 1e3:.2f} ms), median of {a.repeats}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


# -- pytest-benchmark (tiny settings) ----------------------------------------------------------
def test_panohead_tiny(benchmark, tmp_path):
    """This script at tiny settings in its own process (`pytest benchmarks --benchmark-json out.json`)."""
    from script_runner import run_script
    run_script(benchmark, "bench_panohead.py", ["--config", "tiny", "--repeats", "1"], tmp_path)


if __name__ == "__main__":
    raise SystemExit(main())

