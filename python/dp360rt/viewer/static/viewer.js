// dp360rt viewer: views as they stream (SSE of POST /v1/generations) and the fitted NeRF,
// rendered by the server for the camera this page sends over a WebSocket; once the fit is done,
// the head's 3D Gaussian splat drawn in this browser (splat_view.js). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token");
const DRAG_SIZE = 128;            // frames while the pointer moves: small, so they keep up with it
const RING = { cx: 350, cy: 350, r: 310, thumb: 58 };
// frames the splat is drawn again after the camera stops: gsplat.js sorts the Gaussians in a
// worker, and the order for the last camera arrives a frame or two after it was asked for
const SETTLE_FRAMES = 8;

const viewer = {                  // page state (also read by the browser test)
  genId: null, views: new Map(), ws: null, wsOpen: false, reqId: 0, frames: 0, lastFrameId: null,
  azimuth: 0, elevation: 0, zoom: 1, radius: null, rotating: false, dragging: false, meta: null,
  frameTimes: [], polling: null, tStart: null, firstView: null, state: "idle", statusJson: null,
  mode: "server", splat: null, splatModule: null, splatState: "none", splatCount: 0, splatFrames: 0,
  splatPending: 0, splatLoadSeconds: null,
};
window.dp360viewer = viewer;

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(state, text) {
  viewer.state = state;
  $("status").dataset.state = state;
  $("status").textContent = text;
}

// ---- views around the ring, placed by camera azimuth -------------------------------------------
function defaultAzimuth(index) {
  return index < 0 ? 202.5 : (360 * index) / 32;       // sphere32 orbit; the back view at hint 18
}

function placeView(img, azimuth) {
  const a = (azimuth * Math.PI) / 180;
  img.style.left = RING.cx + RING.r * Math.sin(a) - RING.thumb / 2 + "px";
  img.style.top = RING.cy + RING.r * Math.cos(a) - RING.thumb / 2 + "px";
  img.title = `view ${img.dataset.index}, azimuth ${azimuth.toFixed(1)}°`;
}

function addView(index, url, azimuth) {
  let img = viewer.views.get(index);
  if (!img) {
    img = document.createElement("img");
    img.className = "view" + (index < 0 ? " back" : "");
    img.dataset.testid = "view";
    img.setAttribute("data-testid", "view");
    img.dataset.index = String(index);
    img.alt = index < 0 ? "back view" : `view ${index}`;
    img.src = withToken(url);
    viewer.views.set(index, img);
    $("ring").appendChild(img);
  }
  placeView(img, azimuth ?? defaultAzimuth(index));
}

function clearViews() {
  for (const img of viewer.views.values()) img.remove();
  viewer.views.clear();
}

// ---- status polling ------------------------------------------------------------------------------
function describe(st) {
  const psnr = st.psnr == null ? "" : `, PSNR ${st.psnr.toFixed(1)} dB`;
  if (st.state === "failed") return `failed: ${st.error}`;
  if (st.state === "ready") return `ready: NeRF fitted (${st.steps} steps${psnr}); drag to orbit`;
  if (st.state === "off") return "views only: this generation was made with nerf=none (no NeRF)";
  if (st.state === "idle") return "starting the NeRF fit";
  if (st.state === "fitting") {
    const gen = st.generation === "running" ? "generating and " : "";
    return `${gen}fitting the NeRF: step ${st.steps}${psnr}, ${st.views} views`;
  }
  return st.generation === "running" ? "generating: waiting for the first view" : "waiting";
}

