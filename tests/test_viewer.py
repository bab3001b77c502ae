"""The viewer's server side: NeRF sessions fed like the service feeds them, lock-free renders while
training, the WebSocket's stale-request dropping, status, downloads and `dp360rt view` errors.
Tiny scenes (the synthetic head at 32x32, tens of training steps): seconds each."""
from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the viewer needs the serve extra: pip install '.[serve]'")

from starlette.applications import Starlette  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from dp360rt.nerf import Nerf, sphere32_cameras  # noqa: E402
from dp360rt.nerf.fit import Fitter  # noqa: E402
from dp360rt.nerf.synthetic import render_views  # noqa: E402
from dp360rt.viewer import FrameRequestError, NerfSessions, parse_frame_request, viewer_routes  # noqa: E402
from dp360rt.viewer.app import build_app, load_path, load_synthetic  # noqa: E402

SIZE = 32
STEPS = 40


@pytest.fixture(scope="module")
def head_views():
    images, cams = render_views("head", size=SIZE)
    return [(np.asarray(im.numpy() * 255 + 0.5, dtype=np.uint8)) for im in images], cams


@pytest.fixture(scope="module")
def ready_sessions(head_views):
    """A session fed through the listener interface and fitted to the end of its budget."""
    images, cams = head_views
    s = NerfSessions(steps=STEPS, chunk_seconds=0.2, export_options={"glb": {"texture_size": 64, "resolution": 32},
                                                                     "splat": {"steps": 5, "resolution": 24}})
    s.on_start("g1", {"nerf": "always"})
    s.on_view("g1", -1, cams[18].tolist(), images[18])          # the back view: shown, not fitted
    for i, (im, cam) in enumerate(zip(images, cams)):
        s.on_view("g1", i, cam.tolist(), im)
    s.on_end("g1", "done")
    s.wait("g1", timeout=300)
    yield s
    s.close()


def _client(sessions, standalone=True):
    return TestClient(Starlette(routes=viewer_routes(sessions, upload=not standalone, standalone=standalone)))


