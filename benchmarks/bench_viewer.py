"""Viewer render speed: frames per second the server can stream for the browser viewer.

The NeRF is the one ``dp360rt view --synthetic head`` shows: the synthetic head scene (32 views,
sphere32 orbit) fitted by :class:`dp360rt.viewer.NerfSessions` for ``--seconds``. For each frame
size it times, over an orbit of ``--frames`` cameras:

* ``render_ms``: rendering the published snapshot (what the WebSocket route runs per frame);
* ``encode_ms``: JPEG encoding (quality 85);
* ``ws_fps``: frames per second through the WebSocket route itself (Starlette's test client,
  one request per received frame, so no request is dropped): render + encode + transport.

    python benchmarks/bench_viewer.py [--seconds 20 | --steps N] [--sizes 256 512] [--frames 12] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from dp360rt.viewer import NerfSessions, encode_frame, parse_frame_request  # noqa: E402
from dp360rt.viewer.app import load_synthetic  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ws_fps(sessions: NerfSessions, gen_id: str, size: int, frames: int) -> float | None:
    """Frames per second through the WebSocket route (None without Starlette/httpx)."""
    try:
        from starlette.applications import Starlette
        from starlette.testclient import TestClient

        from dp360rt.viewer import viewer_routes
    except ImportError:
        return None
    with TestClient(Starlette(routes=viewer_routes(sessions, standalone=True))) as c, \
            c.websocket_connect(f"/v1/generations/{gen_id}/nerf") as ws:
        t = time.perf_counter()
        for k in range(frames):
            ws.send_text(json.dumps({"id": k, "azimuth": 360.0 * k / frames, "elevation": 10.0, "width": size}))
            meta = ws.receive_json()
            assert meta["type"] == "frame", meta
            ws.receive_bytes()
        return round(frames / (time.perf_counter() - t), 2)


def bench_size(sessions: NerfSessions, gen_id: str, size: int, frames: int) -> dict:
    sess = sessions.get(gen_id)
    reqs = [parse_frame_request(json.dumps({"azimuth": 360.0 * k / frames, "elevation": 10.0, "width": size}))
            for k in range(frames)]
    sess.render(reqs[0])                                     # warm-up (occupancy caches, kernels)
    render_s, encode_s = [], []
    for r in reqs:
        t = time.perf_counter()
        rgb = sess.render(r)
        _sync()
        render_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        encode_frame(rgb, "jpeg", 85)
        encode_s.append(time.perf_counter() - t)
    r_ms, e_ms = 1000 * float(np.median(render_s)), 1000 * float(np.median(encode_s))
    return {"size": size, "frames": frames, "render_ms": round(r_ms, 2), "encode_ms": round(e_ms, 2),
            "render_fps": round(1000.0 / r_ms, 2), "render_encode_fps": round(1000.0 / (r_ms + e_ms), 2),
            "ws_fps": ws_fps(sessions, gen_id, size, frames)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="NeRF fitting budget (default 20 s)")
    ap.add_argument("--steps", type=int, help="fit for this many steps instead (same field on any machine load)")
    ap.add_argument("--view-size", type=int, default=64, help="synthetic training view size (default 64)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    sessions = NerfSessions(seconds=None if a.steps else a.seconds, steps=a.steps)
    t = time.perf_counter()
    sess = load_synthetic(sessions, "head", size=a.view_size)
    sessions.wait(sess.id, timeout=3600)
    st = sess.status()
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2), "encoding": sess.snapshot.encoding,
           "fit": {"budget": {"seconds": None if a.steps else a.seconds, "steps": a.steps}, "seconds": st["seconds"], "wall_s": round(time.perf_counter() - t, 2), "steps": st["steps"],
                   "train_psnr": st["psnr"], "view_size": a.view_size},
           "sizes": {}}
    for size in a.sizes:
        out["sizes"][f"{size}x{size}"] = r = bench_size(sessions, sess.id, size, a.frames)
        print(f"{size}x{size}: render {r['render_ms']:.1f} ms ({r['render_fps']:.1f} fps), JPEG {r['encode_ms']:.1f} ms, "
              f"WebSocket {r['ws_fps']} fps", flush=True)
    sessions.close()
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


# -- pytest-benchmark (tiny settings) ----------------------------------------------------------
def test_viewer_tiny(benchmark, tmp_path):
    """This script at tiny settings in its own process (`pytest benchmarks --benchmark-json out.json`)."""
    from script_runner import run_script
    run_script(benchmark, "bench_viewer.py", ["--steps", "2", "--sizes", "64", "--frames", "2"], tmp_path)


if __name__ == "__main__":
    sys.exit(main())