async function pollStatus() {
  if (!viewer.genId) return;
  const id = viewer.genId;
  let st;
  try {
    const r = await fetch(withToken(`/v1/generations/${id}/nerf/status`), { headers: authHeaders() });
    if (r.status === 404) return;             // the listener has not seen this generation yet
    if (!r.ok) {
      let why = `status ${r.status}`;
      try { why = (await r.json()).error.message; } catch (_) { /* not our JSON */ }
      throw new Error(why);
    }
    st = await r.json();
  } catch (e) {
    setStatus("failed", `lost the server: ${e.message}`);
    return;
  }
  if (id !== viewer.genId) return;
  viewer.statusJson = st;
  for (const v of st.view_list) addView(v.index, v.url, v.azimuth);
  if (viewer.tStart == null) $("progress").textContent = `${st.view_list.length} views`;
  if (st.label) { $("label").textContent = st.label; $("label").hidden = false; }
  setStatus(st.state, describe(st));
  setDownloads(st);
  // this page looks at the generation: ask the server to fit its NeRF (nerf=on_view fits only then)
  if (st.state === "idle" && viewer.fitAsked !== id) {
    viewer.fitAsked = id;
    fetch(withToken(`/v1/generations/${id}/nerf/fit`), { method: "POST", headers: authHeaders() });
  }
  if (st.state === "ready") maybeLoadSplat();
  if (st.renderable && !viewer.ws) connect(st);
  // the field improved since the frame on screen: show it (unless the pointer is driving the view)
  else if (viewer.meta && st.version !== viewer.meta.version && !viewer.dragging && !viewer.rotating) requestFrame();
  if (st.state === "ready" || st.state === "failed" || st.state === "off") stopPolling();
}

function startPolling() {
  stopPolling();
  viewer.polling = setInterval(pollStatus, 500);
  pollStatus();
}

function stopPolling() {
  if (viewer.polling) clearInterval(viewer.polling);
  viewer.polling = null;
}

function setDownloads(st) {
  for (const a of document.querySelectorAll("#downloads a")) {
    const file = a.dataset.file;
    const ok = file === "views.zip" ? st.views > 0 : st.renderable;
    if (ok) a.href = withToken(`/v1/generations/${viewer.genId}/${file}`);
    else a.removeAttribute("href");
  }
}

// ---- the live NeRF view ----------------------------------------------------------------------------
function connect(st) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(withToken(`${proto}//${location.host}/v1/generations/${viewer.genId}/nerf`));
  ws.binaryType = "blob";
  viewer.ws = ws;
  if (st.orbit) {
    viewer.radius = st.orbit.radius;
    viewer.elevation = st.orbit.elevation_deg || 0;
  }
  ws.onopen = () => { viewer.wsOpen = true; requestFrame(); };
  ws.onclose = () => { viewer.wsOpen = false; if (viewer.ws === ws) viewer.ws = null; };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const msg = JSON.parse(ev.data);
      if (msg.type === "frame") viewer.meta = msg;
      else if (msg.type === "waiting") setTimeout(requestFrame, 500);
      else if (msg.type === "error") $("frameinfo").textContent = msg.message;
      return;
    }
    drawFrame(ev.data, viewer.meta);
  };
}

async function drawFrame(blob, meta) {
  const bmp = await createImageBitmap(blob);
  const c = $("nerf");
  c.getContext("2d").drawImage(bmp, 0, 0, c.width, c.height);
  bmp.close();
  viewer.frames += 1;
  viewer.lastFrameId = meta ? meta.id : null;
  countFrame();
  if (meta && viewer.mode === "server") {
    $("frameinfo").textContent = `${meta.width}² in ${meta.render_ms.toFixed(0)} ms, step ${meta.step}`;
  }
  if (viewer.rotating && viewer.mode === "server") requestAnimationFrame(rotateStep);
}

// frames per second over the last 2 s, on the HUD (server frames or browser draws, whichever shows)
function countFrame() {
  const now = performance.now();
  viewer.frameTimes.push(now);
  while (viewer.frameTimes.length && now - viewer.frameTimes[0] > 2000) viewer.frameTimes.shift();
  const span = (now - viewer.frameTimes[0]) / 1000;
  const fps = viewer.frameTimes.length > 1 && span > 0 ? (viewer.frameTimes.length - 1) / span : null;
  $("fps").textContent = fps == null ? "– fps" : `${fps.toFixed(1)} fps`;
}

