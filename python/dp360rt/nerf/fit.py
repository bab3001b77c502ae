"""Fitting a :class:`~.model.Nerf` to posed views: :class:`Fitter` (incremental training: views
may be added while it trains).

Schedule (all in terms of *progress* ``p`` = the larger of elapsed training time / ``seconds``
and steps / ``steps``): the learning rate decays exponentially to ``lr_final_ratio`` of its
start; the voxel grid (``encoding="grid"``) starts coarse and is resampled to the next resolution
of ``grid_schedule`` at the given progress (Adam state restarts); the occupancy grid is refreshed
every ``occ_every`` steps (and after every resampling). The sample step is ``step_ratio`` voxels.
"""
from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..io.checks import positive_float, positive_int
from ._threads import ThreadTuner, tune_allocator
from .cameras import CameraError, camera_rays, split_camera, to_image
from .field import GridField, HashField
from .occupancy import ViewCarver
from .render import render_rays_train

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf     # the model imports this module to fit itself: the arrow runs model -> fit


def estimate_background(images: Sequence[Tensor]) -> tuple[Tensor, float]:
    """The most frequent 8-bit colour of the images' outermost pixel ring and the fraction of
    ring pixels within 2/255 of it (a plain background shows as a large fraction)."""
    ring = torch.cat([torch.cat([im[0], im[-1], im[:, 0], im[:, -1]]) for im in images])
    q = (ring.clamp(0, 1) * 255).round().long()
    keys, counts = torch.unique(q[:, 0] * 65536 + q[:, 1] * 256 + q[:, 2], return_counts=True)
    k = int(keys[counts.argmax()])
    col = torch.tensor([k // 65536, (k // 256) % 256, k % 256], dtype=torch.float32)
    frac = float(((q.float() - col).abs().amax(-1) <= 2).float().mean())
    return col / 255.0, frac


def _camera_info(cams: Tensor) -> dict[str, Any]:
    """Mean distance to the origin, elevation and focal length of cameras [N, 25] (defaults for
    orbit videos)."""
    t = cams[:, [3, 7, 11]]
    r = t.norm(dim=1).clamp_min(1e-9)
    elev = torch.rad2deg(torch.asin((t[:, 1] / r).clamp(-1, 1)))
    return {"radius": round(float(r.mean()), 6), "elevation_deg": round(float(elev.mean()), 6),
            "fx": round(float(cams[:, 16].mean()), 6), "lookat": [0.0, 0.0, 0.0]}


class _View(NamedTuple):
    """One training view: its rays (origins, directions, colours; each [H*W, 3]), the image [H, W, 3]
    and its camera [25]."""
    origins: Tensor
    directions: Tensor
    colors: Tensor
    image: Tensor
    camera: Tensor


class Fitter:
    """Incremental training of a :class:`Nerf`. ``add_view(image, camera)`` may be called at any
    time (also from another thread while :meth:`train` runs): the new view's rays join the pool
    sampled by the next steps.

    ``seconds`` / ``steps``: the total budget the schedule is laid out on (at least one)."""

    def __init__(self, nerf: Nerf, seconds: float | None = None, steps: int | None = None, progress: bool = True):
        if seconds is None and steps is None:
            raise ValueError("give a training budget: seconds and/or steps. Fix: e.g. seconds=120")
        seconds = None if seconds is None else positive_float(seconds, "seconds")
        steps = None if steps is None else positive_int(steps, "steps")
        self.nerf = nerf
        self.seconds = seconds
        self.steps = steps
        self.progress = progress
        self.step = 0
        self.elapsed = 0.0
        self._views: list[_View] = []
        self._lock = threading.Lock()
        self._rays: tuple[Tensor, Tensor, Tensor] | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._bg_param: Tensor | None = None
        self._psnr_ema: float | None = None
        self._gen = torch.Generator(device="cpu").manual_seed(nerf.config.seed)
        self.samples_seen = 0
        self._last_samples = 0
        self._spr: float | None = None         # recent field samples per ray
        self.history: list[tuple] = []      # (step, seconds, train PSNR, samples, grid res, occupied fraction)
        self._bar: Any = None
        self._tuner: ThreadTuner | None = None

    # -- data ----------------------------------------------------------------------------------------
    def add_view(self, image: Any, camera: Tensor | Sequence[float] | None = None) -> None:
        """Add one view: an image (see :func:`to_image`) and its [25] camera, or a streamed
        :class:`dp360rt.engine.runtime.View` (``fitter.add_view(view)``) that carries both."""
        if camera is None:
            if not (hasattr(image, "image") and hasattr(image, "camera")):
                raise CameraError("add_view needs a camera. Fix: add_view(image, camera) or add_view(view) "
                                  "with a streamed View")
            image, camera = image.image, image.camera
        img = to_image(image)
        cam = torch.as_tensor(camera, dtype=torch.float64).reshape(-1)
        split_camera(cam)                               # validates the 25 numbers
        h, w = img.shape[:2]
        o, d = camera_rays(cam, w, h)
        with self._lock:
            self._views.append(_View(o.reshape(-1, 3), d.reshape(-1, 3), img.reshape(-1, 3), img, cam))
            self._rays = None
            carver = self.nerf.carver
        if carver is not None and self.nerf.field is not None:
            carver.add(img, cam)
        if self.nerf.image_size is None:
            self.nerf.image_size = (w, h)

    @property
    def num_views(self) -> int:
        return len(self._views)

    def _ray_pool(self) -> tuple[Tensor, Tensor, Tensor]:
        with self._lock:
            if self._rays is None:
                dev = self.nerf.device
                views = self._views
                self._rays = (torch.cat([v.origins for v in views]).to(dev), torch.cat([v.directions for v in views]).to(dev),
                              torch.cat([v.colors for v in views]).to(dev))
            return self._rays

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        nerf = self.nerf
        self._opt = None
        if nerf.field is None:
            assert nerf.image_size is not None
            nerf._build(nerf.image_size)
            self._init_background()
            nerf.camera_info = _camera_info(torch.stack([v.camera for v in self._views]))
            cfg = nerf.config
            if cfg.carve:
                bg = nerf.background if nerf.background_mode == "fixed" else None
                carver = ViewCarver(cfg.carve_res, cfg.bound, bg, cfg.carve_tol, cfg.carve_min_votes)
                with self._lock:
                    views = [(v.image, v.camera) for v in self._views]
                    nerf.carver = carver
                for img, cam in views:
                    carver.add(img, cam)
            nerf.update_occupancy()
            self._opt = None
        self._make_optimizer()

    def _init_background(self) -> None:
        nerf = self.nerf
        mode = nerf.config.background
        dev = nerf.device
        if isinstance(mode, str):
            named = {"white": [1.0, 1.0, 1.0], "black": [0.0, 0.0, 0.0]}
            if mode in named:
                nerf.background, nerf.background_mode = torch.tensor(named[mode], device=dev), "fixed"
                return
            if mode not in ("auto", "fit"):
                raise ValueError(f"unknown background {mode!r}. Fix: use auto, fit, white, black or r,g,b")
            mode_col, frac = estimate_background([v.image for v in self._views])
            nerf.background = mode_col.to(dev)
            nerf.background_mode = "fixed" if mode == "auto" and frac >= 0.1 else "fit"
        else:
            vals = [float(x) for x in mode]
            if len(vals) != 3:
                raise ValueError(f"background colour needs 3 numbers, got {mode!r}. Fix: e.g. 1,1,1")
            nerf.background, nerf.background_mode = torch.tensor(vals, device=dev), "fixed"

    def _make_optimizer(self) -> None:
        nerf = self.nerf
        lr = nerf.config.lr or (0.1 if isinstance(nerf.field, GridField) else 1e-2)
        groups = nerf.field.param_groups(lr)  # type: ignore[union-attr]
        if nerf.background_mode == "fit":
            if self._bg_param is None:
                b = nerf.background.clamp(1e-3, 1 - 1e-3)
                self._bg_param = torch.log(b / (1 - b)).clone().requires_grad_(True)
            groups.append({"params": [self._bg_param], "lr": lr * 0.1, "name": "background"})
        for g in groups:
            g["initial_lr"] = g["lr"]
        kw: dict[str, Any] = {"betas": (0.9, 0.99)}
        if nerf.device.type == "cpu":
            kw["fused"] = True
        try:
            self._opt = torch.optim.Adam(groups, **kw)
        except (RuntimeError, TypeError):
            kw.pop("fused", None)
            self._opt = torch.optim.Adam(groups, **kw)

    def _remap_optimizer(self, src: Tensor) -> None:
        """The grid's tables were re-indexed: rebuild Adam on the new tables carrying each row's
        moments over (new rows start with zero moments)."""
        old = self._opt
        old_params = [p for g in old.param_groups for p in g["params"]] if old is not None else []
        states = [old.state.get(p, {}) for p in old_params] if old is not None else []
        lrs = [g["lr"] for g in old.param_groups] if old is not None else []
        self._make_optimizer()
        assert self._opt is not None
        new_params = [p for g in self._opt.param_groups for p in g["params"]]
        for g, lr in zip(self._opt.param_groups, lrs):
            g["lr"] = lr
        for p_old, st, p_new in zip(old_params, states, new_params):
            if not st or p_new.shape == p_old.shape and p_new is p_old:
                if st:
                    self._opt.state[p_new] = st
                continue
            new_st = {}
            for k, v in st.items():
                if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == p_old.shape[0] and p_new.shape[0] == src.shape[0]:
                    nv = v[src]
                    nv[0] = 0
                    new_st[k] = nv
                elif isinstance(v, Tensor) and v.ndim >= 1 and v.shape == p_old.shape:
                    new_st[k] = v.clone()
                else:
                    new_st[k] = v
            self._opt.state[p_new] = new_st

    # -- schedule --------------------------------------------------------------------------------------
    def progress_fraction(self) -> float:
        p = 0.0
        if self.seconds:
            p = max(p, self.elapsed / self.seconds)
        if self.steps:
            p = max(p, self.step / self.steps)
        return min(p, 1.0)

    @property
    def done(self) -> bool:
        return (self.seconds is not None and self.elapsed >= self.seconds) or \
               (self.steps is not None and self.step >= self.steps)

    def _batch_size(self) -> int:
        """Rays for the next step: the sample budget over the recent samples per ray (instant-ngp's
        rule: steps cost about the same whatever the scene's state)."""
        cuda = self.nerf.device.type == "cuda"
        hash_cpu = not cuda and isinstance(self.nerf.field, HashField)
        target = self.nerf.config.batch_samples or (2 ** 18 if cuda else 2 ** 14 if hash_cpu else 2 ** 16)
        most = self.nerf.config.batch_rays or (2 ** 16 if cuda else 8192)
        if self._spr is None:
            return min(most, 1024)
        return int(max(256, min(most, target / max(self._spr, 1.0))))

    # -- one step ----------------------------------------------------------------------------------------
    def train_step(self) -> float:
        nerf = self.nerf
        if nerf.field is None or self._opt is None:
            self._setup()
        field = nerf.field
        assert field is not None and self._opt is not None and nerf.occ is not None
        p = self.progress_fraction()
        if isinstance(field, GridField):
            r = nerf.grid_res_at(p)
            if r != field.res:
                field.upsample(r)
                nerf.update_occupancy()
                self._make_optimizer()
        ratio = nerf.config.lr_final_ratio ** p
        for g in self._opt.param_groups:
            g["lr"] = g["initial_lr"] * ratio
        o, d, c = self._ray_pool()
        b = self._batch_size()
        idx = torch.randint(0, o.shape[0], (b,), generator=self._gen).to(nerf.device)
        jitter = torch.rand(b, generator=self._gen).to(nerf.device)
        ro, rd, rc = o[idx], d[idx], c[idx]
        use_dirs = not (isinstance(field, GridField) and field.sh_degree == 0)
        color, acc, n, reg = render_rays_train(field, nerf.occ, ro, rd, nerf.config.bound, nerf.step_size, jitter,
                                               use_dirs, nerf.config.distortion)
        bg = torch.sigmoid(self._bg_param) if self._bg_param is not None else nerf.background
        pred = color + (1 - acc)[:, None] * bg
        loss = torch.mean((pred - rc) ** 2)
        self._opt.zero_grad(set_to_none=True)
        total = loss + reg if reg is not None else loss
        if nerf.config.tv > 0 and isinstance(field, GridField):
            total = total + nerf.config.tv * field.tv_loss(nerf.config.tv_samples, self._gen)
        total.backward()
        self._opt.step()
        if self._bg_param is not None:
            nerf.background = torch.sigmoid(self._bg_param.detach())
        self.step += 1
        self.samples_seen += n
        self._last_samples = n
        spr = n / b
        self._spr = spr if self._spr is None else 0.7 * self._spr + 0.3 * spr
        if self.step % nerf.config.occ_every == 0:
            src = nerf.update_occupancy()
            if src is not None:
                self._remap_optimizer(src)
        return float(loss.detach())

    @torch.enable_grad()          # callers often run inside no_grad (inference code, benchmarks)
    def train(self, seconds: float | None = None, steps: int | None = None) -> dict[str, Any]:
        """Train until the budget is used (or for ``seconds`` / ``steps`` more, whichever first).
        May be called repeatedly (views added in between join). Returns the statistics so far."""
        if self.num_views == 0:
            raise ValueError("no views to fit. Fix: add_view(image, camera) first")
        if self.progress and self._bar is None and not self.done:
            from tqdm import tqdm
            if self.seconds:
                self._bar = tqdm(total=round(self.seconds, 1), unit="s", desc="nerf fit", leave=False,
                                 bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{postfix}]")
            else:
                self._bar = tqdm(total=self.steps, unit="step", desc="nerf fit", leave=False)
        bar = self._bar
        t_stop = time.perf_counter() + seconds if seconds is not None else math.inf
        s_stop = self.step + steps if steps is not None else math.inf
        tune_allocator()
        denormal = torch.set_flush_denormal(True)
        if self._tuner is None and self.nerf.device.type == "cpu" and self.nerf.config.tune_threads:
            self._tuner = ThreadTuner()
        tuner = self._tuner
        if tuner is not None:
            tuner.resume()
        try:
            while not self.done and time.perf_counter() < t_stop and self.step < s_stop:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if tuner is not None:
                    tuner.record(dt, self._last_samples)
                ps = -10 * math.log10(max(loss, 1e-10))
                self._psnr_ema = ps if self._psnr_ema is None else 0.9 * self._psnr_ema + 0.1 * ps
                if self.step % 50 == 0:
                    self.history.append((self.step, round(self.elapsed, 2), round(self._psnr_ema, 2),
                                         self._last_samples, getattr(self.nerf.field, "res", 0),
                                         round(self.nerf.occ.fraction, 4) if self.nerf.occ is not None else 1.0))
                if bar is not None:
                    bar.n = min(self.elapsed, self.seconds) if self.seconds else self.step
                    if self.step % 10 == 0 or self.done:
                        bar.set_postfix_str(f"step {self.step}, PSNR {self._psnr_ema:.2f} dB, views {self.num_views}",
                                            refresh=False)
                        bar.refresh()
        finally:
            if tuner is not None:
                tuner.restore()
            if denormal:
                torch.set_flush_denormal(False)
            if bar is not None and self.done:
                bar.close()
                self._bar = None
        return self.stats()

    def train_while(self, stream: Iterable[Any], poll: float = 0.05) -> dict[str, Any]:
        """Fit while views arrive: ``stream`` yields ``(image, camera)`` pairs (or objects with
        ``.image`` and ``.camera``); a background thread adds them as they come while this thread
        trains (it waits for the first view). Trains until the budget is used, even after the
        stream ends. Exceptions of the stream are re-raised here."""
        errors: list[BaseException] = []
        finished = threading.Event()

        def feed() -> None:
            try:
                for item in stream:
                    img, cam = (item.image, item.camera) if hasattr(item, "image") else item
                    self.add_view(img, cam)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                errors.append(e)
            finally:
                finished.set()

        th = threading.Thread(target=feed, name="nerf-views", daemon=True)
        th.start()
        while self.num_views == 0 and not finished.is_set():
            time.sleep(poll)
        while not self.done and not errors:
            if self.num_views == 0:
                break
            self.train(steps=25)
        th.join(timeout=0 if errors else None)
        if errors:
            raise errors[0]
        return self.stats()

    def stats(self) -> dict[str, Any]:
        nerf = self.nerf
        s: dict[str, Any] = {"steps": self.step, "seconds": round(self.elapsed, 3), "views": self.num_views,
                             "history": [list(h) for h in self.history],
                             "train_psnr": round(self._psnr_ema, 3) if self._psnr_ema is not None else None,
                             "steps_per_second": round(self.step / self.elapsed, 3) if self.elapsed else None,
                             "samples_per_step": round(self.samples_seen / max(self.step, 1), 1),
                             "encoding": nerf.encoding, "device": str(nerf.device),
                             "background": [round(float(x), 4) for x in nerf.background],
                             "background_mode": nerf.background_mode}
        if isinstance(nerf.field, GridField):
            s["grid_res"] = nerf.field.res
        if nerf.occ is not None:
            s["occupied_fraction"] = round(nerf.occ.fraction, 4)
        nerf.stats = s
        return s
