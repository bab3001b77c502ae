"""Load on the HTTP service: N concurrent clients send a fixed count of requests to a local
``dp360rt serve --random CONFIG`` and read every stream to its end.

    python benchmarks/bench_serve.py [--modes local ray] [--clients 4] [--requests 8] [--steps 4]
                                     [--replicas 2] [--config tiny] [--json out.json]
    python benchmarks/bench_serve.py --soak [--requests 200] [--modes local]

Each mode starts its own server as a subprocess (``local``: one process, one pipeline;
``ray``: ``--ray --replicas R``, a local Ray cluster), waits for ``/readyz``, warms it up with
one request per replica, then measures per request the time to the first view (the back view)
and to ``done`` as the client sees them, and the throughput (requests / wall time of the load).
After the load it measures the idle server: the cores its process tree (and, with Ray, each
generation replica) keeps busy over 10 s with nothing generating or fitting (goal <= 0.05).

``--soak``: one client sends ``--requests`` requests (default 200) and hangs up on every fifth
after its first view; the server's RSS and open file descriptors are sampled every 10 requests;
reports start/end RSS and fds and p50/p99 latency of the completed requests (goal: RSS growth
<= 5 %, fds flat).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proc_stats import cores_used, find_processes, open_fds, rss_bytes  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portrait(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def one_request(client: httpx.Client, base: str, steps: int, seed: int, hang_up: bool = False) -> dict:
    """One generation read to its end (``hang_up``: closed after the first view)."""
    t0 = time.perf_counter()
    first = None
    views = 0
    with client.stream("POST", f"{base}/v1/generations", files={"portrait": ("p.png", _portrait(seed), "image/png")},
                       data={"steps": str(steps), "seed": str(seed)}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                if event == "view":
                    views += 1
                    first = first or time.perf_counter() - t0
                    if hang_up:
                        break
                elif event in ("error", "cancelled"):
                    raise RuntimeError(f"generation ended with {event}")
        replica = r.headers.get("x-replica")
    return {"ttfv": first, "total": time.perf_counter() - t0, "views": views, "replica": replica}


def load(base: str, clients: int, requests: int, steps: int) -> dict:
    counter = itertools.count()
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(timeout=600) as c:
            while (i := next(counter)) < requests:
                res = one_request(c, base, steps, 100 + i)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert len(results) == requests and all(r["views"] == 33 for r in results), "a request did not finish"

    def pct(key: str, q: float) -> float:
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {"requests": requests, "clients": clients, "steps": steps, "wall_s": wall,
            "throughput_rpm": 60 * requests / wall,
            "ttfv_p50": pct("ttfv", 0.5), "ttfv_p90": pct("ttfv", 0.9), "ttfv_max": pct("ttfv", 1.0),
            "total_p50": pct("total", 0.5), "total_p90": pct("total", 0.9), "total_max": pct("total", 1.0),
            "total_mean": statistics.mean(r["total"] for r in results),
            "replicas_used": len({r["replica"] for r in results})}


def idle_cores(proc: subprocess.Popen, base: str, mode: str, seconds: float = 10.0) -> dict:
    """Cores the idle server keeps busy: its whole process tree, and each Ray generation replica."""
    deadline = time.monotonic() + 60
    while httpx.get(base + "/readyz", timeout=5).json().get("active", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)            # the last stream's bookkeeping
    out: dict = {"idle_tree_cores": cores_used(proc.pid, seconds)}
    if mode == "ray":
        out["idle_replica_cores"] = [round(cores_used(p, seconds), 4) for p in find_processes("GenerationReplica")
                                     if p != proc.pid]
    return out


def soak(base: str, pid: int, requests: int, steps: int) -> dict:
    """``requests`` requests in a row, every fifth hung up after its first view; RSS and fds sampled."""
    samples = []
    latencies = []
    with httpx.Client(timeout=600) as c:
        for i in range(requests):
            if i % 10 == 0:
                samples.append({"request": i, "rss_mib": rss_bytes(pid) / 2**20, "fds": open_fds(pid)})
            r = one_request(c, base, steps, 1000 + i, hang_up=i % 5 == 4)
            if i % 5 != 4:
                latencies.append(r["total"])
    time.sleep(2.0)
    samples.append({"request": requests, "rss_mib": rss_bytes(pid) / 2**20, "fds": open_fds(pid)})
    xs = sorted(latencies)
    return {"requests": requests, "hung_up": requests // 5, "steps": steps,
            "p50_s": xs[len(xs) // 2], "p99_s": xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1) + 0.5))],
            # start: after the first 10 requests (the pools and caches are warm then)
            "rss_start_mib": samples[1]["rss_mib"] if len(samples) > 2 else samples[0]["rss_mib"],
            "rss_end_mib": samples[-1]["rss_mib"], "fds_start": samples[1]["fds"] if len(samples) > 2 else samples[0]["fds"],
            "fds_end": samples[-1]["fds"], "samples": samples}


def run_mode(mode: str, a: argparse.Namespace) -> dict:
    port = _port()
    cmd = [sys.executable, "-m", "dp360rt", "serve", "--random", a.config, "--port", str(port),
           "--max-queue", "64"]
    if mode == "ray":
        cmd += ["--ray", "--replicas", str(a.replicas)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"bench_serve_{mode}.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {mode} server exited (see bench_serve_{mode}.log)")
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        warm = a.replicas if mode == "ray" else 1
        load(base, warm, warm, a.steps)                                  # warm-up, not counted
        name = mode if mode == "local" else f"ray, {a.replicas} replicas"
        if a.soak:
            res = soak(base, proc.pid, a.requests, a.steps)
            res.update(mode=name, startup_s=ready)
            return res
        res = load(base, a.clients, a.requests, a.steps)
        res.update(mode=name, startup_s=ready, **idle_cores(proc, base, mode))
        return res
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--config", default="tiny")
    p.add_argument("--soak", action="store_true", help="the soak run (see the module doc); --requests default 200")
    p.add_argument("--json")
    a = p.parse_args()
    if a.soak:
        a.requests = a.requests if "--requests" in sys.argv else 200
        a.modes = a.modes if "--modes" in sys.argv else ["local"]
        rows = [run_mode(m, a) for m in a.modes]
        for r in rows:
            growth = r["rss_end_mib"] / r["rss_start_mib"] - 1
            print(f"soak, {r['mode']}: {r['requests']} requests ({r['hung_up']} hung up), steps={r['steps']}: "
                  f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s; RSS {r['rss_start_mib']:.0f} -> "
                  f"{r['rss_end_mib']:.0f} MiB ({100 * growth:+.1f} %), fds {r['fds_start']} -> {r['fds_end']}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = [run_mode(m, a) for m in a.modes]
    print(f"{a.requests} requests, {a.clients} concurrent clients, steps={a.steps}, config {a.config}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':<18} {'startup':>8} {'ttfv p50':>9} {'p90':>7} {'total p50':>10} {'p90':>7} {'max':>7} "
          f"{'req/min':>8} {'replicas':>8}")
    for r in rows:
        print(f"{r['mode']:<18} {r['startup_s']:>7.1f}s {r['ttfv_p50']:>8.2f}s {r['ttfv_p90']:>6.2f}s "
              f"{r['total_p50']:>9.2f}s {r['total_p90']:>6.2f}s {r['total_max']:>6.2f}s {r['throughput_rpm']:>8.1f} "
              f"{r['replicas_used']:>8}")
    for r in rows:
        per = f", each generation replica {r['idle_replica_cores']}" if "idle_replica_cores" in r else ""
        print(f"idle, {r['mode']}: {r['idle_tree_cores']:.3f} cores over 10 s (process tree{per})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


# -- pytest-benchmark (tiny settings) ----------------------------------------------------------
def test_serve_tiny(benchmark, tmp_path):
    """This script at tiny settings in its own process (`pytest benchmarks --benchmark-json out.json`)."""
    from script_runner import run_script
    run_script(benchmark, "bench_serve.py", ["--modes", "local", "--requests", "2", "--clients", "2", "--steps", "1"], tmp_path)


def test_serve_soak_tiny(benchmark, tmp_path):
    """The soak at tiny settings (10 requests, two hung up)."""
    from script_runner import run_script
    run_script(benchmark, "bench_serve.py", ["--soak", "--requests", "10", "--steps", "1"], tmp_path)


if __name__ == "__main__":
    main()