function requestFrame() {
  if (viewer.mode === "browser") { redrawSplat(); return; }
  if (!viewer.ws || !viewer.wsOpen) return;
  const size = viewer.dragging ? DRAG_SIZE : Number($("size").value);
  const req = { id: ++viewer.reqId, azimuth: viewer.azimuth, elevation: viewer.elevation,
                width: size, height: size, format: "jpeg" };
  if (viewer.radius) req.radius = viewer.radius * viewer.zoom;
  viewer.ws.send(JSON.stringify(req));       // the server drops requests a newer one replaced
}

let lastRotate = null;
function advanceRotation(t) {
  const dt = lastRotate == null ? 1 / 30 : Math.min((t - lastRotate) / 1000, 0.5);
  lastRotate = t;
  viewer.azimuth = (viewer.azimuth + 40 * dt) % 360;      // 40 degrees per second of wall time
}

function rotateStep(t) {
  if (!viewer.rotating) return;
  advanceRotation(t);
  requestFrame();
}

// ---- the head drawn in this browser: its 3D Gaussian splat (head.ply) ----------------------------
function setRenderInfo(mode, text) {
  $("renderinfo").dataset.mode = mode;
  $("renderinfo").textContent = text;
}

function wantBrowser() {
  return $("mode").value !== "server";
}

function maybeLoadSplat() {
  if (wantBrowser() && viewer.splatState === "none" && viewer.statusJson && viewer.statusJson.state === "ready") {
    loadSplat(viewer.genId);
  }
}

async function loadSplat(id) {
  viewer.splatState = "loading";
  setRenderInfo("server", "rendering on the server; the head's splat is being made (first time only) and downloaded");
  try {
    const mod = await import("/static/splat_view.js");
    if (!mod.webgl2Available()) {
      viewer.splatState = "unsupported";
      setRenderInfo("server", "this browser has no WebGL2: frames stay rendered by the server");
      return;
    }
    const t0 = performance.now();
    const view = new mod.SplatView($("splat"));
    const n = await view.load(withToken(`/v1/generations/${id}/head.ply`), authHeaders());
    if (viewer.genId !== id) { view.dispose(); return; }         // the page moved on meanwhile
    viewer.splat = view; viewer.splatModule = mod; viewer.splatCount = n;
    viewer.splatLoadSeconds = (performance.now() - t0) / 1000;
    viewer.splatState = "ready";
    applyMode();
  } catch (e) {
    if (viewer.genId !== id) return;
    viewer.splatState = "failed";
    setRenderInfo("server", `the splat could not be shown (${e.message}); frames stay rendered by the server`);
  }
}

// A new generation is shown: forget the last one's splat (and its status, which said "ready").
function resetSplat() {
  viewer.statusJson = null;
  if (viewer.splat) viewer.splat.dispose();
  viewer.splat = null; viewer.splatState = "none"; viewer.splatCount = 0;
  const old = $("splat"), fresh = old.cloneNode(false);     // a fresh canvas: a new WebGL context
  old.replaceWith(fresh);
  applyMode();
}

// Show the splat when it is loaded and wanted, the server's frames otherwise.
function applyMode() {
  const browser = wantBrowser() && viewer.splat != null;
  viewer.mode = browser ? "browser" : "server";
  $("splat").hidden = !browser;
  $("nerf").hidden = browser;
  viewer.frameTimes = [];
  if (browser) {
    setRenderInfo("browser", `rendering in this browser: ${viewer.splatCount} Gaussians (head.ply, ` +
                  `downloaded in ${viewer.splatLoadSeconds.toFixed(1)} s)`);
    $("frameinfo").textContent = "splat, drawn here";
    redrawSplat();
  } else {
    if (viewer.splatState === "none" || viewer.splatState === "ready") setRenderInfo("server", "rendering on the server from the NeRF");
    maybeLoadSplat();
    requestFrame();
  }
}