def test_listener_flow_fits_and_renders(ready_sessions):
    sess = ready_sessions.get("g1")
    st = sess.status()
    assert st["state"] == "ready" and st["generation"] == "done"
    assert st["views"] == 33 and st["steps"] == STEPS and st["renderable"]
    assert st["psnr"] is not None and st["psnr"] > 12.0          # well above a blank frame's ~8 dB on this scene
    azimuths = {v["index"]: v["azimuth"] for v in st["view_list"]}
    assert azimuths[0] == pytest.approx(0.0, abs=1e-6) and azimuths[8] == pytest.approx(90.0, abs=1e-6)
    assert azimuths[-1] == pytest.approx(202.5, abs=1e-6)
    a = sess.render(parse_frame_request('{"azimuth": 0, "width": 48, "height": 40}'))
    b = sess.render(parse_frame_request('{"azimuth": 90, "width": 48, "height": 40}'))
    assert a.shape == (40, 48, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2.0          # another side of the head


def test_failed_generation_is_a_failed_session(head_views):
    images, cams = head_views
    s = NerfSessions(steps=STEPS, mode="always")
    try:
        s.on_start("bad", {"nerf": "always"})
        s.on_end("bad", "cancelled")
        st = s.get("bad").status()
        assert st["state"] == "failed" and "cancelled" in st["error"] and not st["renderable"]
        with pytest.raises(LookupError, match="no fitted field yet.*Fix"):
            s.get("bad").render(parse_frame_request("{}"))
    finally:
        s.close()


def test_render_never_waits_for_a_training_step(head_views, monkeypatch):
    """Block the worker inside a training step: renders of the published snapshot must still finish."""
    images, cams = head_views
    s = NerfSessions(steps=10_000, chunk_seconds=0.05, mode="always")
    blocked, release = threading.Event(), threading.Event()
    real_step = Fitter.train_step

    def slow_step(self):
        if self.step >= 3:                       # after the first snapshots: hang mid-step
            blocked.set()
            release.wait(60)
        return real_step(self)

    monkeypatch.setattr(Fitter, "train_step", slow_step)
    try:
        for i, (im, cam) in enumerate(zip(images, cams)):
            s.on_view("g", i, cam.tolist(), im)
        assert blocked.wait(120), "training never reached step 3"
        sess = s.get("g")
        assert sess.snapshot is not None
        out = {}
        t = threading.Thread(target=lambda: out.update(img=sess.render(parse_frame_request('{"width": 32}'))))
        t.start()
        t.join(60)
        assert "img" in out, "a render waited for the training step"
        assert out["img"].shape == (32, 32, 3)
    finally:
        release.set()
        s.close()


def test_snapshot_is_independent_of_training(head_views):
    images, cams = head_views
    nerf = Nerf()
    f = nerf.fitter(steps=30, progress=False)
    for im, cam in zip(images, cams):
        f.add_view(im, cam)
    f.train(steps=10)
    snap = nerf.snapshot()
    before = snap.render(cams[3], 24, 24)["rgb"].clone()
    f.train(steps=20)                             # updates, re-indexes and resamples the live field
    assert torch.equal(snap.render(cams[3], 24, 24)["rgb"], before)
    assert not torch.equal(nerf.render(cams[3], 24, 24)["rgb"], before)


def test_frame_request_errors():
    with pytest.raises(FrameRequestError, match="JSON object.*Fix"):
        parse_frame_request("azimuth=3")
    with pytest.raises(FrameRequestError, match="'width' = 4096 is out of range. Fix: .*16 and 1024"):
        parse_frame_request('{"width": 4096}')
    with pytest.raises(FrameRequestError, match="'camera' must be 25 finite numbers.*Fix"):
        parse_frame_request('{"camera": [1, 2, 3]}')
    with pytest.raises(FrameRequestError, match="unknown frame format 'gif'. Fix"):
        parse_frame_request('{"format": "gif"}')
    with pytest.raises(FrameRequestError, match="'elevation' = 120 is out of range"):
        parse_frame_request('{"elevation": 120}')
    r = parse_frame_request('{"id": 3, "azimuth": -30, "width": 64}')
    assert (r.id, r.width, r.height, r.azimuth, r.fmt) == (3, 64, 64, 330.0, "jpeg")


def test_websocket_drops_stale_requests(ready_sessions):
    """Ten camera requests sent at once: the newest is always rendered, the replaced ones dropped."""
    with _client(ready_sessions) as c, c.websocket_connect("/v1/generations/g1/nerf") as ws:
        n = 10
        for i in range(1, n + 1):
            ws.send_text(json.dumps({"id": i, "azimuth": 10 * i, "width": 256, "format": "png"}))
        frames = []
        while True:
            meta = ws.receive_json()
            assert meta["type"] == "frame", meta
            data = ws.receive_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            frames.append(meta)
            if meta["id"] == n:
                break
        assert len(frames) < n                     # some requests were replaced before they rendered
        assert frames[-1]["dropped"] == n - len(frames)
        assert [f["id"] for f in frames] == sorted(f["id"] for f in frames)
        ws.send_text('{"width": 5}')
        err = ws.receive_json()
        assert err["type"] == "error" and "out of range" in err["message"] and "Fix" in err["message"]
        ws.send_bytes(b"\x00")
        err = ws.receive_json()
        assert err["type"] == "error" and "JSON text message" in err["message"]
        ws.send_text('{"id": "jpeg", "width": 32}')
        meta = ws.receive_json()
        assert meta["id"] == "jpeg" and ws.receive_bytes()[:2] == b"\xff\xd8"


def test_unknown_generation_and_routes(ready_sessions):
    with _client(ready_sessions) as c:
        r = c.get("/v1/generations/nope/nerf/status")
        assert r.status_code == 404 and "Fix" not in r.json()["error"]["message"] and r.json()["error"]["fix"]
        with c.websocket_connect("/v1/generations/nope/nerf") as ws:
            assert ws.receive_json()["type"] == "error"
        page = c.get("/")
        assert page.status_code == 200 and 'data-testid="nerf-view"' in page.text
        for asset in ("/static/viewer.js", "/static/viewer.css"):
            assert c.get(asset).status_code == 200
        assert "http" not in page.text.replace("http-equiv", "")      # no CDN, no external fonts
        png = c.get("/v1/generations/g1/005.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert c.get("/v1/generations/g1/099.png").status_code == 404


def test_downloads(ready_sessions, tmp_path):
    with _client(ready_sessions) as c:
        z = zipfile.ZipFile(io.BytesIO(c.get("/v1/generations/g1/views.zip").content))
        names = set(z.namelist())
        assert {"back_view.png", "000.png", "031.png", "cameras.json"} <= names and len(names) == 34
        assert len(json.loads(z.read("cameras.json"))["views"]) == 32
        z = zipfile.ZipFile(io.BytesIO(c.get("/v1/generations/g1/nerf.zip").content))
        z.extractall(tmp_path)
        nerf = Nerf.load(tmp_path / "nerf")
        cam = sphere32_cameras()[2]
        want = ready_sessions.get("g1").snapshot.render(cam, 24, 24)["rgb"]
        assert torch.allclose(nerf.render(cam, 24, 24)["rgb"], want, atol=1e-6)
        ply = c.get("/v1/generations/g1/mesh.ply")
        assert ply.status_code == 200 and ply.content.startswith(b"ply\n")
        mp4 = c.get("/v1/generations/g1/orbit.mp4")
        assert mp4.status_code == 200 and mp4.content[4:8] == b"ftyp"
        glb = c.get("/v1/generations/g1/head.glb")
        assert glb.status_code == 200 and glb.content[:4] == b"glTF" and glb.headers["content-type"] == "model/gltf-binary"
        splat = c.get("/v1/generations/g1/head.ply")
        assert splat.status_code == 200 and splat.content.startswith(b"ply\n")
        from dp360rt.nerf.splat import read_splat_ply
        (tmp_path / "head.ply").write_bytes(splat.content)
        assert read_splat_ply(tmp_path / "head.ply")["count"] > 0
        assert c.get("/v1/generations/g1/head.ply").content == splat.content          # cached per snapshot


def test_download_before_fit_starts_it_or_names_nerf_none(head_views):
    """A field download before the fit: 202 + Retry-After, and an on_view generation starts fitting
    (nobody asked before: idle); a nerf=none generation is a 409 naming the mode."""
    images, cams = head_views
    s = NerfSessions(steps=10)
    try:
        s.on_start("early", {"nerf": "always"})
        s.on_start("lazy", {"nerf": "on_view"})
        s.on_start("never", {"nerf": "none"})
        for gen in ("lazy", "never"):
            for i in range(3):
                s.on_view(gen, i, cams[i].tolist(), images[i])
            s.on_end(gen, "done")
        with _client(s) as c:
            r = c.get("/v1/generations/early/nerf.zip")
            assert r.status_code == 202 and "being fitted" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/v1/generations/lazy/nerf/status").json()["state"] == "idle"
            time.sleep(0.3)
            assert s.get("lazy").status()["state"] == "idle"             # nobody asked: no fit
            assert c.get("/v1/generations/lazy/mesh.ply").status_code == 202
            assert s.get("lazy").status()["fit"]["started"]
            s.wait("lazy", timeout=120)
            st = c.get("/v1/generations/lazy/nerf/status").json()
            assert st["state"] == "ready" and st["fit"]["wall_seconds"] > 0 and st["fit"]["train_seconds"] > 0
            assert c.get("/v1/generations/lazy/mesh.ply").status_code == 200
            r = c.get("/v1/generations/never/nerf.zip")
            assert r.status_code == 409 and "nerf=none" in r.json()["error"]["message"]
            assert c.post("/v1/generations/never/nerf/fit").status_code == 409
            assert s.get("never").status()["state"] == "off"
            assert c.get("/v1/generations/never/views.zip").status_code == 200     # the views are there
            assert c.get("/v1/viewer/config").json() == {"upload": False, "generations": []}
    finally:
        s.close()


def test_view_preloads_result_folders(head_views, tmp_path, ready_sessions):
    """`dp360rt view` on a demo-style folder (views + nerf/) is ready at once; on views alone it fits."""
    from dp360rt.nerf import write_views
    images, cams = head_views
    d = write_views(tmp_path / "res", [torch.from_numpy(im).float() / 255 for im in images], cams)
    ready_sessions.get("g1").snapshot.save(d / "nerf")
    s = NerfSessions(steps=5)
    try:
        a = load_path(s, d)
        assert a.state == "ready" and len(a.views) == 32
        b = load_path(s, d / "nerf", gen_id="nerf-only")
        assert b.state == "ready" and len(b.views) == 32          # the parent's views are shown
        syn = load_synthetic(s, "head", size=16)
        assert "Synthetic scene 'head'" in syn.label and syn.id == "synthetic-head"
        assert s.wait("synthetic-head", timeout=120).state == "ready"
        with TestClient(build_app(s)) as c:
            cfg = c.get("/v1/viewer/config").json()
            assert cfg["upload"] is False and [g["id"] for g in cfg["generations"]] == ["res", "nerf-only",
                                                                                         "synthetic-head"]
        with pytest.raises(ValueError, match="unknown synthetic scene 'cube'. Fix"):
            load_synthetic(s, "cube")
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="neither a views folder .* nor a fitted NeRF.*Fix"):
            load_path(s, tmp_path / "empty")
        with pytest.raises(ValueError, match="is not a folder. Fix"):
            load_path(s, tmp_path / "missing")
    finally:
        s.close()


def test_view_cli_errors(tmp_path, capsys):
    from dp360rt.cli.main import main
    assert main(["view"]) == 2
    assert "nothing to show. Fix: pass a views or NeRF folder, or --synthetic head" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "is not a folder. Fix" in capsys.readouterr().err


def test_heads_are_kept_in_the_store_and_served_after_a_restart(head_views, tmp_path):
    """head.ply / head.glb of a finished fit go into the generation's store folder (atomically, once);
    a restarted server serves them from there without fitting again. The store keeps only those
    two names, and only for complete generations."""
    from dp360rt.serve.store import ResultStore
    images, cams = head_views
    store = ResultStore(tmp_path / "store")
    gen = store.new()
    for i, (im, cam) in enumerate(zip(images, cams)):
        store.write_view(gen, i, im)
    store.finish(gen, {i: cam.tolist() for i, cam in enumerate(cams)})
    opts = {"splat": {"steps": 3, "resolution": 24}}
    s = NerfSessions(steps=STEPS, chunk_seconds=0.2, store=store, export_options=opts)
    try:
        with _client(s, standalone=False) as c:
            assert c.get(f"/v1/generations/{gen}/head.ply").status_code == 202      # starts the fit
            s.wait(gen, timeout=300)
            r = c.get(f"/v1/generations/{gen}/head.ply")
            assert r.status_code == 200 and r.content.startswith(b"ply\n")
    finally:
        s.close()
    kept = store.root / gen / "assets" / "head.ply"
    assert kept.read_bytes() == r.content
    assert not [p for p in (store.root / gen).rglob("*") if p.name.startswith(".")]   # no temporary left
    s2 = NerfSessions(steps=STEPS, store=ResultStore(tmp_path / "store"), export_options=opts)   # a restart
    try:
        with _client(s2, standalone=False) as c:
            again = c.get(f"/v1/generations/{gen}/head.ply")
            assert again.status_code == 200 and again.content == r.content
            assert not s2.get(gen).status()["fit"]["started"]                # served from the store, no fit
    finally:
        s2.close()
    with pytest.raises(ValueError, match="not an asset"):
        store.write_asset(gen, "../cameras.json", b"x")
    half = store.new()
    assert store.write_asset(half, "head.ply", b"ply\n") is False             # not complete: not kept
    assert store.read_asset(half, "head.ply") is None
