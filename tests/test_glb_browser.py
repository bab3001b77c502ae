"""The exported GLB in three.js: Debian's chromium (software WebGL) loads ``head.glb`` with
three.js's own ``GLTFLoader`` and draws it, as a client application would. three.js comes from npm
(``.ci/run`` installs it under the gitignored ``.ci/node``; the package itself never ships it).

Skips, saying why, where chromium, Playwright, or the npm install is missing.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
THREE = ROOT / ".ci" / "node" / "node_modules" / "three"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (CI: apt-get install -y chromium)"),
              pytest.mark.skipif(not (THREE / "build" / "three.module.js").is_file(),
                                 reason="three.js missing under .ci/node (bash .ci/run installs it with npm)")]

PAGE = """<!doctype html><html><head><link rel="icon" href="data:,"></head><body style="margin:0">
<canvas id="c" width="256" height="256"></canvas>
<script type="importmap">{"imports": {"three": "/three/build/three.module.js"}}</script>
<script type="module">
import * as THREE from "three";
import { GLTFLoader } from "/three/examples/jsm/loaders/GLTFLoader.js";
const renderer = new THREE.WebGLRenderer({canvas: document.getElementById("c"), preserveDrawingBuffer: true});
renderer.setClearColor(0x000000, 1);
new GLTFLoader().load("/head.glb", (gltf) => {
  const scene = gltf.scene;
  scene.add(new THREE.AmbientLight(0xffffff, 3.0));
  const box = new THREE.Box3().setFromObject(scene);
  const centre = box.getCenter(new THREE.Vector3()), size = box.getSize(new THREE.Vector3()).length();
  const camera = new THREE.PerspectiveCamera(40, 1, size / 100, size * 10);
  let meshes = 0, triangles = 0, textured = 0, textureSize = null;
  scene.traverse((o) => {
    if (!o.isMesh) return;
    meshes += 1;
    triangles += o.geometry.index ? o.geometry.index.count / 3 : o.geometry.attributes.position.count / 3;
    const map = o.material.map;
    if (map && map.image) { textured += 1; textureSize = [map.image.width, map.image.height]; }
  });
  const shot = (azimuth) => {
    camera.position.set(centre.x + 1.6 * size * Math.sin(azimuth), centre.y, centre.z + 1.6 * size * Math.cos(azimuth));
    camera.lookAt(centre);
    renderer.render(scene, camera);
    const gl = renderer.getContext(), px = new Uint8Array(256 * 256 * 4);
    gl.readPixels(0, 0, 256, 256, gl.RGBA, gl.UNSIGNED_BYTE, px);
    return Array.from(px);
  };
  window.result = {meshes, triangles, textured, textureSize, front: shot(0), side: shot(Math.PI / 2)};
}, undefined, (err) => { window.result = {error: String(err)}; });
</script></body></html>"""


@pytest.fixture()
def served(tmp_path):
    """A static server on 127.0.0.1 for the page, the GLB and three.js -> (base URL, folder)."""
    (tmp_path / "index.html").write_text(PAGE)
    os.symlink(THREE, tmp_path / "three")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_exported_glb_loads_and_draws_in_threejs(served):
    """A GLB from ``Nerf.export_glb`` loads with GLTFLoader without an error: one mesh with the
    exported triangle count and its baked base-colour texture, drawn covering part of the frame,
    and a turned camera sees a different picture."""
    import numpy as np

    from dp360rt.nerf import Nerf
    from dp360rt.nerf.synthetic import render_views
    url, folder = served
    imgs, cams = render_views("head", size=32)
    nerf = Nerf(device="cpu", grid_res=48)
    nerf.fit(imgs, cams, steps=80, progress=False)
    info = nerf.export_glb(folder / "head.glb", triangles=2000, texture_size=64, resolution=48)

    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/index.html")
            page.wait_for_function("window.result !== undefined", timeout=120_000, polling=100)
            result = page.evaluate("window.result")
        finally:
            browser.close()
    assert "error" not in result, result.get("error")
    assert not errors, errors
    assert result["meshes"] == 1 and result["triangles"] == info["triangles"]
    assert result["textured"] == 1 and result["textureSize"] == [64, 64]
    front = np.asarray(result["front"], np.uint8).reshape(256, 256, 4)[..., :3].astype(np.float32)
    side = np.asarray(result["side"], np.uint8).reshape(256, 256, 4)[..., :3].astype(np.float32)
    covered = (front.max(-1) > 8).mean()
    print(f"\nthree.js drew the GLB ({info['triangles']} triangles): {covered:.1%} of the frame covered; "
          + json.dumps({"texture": result["textureSize"]}))
    assert 0.05 < covered < 0.95, f"the head covers {covered:.1%} of the frame"
    assert np.abs(front - side).mean() > 2.0, "a turned camera drew the same picture"
