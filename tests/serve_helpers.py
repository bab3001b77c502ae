"""Helpers of the service tests: a real uvicorn server in a thread, SSE parsing, a portrait."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(15)


def portrait_png(size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs from a text/event-stream's lines."""
    event, data = None, []
    for line in lines:
        if line == "":
            if event is not None:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def generate(client: Any, base: str, steps: int = 4, seed: int = 0, **kw: Any) -> tuple[Any, list[tuple[str, dict]]]:
    """POST one generation and read its whole stream -> (response, events)."""
    files = {"portrait": ("face.png", portrait_png(seed=seed), "image/png")}
    with client.stream("POST", f"{base}/v1/generations", files=files, data={"steps": str(steps), "seed": str(seed)},
                       **kw) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, list(sse_events(r.iter_lines()))


def metric(text: str, name: str) -> float:
    """One sample's value from Prometheus text (``name`` with its labels, as written)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


# -- a server in its own process (what CPU, memory and kill -9 are measured on) ------------------------
from benchmarks.proc_stats import cores_used, cpu_seconds, open_fds, process_tree, rss_bytes  # noqa: E402,F401


class ServerProcess:
    """``python -m dp360rt VERB ARGS --port P`` (``serve`` or ``view``) in its own process (one
    compute thread); waits until ``ready_path`` answers 200. ``base``: its URL; ``pid``; ``log``:
    its output so far."""

    def __init__(self, args: list[str], log_path: Path, ready_timeout: float = 240.0, verb: str = "serve",
                 ready_path: str = "/readyz"):
        import subprocess
        import sys
        import httpx
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dp360rt", verb, *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=self._log, env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        while True:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log}"
            assert time.monotonic() < deadline, f"the server was not ready after {ready_timeout:.0f} s:\n{self.log}"
            try:
                if httpx.get(self.base + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        import signal
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
