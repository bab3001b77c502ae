"""Options that trade accuracy for speed, each against the exact path, in one run.

    python benchmarks/bench_approx.py --config tiny medium [--json out.json]
    python -m pytest benchmarks/bench_approx.py --benchmark-json out.json       # tiny, one option

The exact path is the authors' setting (50 DDIM steps, eta 0.5) through the fast engine, which
equals the reference loop to fp32 tolerance (tests/test_fast_engine.py). Each option generates the
same portrait from the same seed; the table gives its UNet calls, its wall time as a fraction of the
exact run's, and the PSNR of its decoded 32 views against the exact views. None of these is a
default: ``Pipeline.__call__(steps=..., eta=...)`` selects them.

Random weights: the views are noise-like, so the PSNR measures how far an option moves the sampler,
not picture quality; with the official weights the same command (``--nvs/--backview``) measures that.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from dp360rt import Pipeline
from dp360rt.io.images import synthetic_conditions, synthetic_portrait

EXACT = {"steps": 50, "eta": 0.5}
OPTIONS = {                      # name -> sampler settings that differ from the authors'
    "25 steps": {"steps": 25, "eta": 0.5},
    "10 steps": {"steps": 10, "eta": 0.5},
    "50 steps, eta 0 (deterministic DDIM)": {"steps": 50, "eta": 0.0},
    "20 steps, eta 0": {"steps": 20, "eta": 0.0},
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when equal)."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def run(config: str, options: dict[str, dict], seed: int = 0) -> list[dict]:
    pipe = Pipeline.random(config, seed=0)
    s = pipe.image_size
    por, cond = synthetic_portrait(s), synthetic_conditions(32, s)
    rows = []
    t = time.perf_counter()
    exact = pipe(por, cond, seed=seed, **EXACT)
    t_exact = time.perf_counter() - t
    rows.append({"config": config, "option": "exact (50 steps, eta 0.5)", "unet_calls": exact.unet_calls,
                 "time_ratio": 1.0, "psnr_views_db": float("inf"), "psnr_back_view_db": float("inf")})
    for name, kw in options.items():
        t = time.perf_counter()
        res = pipe(por, cond, seed=seed, **kw)
        rows.append({"config": config, "option": name, "unet_calls": res.unet_calls,
                     "time_ratio": round((time.perf_counter() - t) / t_exact, 3),
                     "psnr_views_db": round(psnr(res.views, exact.views), 2),
                     "psnr_back_view_db": round(psnr(res.back_view, exact.back_view), 2)})
        print(f"{config:<7} {name:<40} calls {res.unet_calls:4d}  time x{rows[-1]['time_ratio']:.2f}  "
              f"PSNR views {rows[-1]['psnr_views_db']:6.2f} dB  back view {rows[-1]['psnr_back_view_db']:6.2f} dB",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["tiny"])
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), help="default: all")
    p.add_argument("--json")
    a = p.parse_args(argv)
    opts = {k: OPTIONS[k] for k in (a.options or OPTIONS)}
    rows = [r for c in a.config for r in run(c, opts)]
    out = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "torch": torch.__version__,
           "python": platform.python_version(), "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


# -- pytest-benchmark (pytest benchmarks --benchmark-json out.json): one option at tiny size ---------
def test_approx_tiny(benchmark):
    rows = benchmark.pedantic(run, args=("tiny", {"10 steps": OPTIONS["10 steps"]}), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [{k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in rows]
    assert rows


if __name__ == "__main__":
    sys.exit(main())
