// The fitted head rendered in the browser: the generation's 3D Gaussian splat (head.ply) drawn
// with WebGL2 by the vendored gsplat.js (static/vendor/gsplat/, MIT; see docs/licences.md).
// An ES module, loaded by viewer.js with import() only when a splat is ready. No build step.
import * as SPLAT from "./vendor/gsplat/gsplat.es.js";

// True when this browser can draw the splat (gsplat.js needs WebGL2).
export function webgl2Available() {
  try {
    return !!document.createElement("canvas").getContext("webgl2");
  } catch (_) {
    return false;
  }
}

// cam2world rotation (columns: camera x right, y down, z forward, in world axes) -> quaternion
// [x, y, z, w]. gsplat.js takes the camera's rotation in the same OpenCV axes as dp360rt's cameras.
function quaternionOfRotation(m) {       // m[r][c]
  const t = m[0][0] + m[1][1] + m[2][2];
  let x, y, z, w;
  if (t > 0) {
    const s = Math.sqrt(t + 1) * 2;
    w = s / 4; x = (m[2][1] - m[1][2]) / s; y = (m[0][2] - m[2][0]) / s; z = (m[1][0] - m[0][1]) / s;
  } else if (m[0][0] > m[1][1] && m[0][0] > m[2][2]) {
    const s = Math.sqrt(1 + m[0][0] - m[1][1] - m[2][2]) * 2;
    w = (m[2][1] - m[1][2]) / s; x = s / 4; y = (m[0][1] + m[1][0]) / s; z = (m[0][2] + m[2][0]) / s;
  } else if (m[1][1] > m[2][2]) {
    const s = Math.sqrt(1 + m[1][1] - m[0][0] - m[2][2]) * 2;
    w = (m[0][2] - m[2][0]) / s; x = (m[0][1] + m[1][0]) / s; y = s / 4; z = (m[1][2] + m[2][1]) / s;
  } else {
    const s = Math.sqrt(1 + m[2][2] - m[0][0] - m[1][1]) * 2;
    w = (m[1][0] - m[0][1]) / s; x = (m[0][2] + m[2][0]) / s; y = (m[1][2] + m[2][1]) / s; z = s / 4;
  }
  return [x, y, z, w];
}

const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const unit = (a) => { const n = Math.hypot(a[0], a[1], a[2]); return [a[0] / n, a[1] / n, a[2] / n]; };

// The orbit camera dp360rt's server renders for {azimuth, elevation, radius} (nerf/cameras.py
// orbit_cameras and look_at: world +y up, azimuth 0 on +z, 90 on +x) -> {eye, rotation 3x3}.
export function orbitCamera(azimuthDeg, elevationDeg, radius, lookat) {
  const a = (azimuthDeg * Math.PI) / 180, e = (elevationDeg * Math.PI) / 180;
  const c = lookat || [0, 0, 0];
  const eye = [c[0] + radius * Math.cos(e) * Math.sin(a), c[1] + radius * Math.sin(e),
               c[2] + radius * Math.cos(e) * Math.cos(a)];
  const z = unit([c[0] - eye[0], c[1] - eye[1], c[2] - eye[2]]);
  let x = cross(z, [0, 1, 0]);
  if (Math.hypot(x[0], x[1], x[2]) < 1e-9) x = cross(z, [0, 0, 1]);
  x = unit(x);
  const y = cross(z, x);
  return { eye, rotation: [[x[0], y[0], z[0]], [x[1], y[1], z[1]], [x[2], y[2], z[2]]] };
}

// One canvas showing one splat. load() fetches and parses the .ply; draw() renders a camera.
export class SplatView {
  constructor(canvas) {
    this.canvas = canvas;
    // no render passes: gsplat.js would fade the splat in, and a frame must show the splat as it is
    this.renderer = new SPLAT.WebGLRenderer(canvas, []);
    this.renderer.backgroundColor = new SPLAT.Color32(255, 255, 255, 255);   // the NeRF's white
    this.scene = new SPLAT.Scene();
    this.camera = new SPLAT.Camera();
    this.count = 0;
  }

  // Fetch the splat at `url` (headers: e.g. the bearer token) -> number of Gaussians.
  async load(url, headers) {
    const r = await fetch(url, { headers });
    if (!r.ok) {
      let why = `HTTP ${r.status}`;
      try { const j = await r.json(); why = `${j.error.message} (${j.error.fix})`; } catch (_) { /* not JSON */ }
      throw new Error(why);
    }
    const buf = await r.arrayBuffer();
    const splat = SPLAT.PLYLoader.LoadFromArrayBuffer(buf, this.scene);
    this.count = splat.data.vertexCount;
    return this.count;
  }

  // Render the camera {eye, rotation} with normalized focal length fx (image widths).
  draw(cam, fx) {
    this.renderer.resize();
    const w = this.canvas.width, h = this.canvas.height;
    this.camera.data.fx = fx * w;
    this.camera.data.fy = fx * h;
    this.camera.position = new SPLAT.Vector3(cam.eye[0], cam.eye[1], cam.eye[2]);
    const q = quaternionOfRotation(cam.rotation);
    this.camera.rotation = new SPLAT.Quaternion(q[0], q[1], q[2], q[3]);
    this.renderer.render(this.scene, this.camera);
  }

  dispose() {
    this.renderer.dispose();
  }
}