let splatLoop = null;
function redrawSplat() {
  viewer.splatPending = SETTLE_FRAMES;
  if (splatLoop == null) splatLoop = requestAnimationFrame(drawSplat);
}

function drawSplat(t) {
  splatLoop = null;
  if (viewer.mode !== "browser" || !viewer.splat) return;
  if (viewer.rotating) advanceRotation(t);
  const o = (viewer.statusJson && viewer.statusJson.orbit) || {};
  const cam = viewer.splatModule.orbitCamera(viewer.azimuth, viewer.elevation, (o.radius || 2.7) * viewer.zoom, o.lookat);
  viewer.splat.draw(cam, o.fx || 4.2647);
  viewer.splatFrames += 1;
  countFrame();
  viewer.splatPending -= 1;
  if (viewer.rotating || viewer.splatPending > 0) splatLoop = requestAnimationFrame(drawSplat);
}

function setupControls() {
  const c = $("stage");
  let last = null;
  c.addEventListener("pointerdown", (e) => {
    viewer.dragging = true; last = [e.clientX, e.clientY];
    c.setPointerCapture(e.pointerId); c.classList.add("dragging");
  });
  c.addEventListener("pointermove", (e) => {
    if (!viewer.dragging) return;
    viewer.azimuth = (viewer.azimuth - 0.5 * (e.clientX - last[0]) + 360) % 360;
    viewer.elevation = Math.max(-80, Math.min(80, viewer.elevation + 0.3 * (e.clientY - last[1])));
    last = [e.clientX, e.clientY];
    requestFrame();
  });
  const end = () => {
    if (!viewer.dragging) return;
    viewer.dragging = false; c.classList.remove("dragging");
    requestFrame();                           // full quality where the pointer stopped
  };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
  c.addEventListener("wheel", (e) => {
    e.preventDefault();
    viewer.zoom = Math.max(0.5, Math.min(2.0, viewer.zoom * Math.exp(e.deltaY * 0.001)));
    requestFrame();
  }, { passive: false });
  $("rotate").addEventListener("click", () => {
    viewer.rotating = !viewer.rotating;
    $("rotate").textContent = viewer.rotating ? "Stop rotating" : "Auto-rotate";
    lastRotate = null;
    if (viewer.rotating) requestFrame();
  });
  $("size").addEventListener("change", requestFrame);
  const mode = params.get("render");                       // ?render=server|browser|auto
  if (mode === "server" || mode === "browser" || mode === "auto") $("mode").value = mode;
  $("mode").addEventListener("change", applyMode);
}

// ---- one generation: open, or generate from an upload -------------------------------------------------
function openGeneration(id, label) {
  if (viewer.ws) { viewer.ws.close(); viewer.ws = null; }
  viewer.genId = id;
  viewer.tStart = null;
  clearViews();
  resetSplat();
  $("label").hidden = !label;
  $("label").textContent = label || "";
  setStatus("waiting", "loading");
  startPolling();
}

function parseSse(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let event = "message"; const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (data.length) onEvent(event, data.join("\n"));
  }
  return buffer;
}

