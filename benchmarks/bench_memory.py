"""Peak memory of the pipeline, default mode next to edge mode (``max_memory``), in bfloat16 on CPU.

    python benchmarks/bench_memory.py --config full --max-memory 8      # each mode in its own process
    python -m pytest benchmarks/bench_memory.py --benchmark-only        # tiny config, pytest-benchmark

Each mode runs in a fresh subprocess, one after the other (never two at once): random weights
stored as ``Pipeline(dtype=torch.bfloat16)`` stores them (convolution and linear weights bfloat16,
norms and embeddings float32), a pipeline with or without the
budget, then one generation at ``--steps`` DDIM steps over 24 conditions (the back-view step, then
three window steps of the 360° model one window at a time, then the VAE decodes; ``--windows 1``
samples the first window only, the same peak in a third of the time) under the pipeline's CPU autocast. Peak RSS is read from /proc/self/status (VmHWM): once over the whole process and once
over the generation alone (VmHWM reset through /proc/self/clear_refs after the models are built).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("default", "edge")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_bf16(kind: str, config: str):
    """A random-weight model stored as ``Pipeline(dtype=torch.bfloat16)`` stores it (convolution
    and linear weights bfloat16, everything else float32; see ``model.store_half_weights``), built
    directly in bfloat16 so no float32 copy of the big weights ever exists."""
    from dp360rt.model import LOW_PRECISION_MODULES, build_model
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = build_model(kind, config)
    finally:
        torch.set_default_dtype(old)
    for mod in m.modules():
        if not isinstance(mod, LOW_PRECISION_MODULES):
            for p in mod._parameters.values():
                if p is not None:
                    p.data = p.data.float()
    return m


def compute_in_float32() -> None:
    """Keep the bfloat16 weights but do the arithmetic in float32, in this process: every convolution
    and linear layer casts its weight to its input's dtype at the call, and the pipeline's autocast
    is off. For CPUs without native bfloat16 (AVX2 only), where torch's bfloat16 convolution is a
    reference loop about 250x slower than float32 (one 128-channel 3x3 convolution at 128x128:
    0.1 vs 33.6 GFLOP/s on this machine's AMD EPYC). The activations are then float32, twice the
    bfloat16 ones, so the peak is an upper bound on the bfloat16 run's."""
    import contextlib

    import torch.nn.functional as F
    from torch import nn

    import dp360rt.pipeline as pipeline_module
    pipeline_module.autocast = lambda device, dtype: contextlib.nullcontext()
    conv_forward = nn.Conv2d._conv_forward
    nn.Conv2d._conv_forward = lambda self, x, w, b: conv_forward(self, x, w.to(x.dtype),
                                                                   None if b is None else b.to(x.dtype))
    nn.Linear.forward = lambda self, x: F.linear(x, self.weight.to(x.dtype),
                                                 None if self.bias is None else self.bias.to(x.dtype))


def run_mode(mode: str, config: str, max_memory_gib: float, steps: int, windows: int | None = None,
             offload_dir: str | None = None, compute: str = "bfloat16") -> dict:
    """Build and run one mode in this process; returns the figures."""
    from dp360rt.pipeline import Pipeline
    if compute == "float32":
        compute_in_float32()
    torch.manual_seed(0)
    tic = time.perf_counter()
    nvs, bv = build_bf16("nvs", config), build_bf16("backview", config)
    budget = int(max_memory_gib * 2**30) if mode == "edge" else None
    pipe = Pipeline(nvs, bv, dtype=torch.bfloat16, max_memory=budget, offload_dir=offload_dir)
    del nvs, bv
    build_s = time.perf_counter() - tic
    build_peak = _status_kib("VmHWM") * 1024
    reset = _reset_peak()
    s = pipe.image_size
    g = torch.Generator().manual_seed(0)
    portrait = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    conditions = torch.rand(24, 3, s, s, generator=g) * 2 - 1
    if windows:     # sample only the first `windows` windows: the others repeat its step (and its peak)
        engine = pipe._engine
        pipe._engine = lambda model, ws, **kw: engine(model, ws[:windows] if model.kind == "nvs" else ws, **kw)
    tic = time.perf_counter()
    res = pipe(portrait, conditions, steps=steps, seed=0)          # the pipeline's autocast (off with --compute float32)
    run_s = time.perf_counter() - tic
    out = {"mode": mode, "config": config, "compute": compute, "steps": steps, "windows": windows or 3, "max_memory_gib": max_memory_gib if budget else None,
           "plan": pipe.plan.describe(3, pipe.nvs.frames), "estimated_gib": pipe.plan.estimated_bytes / 2**30,
           "peak_rss_gib_generation": _status_kib("VmHWM") * 1024 / 2**30 if reset else None,
           "peak_rss_gib_process": max(build_peak, _status_kib("VmHWM") * 1024) / 2**30,
           "build_s": build_s, "run_s": run_s, "timings": res.timings,
           "reloads": pipe.swap.reloads if pipe.swap else 0, "finite": bool(torch.isfinite(res.views).all())}
    pipe.close()
    return out


def measure(mode: str, config: str, max_memory_gib: float, steps: int, windows: int | None = None,
            compute: str = "bfloat16") -> dict:
    """One mode in a fresh subprocess (so its peak RSS is its own)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--child", mode, "--config", config, "--max-memory", str(max_memory_gib),
           "--steps", str(steps), "--compute", compute] + (["--windows", str(windows)] if windows else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--max-memory", type=float, default=8.0, help="edge mode's budget in GiB")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--windows", type=int, help="sample only this many of the 3 windows (default: all)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--compute", choices=("bfloat16", "float32"), default="bfloat16",
                    help="arithmetic dtype; float32 keeps the bfloat16 weights (for CPUs without native bfloat16)")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if a.child:
        print(json.dumps(run_mode(a.child, a.config, a.max_memory, a.steps, a.windows, compute=a.compute)))
        return
    rows = []
    for mode in a.modes:
        r = measure(mode, a.config, a.max_memory, a.steps, a.windows, a.compute)
        rows.append(r)
        print(f"{mode:8s} ({a.compute} arithmetic) peak RSS {r['peak_rss_gib_generation']:.2f} GiB (generation), "
              f"{r['peak_rss_gib_process']:.2f} GiB (process); planner estimate {r['estimated_gib']:.2f} GiB; "
              f"build {r['build_s']:.0f} s, run {r['run_s']:.0f} s, reloads {r['reloads']}\n         plan: {r['plan']}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


# -- pytest-benchmark (tiny config) ------------------------------------------------------------
def test_memory_tiny(benchmark):
    """Both modes at the tiny config under a budget that forces edge mode; edge mode must not
    need more memory for the generation than the default mode."""
    from dp360rt.config import load_config
    from dp360rt.sampler.plan import activation_bytes, weight_bytes
    cfgs = load_config("tiny")
    nvs, bv, lat = cfgs["nvs"], cfgs["backview"], cfgs["nvs"].latent_size
    both_min = (weight_bytes(nvs, 2) + weight_bytes(bv, 2)
                + activation_bytes(nvs, 2, lat, lat, 2, fused_attention=True)
                + activation_bytes(nvs, 8, lat, lat, 2, fused_attention=True))
    budget_gib = (both_min - 1) / 2**30       # the smallest batch with both models resident does not fit
    rows = benchmark.pedantic(lambda: [measure(m, "tiny", budget_gib, 1) for m in MODES], rounds=1, iterations=1)
    default, edge_r = rows
    assert "one diffusion model resident" in edge_r["plan"] and edge_r["reloads"] >= 1
    benchmark.extra_info.update({r["mode"]: r["peak_rss_gib_generation"] for r in rows})


if __name__ == "__main__":
    main()
