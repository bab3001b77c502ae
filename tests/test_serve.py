"""The HTTP service (dp360rt serve) against a real uvicorn server and a real HTTP client, tiny model."""
from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install '.[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
from PIL import Image  # noqa: E402

from dp360rt.engine.pipeline import Pipeline  # noqa: E402
from dp360rt.serve import GenerationListener  # noqa: E402
from dp360rt.serve.app import create_app  # noqa: E402
from dp360rt.serve.backend import LocalBackend  # noqa: E402
from dp360rt.serve.store import ResultStore  # noqa: E402
from serve_helpers import generate, metric, portrait_png, running, sse_events  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Recorder(GenerationListener):
    def __init__(self):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def on_start(self, gen_id, options):
        with self.lock:
            self.calls.append(("start", gen_id))
            self.options = options

    def on_view(self, gen_id, index, camera, image):
        with self.lock:
            self.calls.append(("view", gen_id, index, camera, image))

    def on_end(self, gen_id, status):
        with self.lock:
            self.calls.append(("end", gen_id, status))


@pytest.fixture(scope="module")
def backend():
    b = LocalBackend(Pipeline.random("tiny", seed=0))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    """The main server: token required, the store in a known folder, a recording listener."""
    rec = Recorder()
    store = ResultStore(tmp_path_factory.mktemp("store"))
    app = create_app(backend, store=store, max_queue=8, token=TOKEN, listeners=[rec], close_backend=False)
    with running(app) as base, httpx.Client(headers=AUTH, timeout=120) as client:
        yield base, client, rec, store


@pytest.fixture(scope="module")
def small_server(backend):
    """One generation at a time and a 16 KB upload cap (queue-full and too-large cases)."""
    app = create_app(backend, max_queue=1, max_upload_mb=16 / 1024, close_backend=False)
    with running(app) as base, httpx.Client(timeout=60) as client:
        yield base, client


def _runtime_idle(backend, timeout=15.0) -> bool:
    return backend.pipe.runtime(backend.policy).wait_idle(timeout)


def test_one_generation_streams_every_view(server):
    base, client, rec, store = server
    r, events = generate(client, base, steps=4, seed=1)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-replica"].startswith("local/")
    gen_id = r.headers["x-generation-id"]
    views = [d for e, d in events if e == "view"]
    assert events[-1][0] == "done" and events[0][0] == "progress"
    assert views[0]["index"] == -1                                  # the back view first
    assert sorted(v["index"] for v in views[1:]) == list(range(32))
    ts = [v["t"] for v in views]
    assert ts == sorted(ts) and ts[0] > 0
    done = events[-1][1]
    assert done["views"] == 32 and done["timings"]["total"] >= ts[-1]
    for v in views[:3] + views[-2:]:
        png = client.get(base + v["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    cams = json.loads((store.root / gen_id / "cameras.json").read_text())["views"]
    assert [c["file"] for c in cams] == [f"{i:03d}.png" for i in range(32)]
    assert all(len(c["camera"]) == 25 for c in cams)
    assert not list((store.root / gen_id).glob("*.tmp")) and not list((store.root / gen_id).glob(".*"))
    # the listener heard the same views, as uint8 [H, W, 3] equal to the stored PNGs
    mine = [c for c in rec.calls if c[1] == gen_id]
    assert mine[0] == ("start", gen_id) and mine[-1] == ("end", gen_id, "done")
    seen = [c for c in mine if c[0] == "view"]
    assert [c[2] for c in seen] == [v["index"] for v in views]
    img = seen[5][4]
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3) and len(seen[5][3]) == 25
    stored = np.asarray(Image.open(store.root / gen_id / f"{seen[5][2]:03d}.png"))
    assert np.array_equal(stored, img)
    text = client.get(base + "/metrics").text
    assert metric(text, 'dp360rt_generations_total{status="done"}') >= 1
    assert metric(text, "dp360rt_time_to_first_view_seconds_count") >= 1
    assert metric(text, "dp360rt_generation_seconds_count") >= 1


def test_four_concurrent_generations(server, backend):
    base, client, _, _ = server
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: generate(client, base, steps=2, seed=s), range(4)))
    ids = set()
    for r, events in results:
        assert r.status_code == 200 and events[-1][0] == "done", events[-1:]
        assert sorted(d["index"] for e, d in events if e == "view") == list(range(-1, 32))
        ids.add(r.headers["x-generation-id"])
    assert len(ids) == 4
    # same seed, same view whether batched with 3 other requests or alone (within one 8-bit level:
    # batch sizes may change float rounding, not the picture)
    r1, ev1 = results[0]
    r2, ev2 = generate(client, base, steps=2, seed=0)
    url1 = next(d["url"] for e, d in ev1 if e == "view" and d["index"] == 7)
    url2 = next(d["url"] for e, d in ev2 if e == "view" and d["index"] == 7)
    a, b = (np.asarray(Image.open(io.BytesIO(client.get(base + u).content)), dtype=int) for u in (url1, url2))
    assert np.abs(a - b).max() <= 1


def test_hang_up_cancels_the_work(server, backend):
    base, client, rec, store = server
    files = {"portrait": ("face.png", portrait_png(), "image/png")}
    with client.stream("POST", f"{base}/v1/generations", files=files, data={"steps": "50"}) as r:
        gen_id = r.headers["x-generation-id"]
        for event, _ in sse_events(r.iter_lines()):
            break                                                  # hang up after the first event
    deadline = time.monotonic() + 20
    while ("end", gen_id, "cancelled") not in rec.calls:
        assert time.monotonic() < deadline, "the hung-up generation was not cancelled"
        time.sleep(0.1)
    assert _runtime_idle(backend), "the step loop kept computing for a client that left"
    assert not (store.root / gen_id).exists()                        # complete or absent
    assert metric(client.get(base + "/metrics").text, "dp360rt_active_generations") == 0


