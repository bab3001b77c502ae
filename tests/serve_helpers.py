"""Helpers of the service tests: a real uvicorn server in a thread, SSE parsing, a portrait."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
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
