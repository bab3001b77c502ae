"""The one-command GPU suite runs on CPU in --dry-run mode, so it cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads((tmp_path / "gpu_suite_dry_run.json").read_text())
    assert out["errors"] == {}
    assert out["engine_step"]["fast"]["tflop"] < out["engine_step"]["reference"]["tflop"]
    assert out["engine_run"]["max_abs_diff_views_fast_vs_reference"] < 1e-4
    assert out["engine_run"]["fast"]["unet_calls"] < out["engine_run"]["reference"]["unet_calls"]
    # the NeRF stage runs its CPU path in a dry run (fit, render, hash encoding)
    nerf = out["nerf"]["results"]["cpu"]
    assert nerf["fit"]["steps"] > 0 and nerf["render"]["64x64"]["rays_per_s"] > 0
    # the viewer stage: a fitted snapshot served over the WebSocket route
    viewer = out["viewer"]["results"]["sizes"]["32x32"]
    assert viewer["ws_fps"] > 0 and viewer["render_ms"] > 0
    # the inversion stage: per-step W projection / PTI time and the feature renders (tiny, CPU)
    inv = out["invert"]["results"]
    assert inv["w_step_s"] > 0 and inv["pti_step_s"] >= 0 and inv["renders_batched_s"] > 0
    assert inv["w_stats_cached_s"] < inv["w_stats_first_s"]         # computed once per generator
