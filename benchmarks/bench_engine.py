"""Reference vs fast engine, in one run: wall time, FLOPs, UNet-equivalents, peak memory.

    python benchmarks/bench_engine.py --config tiny medium [--json out.json]      # summary table
    python -m pytest benchmarks/bench_engine.py --benchmark-only                  # pytest-benchmark

One measurement = one denoising step of all four 8-frame windows of a 360° generation (random
weights; speed does not depend on weight values). Times are medians of ``--repeats`` after a
warm-up; on CPU compare the *ratio* within one run, not absolute times. On CUDA the step runs
under fp16 autocast, as the reference does, and peak ``torch.cuda`` memory is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from dp360rt import Pipeline
from dp360rt.io.images import synthetic_conditions, synthetic_portrait
from dp360rt.flops import unet_equivalent, step_flops
from dp360rt.sampler.windows import prepare_windows, sample_windows_reference
from dp360rt.sampler.fast import sample_windows_fast
from dp360rt.sampler.noise import GeneratorNoise
from dp360rt.sampler.plan import default_plan

ENGINES = {"reference": sample_windows_reference, "fast": sample_windows_fast}


def setup(config: str, device: str = "cpu", windows: int = 4):
    pipe = Pipeline.random(config, seed=0, device=device, engine="reference")
    m = pipe.nvs
    s = pipe.image_size
    cond = synthetic_conditions(8 * windows, s).to(device)
    noise = GeneratorNoise(0)
    ctx = pipe.text_context(m)
    lat = m.sample_latent(*m.encode_image(synthetic_portrait(s).to(device)), noise((1, 4, s // 8, s // 8), device))
    return pipe, m, cond, ctx, lat


def run_step(engine: str, m, cond, ctx, lat, steps: int = 1):
    wins = prepare_windows(m, cond, None, steps, GeneratorNoise(1))
    cuda = cond.device.type == "cuda"
    autocast = torch.autocast("cuda", torch.float16) if cuda else torch.autocast("cpu", enabled=False)
    kw = {"plan": default_plan(m.cfg, cond.device.type, 2 if cuda else 4)} if engine == "fast" else {}
    with torch.no_grad(), autocast:
        return ENGINES[engine](m, wins, context=ctx, ref_front=lat, ref_back=[lat], steps=steps, eta=0.5,
                               cfg_scale=3.0, **kw)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(engine: str, config: str, device: str, repeats: int) -> dict:
    """Time one engine in this process. Peak memory: CUDA peak allocated, or on CPU the growth of
    the process's peak RSS over the setup (run each engine in its own process for this)."""
    _, m, cond, ctx, lat = setup(config, device)
    cuda = cond.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss()
    run_step(engine, m, cond, ctx, lat)            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, calls = run_step(engine, m, cond, ctx, lat)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss() - base
    return {"seconds": statistics.median(times), "all_seconds": times, "unet_calls": calls, "peak_bytes": peak,
            "peak_kind": "cuda max_memory_allocated" if cuda else "CPU peak RSS growth over setup"}


def measure_isolated(engine: str, config: str, device: str, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", engine, "--config", config, "--device", device,
                          "--repeats", str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(config: str, repeats: int = 3, device: str = "cpu") -> dict:
    from dp360rt.config import get_model_config
    cfg = get_model_config("nvs", config)
    out = {"config": config, "device": device, "windows": 4}
    for engine in ("reference", "fast"):
        r = measure_isolated(engine, config, device, repeats)
        fl = step_flops(cfg, engine, 4)
        r["flops"] = fl["total"]
        r["flops_per_module"] = fl
        r["unet_equivalents_per_window"] = fl["total"] / 4 / unet_equivalent()
        out[engine] = r
    # same noises, same numbers: the fast step's error against the reference step, printed beside the speed-up
    _, m, cond, ctx, lat = setup(config, device)
    out["frames"] = m.frames
    za, _ = run_step("reference", m, cond, ctx, lat)
    zb, _ = run_step("fast", m, cond, ctx, lat)
    a, b = torch.cat(za).float(), torch.cat(zb).float()
    out["max_rel_error"] = ((a - b).abs().max() / a.abs().max()).item()
    out["wall_ratio"] = out["fast"]["seconds"] / out["reference"]["seconds"]
    out["flops_ratio"] = out["fast"]["flops"] / out["reference"]["flops"]
    return out


def print_row(r: dict) -> None:
    ref, fast = r["reference"], r["fast"]
    print(f"{r['config']:<8} {r['device']:<5} ref {ref['seconds']:8.3f} s  fast {fast['seconds']:8.3f} s  "
          f"wall ratio {r['wall_ratio']:.3f}  FLOP ratio {r['flops_ratio']:.3f}  "
          f"UNet-eq/window ref {ref['unet_equivalents_per_window']:.4f} fast {fast['unet_equivalents_per_window']:.4f}  "
          f"UNet calls {ref['unet_calls']} -> {fast['unet_calls']}  "
          f"peak MiB {ref['peak_bytes'] / 2**20:.0f} -> {fast['peak_bytes'] / 2**20:.0f}  max rel err {r['max_rel_error']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    ap.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(a.worker, a.config[0], a.device, a.repeats)))
        return
    results = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
               "threads": torch.get_num_threads(), "runs": []}
    for c in a.config:
        r = compare(c, a.repeats, a.device)
        print_row(r)
        results["runs"].append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


# -- pytest-benchmark ---------------------------------------------------------------------------
try:
    import pytest

    @pytest.mark.parametrize("engine", ["reference", "fast"])
    @pytest.mark.parametrize("config", ["tiny"])          # quick under pytest; the script runs medium too
    def test_step(benchmark, config, engine):
        _, m, cond, ctx, lat = setup(config)
        benchmark.extra_info["flops"] = step_flops(m.cfg, engine, 4)["total"]
        benchmark.pedantic(run_step, args=(engine, m, cond, ctx, lat), rounds=3, warmup_rounds=1)
except ImportError:  # running as a script without pytest
    pass


if __name__ == "__main__":
    main()
