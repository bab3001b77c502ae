"""Peak memory of the pipeline, default mode next to edge mode (``max_memory``), with bfloat16 weights.

    python benchmarks/bench_memory.py --config full --max-memory 8 --windows 1 --compute float32
    python -m pytest benchmarks/bench_memory.py --benchmark-only        # tiny config, pytest-benchmark

What a user does, at any config: random float32 checkpoints in the authors' layout are written
first (one model at a time, in their own process, the VAE and text tower identical in both files
as in the official pair; ``--checkpoints DIR`` keeps and reuses them), then each mode runs in a
fresh process, one after the other: ``Pipeline.from_checkpoints(..., dtype=torch.bfloat16,
compute_dtype=...)`` with or without the budget, then one generation at ``--steps`` DDIM steps over
24 conditions (the back-view step, then the 360° model's window steps, then the VAE decodes;
``--windows 1`` samples the first window only: the same peak in a third of the time).
``--compute float32`` keeps the bfloat16 weights and computes in float32 (CPUs without native
bfloat16, where torch's bfloat16 convolution is a reference loop hundreds of times slower).

Memory, from /proc/self/status: VmHWM (peak RSS) over the whole process and over the generation
alone (reset through /proc/self/clear_refs after loading), and the generation's peak RssAnon
(sampled every 20 ms): memory the process needs. The rest of RSS is RssFile, pages of memory-mapped
files (the checkpoints while they load, edge mode's reloaded weights), which the kernel can drop
and read again under memory pressure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("default", "edge")
SHARED_PREFIXES = ("first_stage_model.", "cond_stage_model.")   # identical in the official pair


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


class PeakSampler:
    """Samples RssAnon and RssFile every ``period`` seconds on a thread, keeping each one's peak
    (bytes), from construction to :meth:`stop` (which joins the thread); ``stages`` keeps the
    peak RssAnon per ``stage``, a name the caller sets."""

    def __init__(self, period: float = 0.02):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stage = "back-view encode"
        self.stages: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            for k in self.peak:
                v = _status_kib(k) * 1024
                self.peak[k] = max(self.peak[k], v)
                if k == "RssAnon":
                    self.stages[self.stage] = max(self.stages.get(self.stage, 0), v)
            self._stop.wait(period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def checkpoint_paths(directory: Path, config: str) -> dict[str, Path]:
    return {kind: directory / f"{kind}-{Path(config).stem}.pt" for kind in ("nvs", "backview")}


def make_checkpoints(directory: Path, config: str) -> None:
    """Random float32 checkpoints in the authors' layout, one model in memory at a time; the
    back-view file takes the 360° file's VAE and text tower, as the official pair holds them."""
    from dp360rt.model import build_model, init_random
    paths = checkpoint_paths(directory, config)
    torch.manual_seed(0)
    for kind in ("nvs", "backview"):
        model = build_model(kind, config)
        init_random(model)
        sd = model.state_dict()
        if kind == "backview":
            nvs = torch.load(paths["nvs"], map_location="cpu", weights_only=True, mmap=True)
            sd.update({k: v for k, v in nvs.items() if k.startswith(SHARED_PREFIXES)})
        tmp = paths[kind].with_suffix(".tmp")
        torch.save(sd, tmp)
        tmp.replace(paths[kind])
        del model, sd


def run_mode(mode: str, config: str, max_memory_gib: float, steps: int, checkpoints: Path,
             windows: int | None = None, compute: str = "bfloat16") -> dict:
    """Load and run one mode in this process; returns the figures."""
    from dp360rt.engine.pipeline import Pipeline
    paths = checkpoint_paths(checkpoints, config)
    tic = time.perf_counter()
    budget = int(max_memory_gib * 2**30) if mode == "edge" else None
    pipe = Pipeline.from_checkpoints(paths["nvs"], paths["backview"], config=config, dtype=torch.bfloat16,
                                     compute_dtype=getattr(torch, compute), max_memory=budget)
    build_s = time.perf_counter() - tic
    build_peak = _status_kib("VmHWM") * 1024
    reset = _reset_peak()
    s = pipe.image_size
    g = torch.Generator().manual_seed(0)
    portrait = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    conditions = torch.rand(24, 3, s, s, generator=g) * 2 - 1
    sampler = PeakSampler()
    engine = pipe._engine

    def staged_engine(model, ws, **kw):
        sampler.stage = f"{model.kind} steps"
        if windows and model.kind == "nvs":     # the first `windows` windows: the others repeat its step (and its peak)
            ws = ws[:windows]
        try:
            return engine(model, ws, **kw)
        finally:
            sampler.stage = "back-view decode, 360° encodes" if model.kind == "backview" else "view decodes"

    pipe._engine = staged_engine
    try:
        tic = time.perf_counter()
        res = pipe(portrait, conditions, steps=steps, seed=0)
        run_s = time.perf_counter() - tic
    finally:
        peaks = sampler.stop()
    out = {"mode": mode, "config": config, "compute": compute, "steps": steps, "windows": windows or 3,
           "max_memory_gib": max_memory_gib if budget else None,
           "plan": pipe.plan.describe(3, pipe.nvs.frames), "estimated_gib": pipe.plan.estimated_bytes / 2**30,
           "peak_rss_gib_generation": _status_kib("VmHWM") * 1024 / 2**30 if reset else None,
           "peak_anon_gib_generation": peaks["RssAnon"] / 2**30, "peak_file_gib_generation": peaks["RssFile"] / 2**30,
           "peak_anon_gib_per_stage": {k: v / 2**30 for k, v in sampler.stages.items()},
           "peak_rss_gib_process": max(build_peak, _status_kib("VmHWM") * 1024) / 2**30,
           "build_s": build_s, "run_s": run_s, "timings": res.timings,
           "reloads": pipe.swap.reloads if pipe.swap else 0, "finite": bool(torch.isfinite(res.views).all())}
    pipe.close()
    return out