def test_delete_cancels_and_queue_full_is_429(small_server, backend):
    base, client = small_server
    files = {"portrait": ("face.png", portrait_png(), "image/png")}
    with client.stream("POST", f"{base}/v1/generations", files=files, data={"steps": "50"}) as r:
        gen_id = r.headers["x-generation-id"]
        busy = client.post(f"{base}/v1/generations", files=files, data={"steps": "4"})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert "busy" in busy.json()["error"]["message"] and busy.json()["error"]["fix"]
        d = client.delete(f"{base}/v1/generations/{gen_id}")
        assert d.status_code == 202
        events = list(sse_events(r.iter_lines()))
    assert events[-1][0] == "cancelled"
    assert _runtime_idle(backend)
    assert client.delete(f"{base}/v1/generations/{gen_id}").status_code == 404


@pytest.mark.parametrize("case, status, words", [
    ("not_image", 400, "not an image"),
    ("empty", 400, "empty"),
    ("missing", 400, "missing field 'portrait'"),
    ("not_multipart", 400, "multipart/form-data"),
    ("steps_3", 400, "steps=3 is out of range"),
    ("steps_word", 400, "must be an integer"),
    ("seed_negative", 400, "out of range"),
    ("too_large", 413, "upload limit"),
])
def test_bad_input_is_a_clear_4xx(small_server, case, status, words):
    base, client = small_server
    png = ("face.png", portrait_png(), "image/png")
    kw = {
        "not_image": {"files": {"portrait": ("face.png", b"hello, not a picture", "image/png")}},
        "empty": {"files": {"portrait": ("face.png", b"", "image/png")}},
        "missing": {"files": {"other": png}},
        "not_multipart": {"json": {"portrait": "face.png"}},
        "steps_3": {"files": {"portrait": png}, "data": {"steps": "3"}},
        "steps_word": {"files": {"portrait": png}, "data": {"steps": "many"}},
        "seed_negative": {"files": {"portrait": png}, "data": {"seed": "-1"}},
        "too_large": {"files": {"portrait": ("big.png", portrait_png(size=256), "image/png")}},
    }[case]
    r = client.post(f"{base}/v1/generations", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["fix"]
    assert "Traceback" not in r.text


def test_steps_error_names_the_valid_counts(small_server):
    base, client = small_server
    r = client.post(f"{base}/v1/generations", files={"portrait": ("f.png", portrait_png(), "image/png")},
                    data={"steps": "3"})
    assert "[1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100]" in r.json()["error"]["fix"]


def test_token(server):
    base, client, _, _ = server
    with httpx.Client(timeout=30) as anon:
        for path in ("/metrics", "/v1/generations/abc/000.png"):
            r = anon.get(base + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "missing token" in r.json()["error"]["message"] and "Bearer" in r.json()["error"]["fix"]
        r = anon.get(base + "/metrics", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "wrong token" in r.json()["error"]["message"]
        r = anon.post(base + "/v1/generations", files={"portrait": ("f.png", portrait_png(), "image/png")})
        assert r.status_code == 401
        assert anon.get(base + f"/metrics?token={TOKEN}").status_code == 200
        assert anon.get(base + "/healthz").status_code == 200
        assert anon.get(base + "/readyz").json()["status"] == "ready"


def test_unknown_routes_and_views_are_json_404(server):
    base, client, _, _ = server
    r = client.get(base + "/v1/generations/nosuchid/000.png")
    assert r.status_code == 404 and "no view" in r.json()["error"]["message"]
    r = client.get(base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["fix"]
    assert client.get(base + "/v1/generations/..%2F..%2Fetc/passwd.png").status_code == 404


def test_store_is_atomic_capped_and_evicts_oldest(tmp_path):
    store = ResultStore(tmp_path, max_bytes=2500)
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    ids = []
    for _ in range(4):
        g = store.new()
        assert store.write_view(g, -1, img) == "back_view.png" and store.write_view(g, 0, img) == "000.png"
        store.finish(g, {-1: [0.0] * 25, 0: [1.0] * 25})
        ids.append(g)
    kept = [g for g in ids if (tmp_path / g).exists()]
    assert kept == ids[-len(kept):] and 1 <= len(kept) < 4           # the oldest went first
    assert json.loads((tmp_path / ids[-1] / "cameras.json").read_text())["views"] == [
        {"file": "000.png", "camera": [1.0] * 25}]
    half = store.new()
    store.write_view(half, 0, img)
    assert ResultStore(tmp_path).folder(half) is None                 # an unfinished folder does not survive a restart
    assert all(not p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_serve_cli_argument_errors(capsys):
    from dp360rt.cli.main import main
    assert main(["serve"]) == 2
    assert "pass both --nvs and --backview" in capsys.readouterr().err
    assert main(["serve", "--nvs", "a.th", "--backview", "b.th"]) == 2
    assert "--conditions DIR" in capsys.readouterr().err
    assert main(["serve", "--random", "tiny", "--max-queue", "0"]) == 2
    assert "--max-queue 0: must be 1 or more" in capsys.readouterr().err
    assert main(["serve", "--random", "tiny", "--splat-steps", "-1"]) == 2
    assert "--splat-steps -1: must be 0 or more" in capsys.readouterr().err
