"""The viewer in a real browser: Debian's chromium driven by Playwright (the system browser, never a
downloaded one). As a person would use it: the views load, the status becomes ready, a drag
changes the rendered frame (the server's NeRF frames with ``?render=server``; the splat drawn by
the page itself in the default mode); no request leaves 127.0.0.1 and the console stays free of
errors.
Screenshots go to ``test-artifacts/viewer/`` (gitignored).

Skips, saying why, only where no chromium (or no Playwright) can be found.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("starlette", reason="the viewer needs the serve extra: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="the viewer needs the serve extra: pip install '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DP360RT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "viewer"
# Software WebGL (SwiftShader) for the in-browser splat: no GPU in CI, and figures say so
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (CI: apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn in a thread on a free local port."""

    def __init__(self, app):
        import uvicorn
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < t_end, "the test server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def browser_page():
    """A chromium page that records console errors and every URL it asks for (requests and
    WebSockets), and refuses anything that is not 127.0.0.1."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        log = {"errors": [], "urls": [], "outside": []}

        def route(r):
            log["urls"].append(r.request.url)
            if urlparse(r.request.url).hostname != "127.0.0.1" and not r.request.url.startswith("data:"):
                log["outside"].append(r.request.url)
                r.abort()
            else:
                r.continue_()

        page.route("**/*", route)
        page.on("websocket", lambda ws: log["urls"].append(ws.url))
        page.on("console", lambda m: log["errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: log["errors"].append(str(e)))
        try:
            yield page, log
        finally:
            browser.close()


def _wait(page, js: str, timeout_s: float):
    page.wait_for_function(js, timeout=timeout_s * 1000, polling=100)


def _canvas_pixels(page) -> list[int]:
    return page.evaluate("""() => {
        const c = document.querySelector('[data-testid=nerf-view]');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 16 == 0));
    }""")


def _ready_and_current(page, timeout_s: float) -> None:
    """Status ready and the frame on screen rendered from the final snapshot."""
    _wait(page, "document.querySelector('[data-testid=status]').dataset.state === 'ready'", timeout_s)
    _wait(page, "window.dp360viewer.meta && window.dp360viewer.statusJson && "
                "window.dp360viewer.meta.version === window.dp360viewer.statusJson.version && "
                "window.dp360viewer.lastFrameId === window.dp360viewer.reqId", timeout_s)


def _drag_changes_frame(page, timeout_s: float) -> None:
    before = _canvas_pixels(page)
    box = page.locator("[data-testid=nerf-view]").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 10, steps=6)
    page.mouse.up()
    # the full-size frame for where the pointer stopped
    _wait(page, "!window.dp360viewer.dragging && window.dp360viewer.lastFrameId === window.dp360viewer.reqId",
          timeout_s)
    after = _canvas_pixels(page)
    diff = sum(abs(a - b) for a, b in zip(before, after)) / len(before)
    assert diff > 1.0, f"the frame did not change after a drag (mean abs diff {diff:.3f})"


def _assert_clean(log) -> None:
    assert not log["outside"], f"requests left 127.0.0.1: {log['outside']}"
    hosts = {urlparse(u).hostname for u in log["urls"] if not u.startswith("data:")}
    assert hosts == {"127.0.0.1"}, hosts
    assert any(u.startswith("ws://127.0.0.1") for u in log["urls"]), "no WebSocket was opened"
    assert not log["errors"], f"console errors: {log['errors']}"


def test_view_synthetic_head_in_browser(browser_page):
    """`dp360rt view --synthetic head`: 32 views around the ring, fitted, orbited by a drag."""
    from dp360rt.viewer import NerfSessions
    from dp360rt.viewer.app import build_app, load_synthetic
    page, log = browser_page
    sessions = NerfSessions(steps=60, chunk_seconds=0.3)
    load_synthetic(sessions, "head", size=48)
    with _Server(build_app(sessions)) as url:
        page.goto(url + "/?render=server")
        _ready_and_current(page, 240)
        assert page.locator("img[data-testid=view]").count() == 32
        _wait(page, "Array.from(document.querySelectorAll('img[data-testid=view]')).every(i => i.complete && "
                    "i.naturalWidth === 48)", 30)
        assert "Synthetic scene 'head'" in page.inner_text("[data-testid=label]")
        assert "ready" in page.inner_text("[data-testid=status]")
        assert not page.locator("[data-testid=portrait-input]").is_visible()   # no service: no upload
        page.screenshot(path=str(ARTIFACTS / "view_synthetic_head.png"))
        page.select_option("[data-testid=render-size]", "128")       # CPU: smaller frames keep the test short
        _drag_changes_frame(page, 120)
        page.locator("[data-testid=auto-rotate]").click()
        f0 = page.evaluate("window.dp360viewer.frames")
        _wait(page, f"window.dp360viewer.frames >= {f0 + 2}", 120)              # rotation keeps asking
        page.locator("[data-testid=auto-rotate]").click()
        assert page.inner_text("[data-testid=fps]").endswith("fps")
        assert page.get_attribute("[data-testid=download-nerf]", "href").endswith("/nerf.zip")
        page.screenshot(path=str(ARTIFACTS / "view_synthetic_head_orbited.png"))
    _assert_clean(log)


def _serve_available() -> bool:
    try:
        import dp360rt.serve  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _serve_available(), reason="dp360rt.serve (issue 17) is not in this tree yet")
def test_upload_generate_and_orbit_in_browser(browser_page, tmp_path):
    """`dp360rt serve --random tiny`: upload a portrait, the back view and 32 views stream in,
    the NeRF fits while they come, the status becomes ready, a drag orbits the fitted field."""
    from PIL import Image
    page, log = browser_page
    portrait = tmp_path / "portrait.png"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(portrait)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dp360rt", "serve", "--random", "tiny", "--port", str(port),
                             "--nerf-steps", "60"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        import httpx
        url = f"http://127.0.0.1:{port}"
        t_end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < t_end, "dp360rt serve did not become ready"
            time.sleep(0.5)
        page.goto(url + "/?render=server")
        page.set_input_files("[data-testid=portrait-input]", str(portrait))
        page.fill("[data-testid=steps]", "2")
        page.locator("[data-testid=generate]").click()
        _wait(page, "document.querySelectorAll('img[data-testid=view]').length === 33", 240)
        _wait(page, "Array.from(document.querySelectorAll('img[data-testid=view]')).every(i => i.complete && "
                    "i.naturalWidth > 0)", 60)
        assert "first view after" in page.inner_text("[data-testid=progress]")
        _ready_and_current(page, 300)
        assert "ready" in page.inner_text("[data-testid=status]")
        page.screenshot(path=str(ARTIFACTS / "serve_upload_ready.png"))
        page.select_option("[data-testid=render-size]", "128")
        _drag_changes_frame(page, 120)
        page.screenshot(path=str(ARTIFACTS / "serve_upload_orbited.png"))
        if importlib.util.find_spec("dlib") is not None:       # the crop extra (part of test)
            # a raw photo with crop=auto: the crop's camera and named warnings are shown (the
            # astronaut's face is 90 px wide: a SmallFaceWarning), then its views stream in
            from skimage import data
            raw = tmp_path / "raw.png"
            Image.fromarray(data.astronaut()).save(raw)
            page.set_input_files("[data-testid=portrait-input]", str(raw))
            page.select_option("[data-testid=crop]", "auto")
            page.locator("[data-testid=generate]").click()
            _wait(page, "!document.querySelector('[data-testid=crop-info]').hidden", 120)
            info = page.inner_text("[data-testid=crop-info]")
            assert "yaw" in info and "hog detector" in info and "SmallFaceWarning" in info, info
            assert page.get_attribute("[data-testid=crop-info]", "data-warnings") == "1"
            _wait(page, "document.querySelectorAll('img[data-testid=view]').length === 33", 240)
            page.screenshot(path=str(ARTIFACTS / "serve_upload_crop_auto.png"))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    _assert_clean(log)


def _png_rgb(data: bytes):
    import io

    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32) / 255.0


def _splat_shot(page):
    """The splat canvas as shown, without the HUD that lies over it -> float RGB [H, W, 3]."""
    page.evaluate("document.getElementById('hud').style.visibility = 'hidden'")
    shot = _png_rgb(page.locator("[data-testid=splat-view]").screenshot())
    page.evaluate("document.getElementById('hud').style.visibility = ''")
    return shot


def test_splat_drawn_in_browser(browser_page):
    """The default page mode: once the fit is done the page downloads head.ply once and draws it
    with the vendored gsplat.js (WebGL2, software GL here). The frame it draws matches dp360rt's
    own splat renderer for the same camera, orbiting changes it, and the draw rate over >= 3 s of
    requestAnimationFrame orbiting is written to test-artifacts/viewer/splat_fps.json."""
    import json

    import httpx
    import numpy as np
    import torch
    from dp360rt.nerf.cameras import orbit_cameras
    from dp360rt.nerf.splat import read_splat_ply
    from dp360rt.nerf.splat_render import render_splat
    from dp360rt.viewer import NerfSessions
    from dp360rt.viewer.app import build_app, load_synthetic
    page, log = browser_page
    sessions = NerfSessions(steps=60, chunk_seconds=0.3, export_options={"splat": {"steps": 20}})
    load_synthetic(sessions, "head", size=48)
    with _Server(build_app(sessions)) as url:
        page.goto(url + "/")
        _wait(page, "document.querySelector('[data-testid=render-info]').dataset.mode === 'browser'", 300)
        assert page.locator("[data-testid=splat-view]").is_visible()
        assert not page.locator("[data-testid=nerf-view]").is_visible()
        assert "Gaussians" in page.inner_text("[data-testid=render-info]")
        gen = page.evaluate("window.dp360viewer.genId")
        status = page.evaluate("window.dp360viewer.statusJson")
        assert status["state"] == "ready"

        # one fixed camera, drawn until the worker's depth order has caught up
        page.evaluate("() => { const v = window.dp360viewer; v.azimuth = 30; v.elevation = 10; v.zoom = 1; "
                      "requestFrame(); }")
        _wait(page, "window.dp360viewer.splatPending <= 0", 60)
        shot = _splat_shot(page)
        ply = httpx.get(f"{url}/v1/generations/{gen}/head.ply", timeout=120)
        assert ply.status_code == 200
        path = ARTIFACTS / "head.ply"
        path.write_bytes(ply.content)
        splat = read_splat_ply(path)
        assert splat["count"] == page.evaluate("window.dp360viewer.splatCount")
        o = status["orbit"]
        cam = orbit_cameras(1, o["radius"], 10.0, o["lookat"], o["fx"], start_azimuth_deg=30.0)[0]
        with torch.no_grad():
            ref = render_splat({k: splat[k] for k in ("means", "f_dc", "logit_opacity", "log_scales", "quats")},
                               cam, shot.shape[1], shot.shape[0]).clamp(0, 1).numpy()
        psnr = float(-10 * np.log10(np.mean((shot - ref) ** 2)))
        print(f"browser splat vs dp360rt's splat renderer: PSNR {psnr:.1f} dB at {shot.shape[1]}x{shot.shape[0]}")
        assert psnr > 30.0, f"the browser's splat differs from dp360rt's render of it: PSNR {psnr:.1f} dB"

        # orbit >= 3 s: every animation frame draws the splat again
        before = shot
        page.locator("[data-testid=auto-rotate]").click()
        f0, t0 = page.evaluate("[window.dp360viewer.splatFrames, performance.now()]")
        time.sleep(3.5)
        f1, t1 = page.evaluate("[window.dp360viewer.splatFrames, performance.now()]")
        page.locator("[data-testid=auto-rotate]").click()
        fps = (f1 - f0) / ((t1 - t0) / 1000.0)
        _wait(page, "window.dp360viewer.splatPending <= 0", 60)
        after = _splat_shot(page)
        assert f1 - f0 >= 3, f"only {f1 - f0} frames drawn in {(t1 - t0) / 1000:.1f} s of orbiting"
        assert np.abs(after - before).mean() > 0.005, "the splat did not change while orbiting"
        assert page.inner_text("[data-testid=fps]").endswith("fps")
        (ARTIFACTS / "splat_fps.json").write_text(json.dumps(
            {"fps": fps, "frames": f1 - f0, "seconds": (t1 - t0) / 1000, "gaussians": splat["count"],
             "canvas": list(shot.shape[:2]), "renderer": "chromium headless, SwiftShader (software GL, no GPU)"}))
        print(f"splat drawn in the browser: {fps:.1f} fps over {(t1 - t0) / 1000:.1f} s, {splat['count']} Gaussians, "
              f"{shot.shape[1]}x{shot.shape[0]}, software GL")
        page.screenshot(path=str(ARTIFACTS / "view_splat_in_browser.png"))

        # back to the server's frames, and to the splat again, by the page's own control
        page.select_option("[data-testid=render-mode]", "server")
        assert page.locator("[data-testid=nerf-view]").is_visible()
        page.select_option("[data-testid=render-mode]", "auto")
        assert page.locator("[data-testid=splat-view]").is_visible()
    _assert_clean(log)