def _child(args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def measure(mode: str, config: str, max_memory_gib: float, steps: int, checkpoints: Path,
            windows: int | None = None, compute: str = "bfloat16") -> dict:
    """One mode in a fresh subprocess (so its peak RSS is its own); writes the checkpoints first
    (in another process) when ``checkpoints`` lacks them."""
    if not all(p.is_file() for p in checkpoint_paths(checkpoints, config).values()):
        _child(["--make-checkpoints", str(checkpoints), "--config", config])
    out = _child(["--child", mode, "--config", config, "--max-memory", str(max_memory_gib), "--steps", str(steps),
                  "--compute", compute, "--checkpoints", str(checkpoints)] + (["--windows", str(windows)] if windows else []))
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--max-memory", type=float, default=8.0, help="edge mode's budget in GiB")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--windows", type=int, help="sample only this many of the 3 windows (default: all)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--compute", choices=("bfloat16", "float32"), default="bfloat16",
                    help="arithmetic dtype; float32 keeps the bfloat16 weights (for CPUs without native bfloat16)")
    ap.add_argument("--checkpoints", help="folder for the random checkpoints, kept for the next run "
                                          "(default: a temporary folder, removed)")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoints", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if a.make_checkpoints:
        make_checkpoints(Path(a.make_checkpoints), a.config)
        return
    if a.child:
        print(json.dumps(run_mode(a.child, a.config, a.max_memory, a.steps, Path(a.checkpoints), a.windows, a.compute)))
        return
    with tempfile.TemporaryDirectory(prefix="dp360rt-bench-memory-") as tmp:
        checkpoints = Path(a.checkpoints or tmp)
        checkpoints.mkdir(parents=True, exist_ok=True)
        rows = []
        for mode in a.modes:
            r = measure(mode, a.config, a.max_memory, a.steps, checkpoints, a.windows, a.compute)
            rows.append(r)
            print(f"{mode:8s} (bfloat16 weights, {a.compute} arithmetic) generation: peak RSS "
                  f"{r['peak_rss_gib_generation']:.2f} GiB, of it anonymous {r['peak_anon_gib_generation']:.2f} GiB "
                  f"(file-backed peak {r['peak_file_gib_generation']:.2f} GiB); process peak RSS "
                  f"{r['peak_rss_gib_process']:.2f} GiB; planner estimate {r['estimated_gib']:.2f} GiB; "
                  f"load {r['build_s']:.0f} s, run {r['run_s']:.0f} s, reloads {r['reloads']}\n"
                  f"         peak anonymous memory per stage (GiB): "
                  f"{', '.join(f'{k} {v:.2f}' for k, v in r['peak_anon_gib_per_stage'].items())}\n"
                  f"         plan: {r['plan']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


# -- pytest-benchmark (tiny config) ------------------------------------------------------------
def test_memory_tiny(benchmark, tmp_path):
    """Both modes at the tiny config under a budget that forces edge mode; edge mode must not
    need more memory for the generation than the default mode."""
    from dp360rt.config import load_config
    from dp360rt.model import build_model
    from dp360rt.sampler.plan import activation_bytes, weight_bytes
    cfgs = load_config("tiny")
    nvs, bv, lat = cfgs["nvs"], cfgs["backview"], cfgs["nvs"].latent_size
    shared = sum(p.numel() for k, p in build_model("backview", bv, device="meta").named_parameters()
                 if k.startswith(SHARED_PREFIXES)) * 2
    both_min = (weight_bytes(nvs, 2) + weight_bytes(bv, 2) - shared
                + activation_bytes(nvs, 2, lat, lat, 4, fused_attention=True)
                + activation_bytes(nvs, 8, lat, lat, 4, fused_attention=True))
    budget_gib = (both_min - 1) / 2**30       # the smallest batch with both models resident does not fit
    rows = benchmark.pedantic(lambda: [measure(m, "tiny", budget_gib, 1, tmp_path, compute="float32") for m in MODES],
                              rounds=1, iterations=1)
    default, edge_r = rows
    assert "one diffusion model resident" in edge_r["plan"] and edge_r["reloads"] >= 1
    assert default["finite"] and edge_r["finite"]
    benchmark.extra_info.update({r["mode"]: r["peak_rss_gib_generation"] for r in rows})


if __name__ == "__main__":
    main()