function onGenerationEvent(event, data) {
  let msg = {};
  try { msg = JSON.parse(data); } catch (e) { msg = { message: data }; }
  if (event === "view") {
    const m = /\/v1\/generations\/([^/]+)\//.exec(msg.url || "");
    if (m && viewer.genId !== m[1]) {
      viewer.genId = m[1];
      startPolling();
    }
    addView(msg.index, msg.url, null);
    if (viewer.firstView == null) viewer.firstView = msg.t;
    const n = viewer.views.size;
    $("progress").textContent = `${n}/33 views; first view after ${viewer.firstView.toFixed(2)} s`;
    if (viewer.state === "generating" || viewer.state === "waiting") {
      setStatus("generating", `generating: ${n}/33 views`);
    }
  } else if (event === "crop") {
    // crop=auto: the camera PanoHead's recipe gave the raw photo, and the crop's named warnings
    // (a strongly turned head, a small face, several faces): the views follow that camera
    const w = msg.warnings || [];
    const deg = (v) => `${v >= 0 ? "+" : ""}${Number(v).toFixed(1)}°`;
    const el = $("cropinfo");
    el.textContent = `crop: yaw ${deg(msg.yaw_deg)}, pitch ${deg(msg.pitch_deg)} (1-sigma ${Number(msg.camera_sigma_deg).toFixed(1)}°), ` +
      `face found by the ${msg.detector} detector` + (w.length ? `; ${w.join("; ")}` : "");
    el.dataset.warnings = String(w.length);
    el.classList.toggle("warn", w.length > 0);
    el.hidden = false;
  } else if (event === "done") {
    $("progress").textContent += `; generated in ${((performance.now() - viewer.tStart) / 1000).toFixed(1)} s`;
  } else if (event === "error" || event === "cancelled") {
    setStatus("failed", `generation ${event}: ${msg.message || (msg.error && msg.error.message) || ""}`);
    stopPolling();
  }
}

async function generate(ev) {
  ev.preventDefault();
  const file = $("portrait").files[0];
  if (!file) { setStatus("failed", "choose a portrait image first"); return; }
  if (viewer.ws) { viewer.ws.close(); viewer.ws = null; }
  stopPolling();
  clearViews();
  viewer.genId = null;
  resetSplat();
  viewer.firstView = null; viewer.tStart = performance.now();
  const form = new FormData();
  form.append("portrait", file);
  if ($("steps").value) form.append("steps", $("steps").value);
  if ($("crop").value !== "none") form.append("crop", $("crop").value);
  $("cropinfo").hidden = true;
  setStatus("generating", "generating: uploading the portrait");
  $("generate").disabled = true;
  try {
    const r = await fetch(withToken("/v1/generations"), { method: "POST", body: form, headers: authHeaders() });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { const j = await r.json(); msg = `${j.error.message} (${j.error.fix})`; } catch (e) { /* not JSON */ }
      setStatus("failed", `the service refused the portrait: ${msg}`);
      return;
    }
    const headerId = r.headers.get("X-Generation-Id");
    if (headerId) { viewer.genId = headerId; startPolling(); }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf = parseSse(buf + dec.decode(value, { stream: true }).replace(/\r\n/g, "\n"), onGenerationEvent);
    }
  } catch (e) {
    setStatus("failed", `lost the service: ${e.message}`);
  } finally {
    $("generate").disabled = false;
  }
}

async function init() {
  setupControls();
  $("upload").addEventListener("submit", generate);
  let cfg = { upload: false, generations: [] };
  try {
    const r = await fetch(withToken("/v1/viewer/config"), { headers: authHeaders() });
    if (r.ok) cfg = await r.json();
    else setStatus("failed", `viewer config: HTTP ${r.status}${r.status === 401 ? " (open the page with ?token=...)" : ""}`);
  } catch (e) {
    setStatus("failed", `cannot reach the server: ${e.message}`);
    return;
  }
  $("upload").hidden = !cfg.upload;
  const sel = $("generation");
  for (const g of cfg.generations) {
    const o = document.createElement("option");
    o.value = g.id; o.textContent = g.id; o.dataset.label = g.label || "";
    sel.appendChild(o);
  }
  sel.hidden = cfg.generations.length < 2;
  sel.addEventListener("change", () => openGeneration(sel.value, sel.selectedOptions[0].dataset.label));
  if (cfg.generations.length) openGeneration(cfg.generations[0].id, cfg.generations[0].label);
  else if (!cfg.upload) setStatus("idle", "nothing to show: start dp360rt view with a folder or --synthetic head");
}

init();
