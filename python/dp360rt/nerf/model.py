"""The fitted radiance field: :class:`Nerf` (field + occupancy grid + background; render,
evaluate, snapshot, save/load) and :class:`NerfConfig` (its model and training options, saved with
it). Training lives in :mod:`.fit` (:meth:`Nerf.fit` / :meth:`Nerf.fitter` hand over to it).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..io.checks import positive_float, positive_int
from ..io.checks import device as check_device
from ._threads import threads
from .cameras import CameraError, camera_rays, to_image
from .field import GridField, HashField, build_field
from .glb import DEFAULT_TEXTURE, DEFAULT_TRIANGLES
from .occupancy import OccupancyGrid, ViewCarver
from .render import march

if TYPE_CHECKING:  # pragma: no cover
    from .fit import Fitter

FORMAT_VERSION = 1
MAX_RENDER_SIDE = 8192           # pixels per side of a render (67 MP): more is a typo, not a request
GRID_RES_RANGE = (8, 1024)       # a dense grid of 1024^3 already needs about 17 GB


@dataclass
class NerfConfig:
    """Model and training options (saved with the model as JSON)."""
    encoding: str = "auto"            # "grid" | "hash" | "auto" (grid on CPU, hash on CUDA)
    bound: float = 0.5                # scene box [-bound, bound]^3 (world units)
    background: Any = "auto"          # "auto" | "fit" | "white" | "black" | [r, g, b] in [0, 1]
    device: str = "auto"              # "auto" (cuda when available) | "cpu" | "cuda" | ...
    seed: int = 0
    # dense voxel grid
    grid_res: int = 128
    grid_schedule: tuple = ((0.0, 0.25), (0.12, 0.5), (0.3, 0.75), (0.5, 1.0))   # (progress, fraction of grid_res)
    sh_degree: int = 0
    density_scale: float = 100.0
    density_init: float = 5.0          # initial density inside the views' hull (per world unit)
    # hash grid (instant-ngp defaults)
    hash_levels: int = 16
    hash_features: int = 2
    hash_log2_table: int = 19
    hash_base_res: int = 16
    hash_max_res: int = 0             # 0: the training images' resolution (max of width, height)
    hash_backend: str = "auto"        # "auto" | "tcnn" | "triton" | "torch"
    # training
    batch_samples: int = 0            # target field samples per step: 0 = 2^16 on CPU, 2^18 on CUDA
    batch_rays: int = 0               # most rays per step: 0 = 8192 on CPU, 2^16 on CUDA
    lr: float = 0.0                   # 0: 0.1 for the grid, 0.01 for the hash field
    lr_final_ratio: float = 0.1
    step_ratio: float = 1.0           # sample step in voxels (grid) / finest cells (hash)
    occ_threshold: float = 1e-3       # per-step opacity below which a cell is empty
    occ_every: int = 16
    distortion: float = 0.0           # weight of the distortion loss (mip-NeRF 360), 0 = off
    tv: float = 1e-4                  # weight of total variation on the voxel grid (0 = off): +0.5 dB held-out on textured scenes
    tv_samples: int = 8192            # vertices per step it is evaluated on
    # free space from the views (visual hull; needs a known, fixed background)
    carve: bool = True
    carve_tol: float = 0.01           # max |pixel - background| of a background pixel
    carve_min_votes: int = 2          # background votes that make a cell empty
    carve_res: int = 64
    tune_threads: bool = True         # CPU: pick 1 or all threads by measured speed (shared machines)

    def __post_init__(self) -> None:
        self.bound = positive_float(self.bound, "bound")
        self.grid_res = positive_int(self.grid_res, "grid_res", minimum=GRID_RES_RANGE[0], maximum=GRID_RES_RANGE[1])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NerfConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "grid_schedule" in known:
            known["grid_schedule"] = tuple(tuple(x) for x in known["grid_schedule"])
        return cls(**known)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio (dB, peak 1) of images ``a`` and ``b`` (same shape, values in
    [0, 1]); 100 for identical images."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


class Nerf:
    """A radiance field in the box ``[-bound, bound]^3`` with its occupancy grid and background.

    >>> nerf = Nerf()                                  # doctest: +SKIP
    >>> stats = nerf.fit(images, cameras, seconds=120) # doctest: +SKIP
    >>> out = nerf.render(camera, 64, 64)              # {'rgb', 'depth', 'opacity'}  # doctest: +SKIP
    >>> nerf.save("fitted"); Nerf.load("fitted")       # doctest: +SKIP
    """

    def __init__(self, config: NerfConfig | None = None, **overrides: Any):
        cfg = config or NerfConfig()
        if overrides:
            cfg = NerfConfig.from_dict({**asdict(cfg), **overrides})
        self.config = cfg
        self.device = resolve_device(cfg.device)
        enc = cfg.encoding
        if enc == "auto":
            enc = "hash" if self.device.type == "cuda" else "grid"
        if enc not in ("grid", "hash"):
            raise ValueError(f"unknown encoding {cfg.encoding!r}. Fix: use 'grid', 'hash' or 'auto'")
        self.encoding = enc
        self.field: torch.nn.Module | None = None
        self.occ: OccupancyGrid | None = None
        self.background = torch.ones(3, device=self.device)
        self.background_mode = "fixed"
        self.image_size: tuple[int, int] | None = None     # (width, height) of the training views
        self.carver: ViewCarver | None = None
        self.camera_info: dict[str, Any] | None = None      # mean radius / elevation / focal of the training cameras
        self.stats: dict[str, Any] = {}

    # -- construction --------------------------------------------------------------------------------
    def _build(self, image_size: tuple[int, int]) -> None:
        cfg = self.config
        self.image_size = image_size
        torch.manual_seed(cfg.seed)
        if self.encoding == "grid":
            r0 = self.grid_res_at(0.0)
            self.field = GridField(r0, cfg.sh_degree, cfg.density_scale, cfg.density_init).to(self.device)
            self.occ = OccupancyGrid(r0 - 1, self.device)
        else:
            max_res = cfg.hash_max_res or max(image_size)
            self.field = HashField(cfg.hash_levels, cfg.hash_features, cfg.hash_log2_table, cfg.hash_base_res,
                                   max_res, backend=cfg.hash_backend, seed=cfg.seed).to(self.device)
            self.occ = OccupancyGrid(128 if self.device.type == "cuda" else 32, self.device)

    def grid_res_at(self, p: float) -> int:
        frac = [f for q, f in self.config.grid_schedule if p >= q][-1] if self.config.grid_schedule else 1.0
        return max(8, int(round(self.config.grid_res * frac)))

    @property
    def step_size(self) -> float:
        """Sample spacing along rays (world units)."""
        b = self.config.bound
        if isinstance(self.field, GridField):
            return self.config.step_ratio * 2 * b / (self.field.res - 1)
        assert isinstance(self.field, HashField)
        return 2 * b * max(math.sqrt(3) / 1024, self.config.step_ratio / self.field.cfg["max_res"])

    @torch.no_grad()
    def update_occupancy(self) -> Tensor | None:
        """Refresh the occupancy grid (density, and the views' free space while fitting). For the
        voxel grid this also drops the parameters of vertices no occupied cell touches; returns
        then the old row of each new parameter row (for carrying optimizer state), else None."""
        assert self.field is not None and self.occ is not None
        carve = self.carver.mask if self.carver is not None else None
        if isinstance(self.field, GridField):
            if self.occ.res != self.field.res - 1:
                self.occ = OccupancyGrid(self.field.res - 1, self.device)
            sigma = self.field.vertex_density()
            alpha = -torch.expm1(-sigma * self.step_size)
            self.occ.set_from_vertex_alpha(alpha, self.config.occ_threshold, dilate=1)
            if carve is not None:
                self.occ.set_mask(self.occ.mask & carve(self.occ.res).to(self.device))
            return self.field.set_active_cells(self.occ.mask)
        self.occ.update_from_density(self.field.density, self.step_size, self.config.occ_threshold)
        if carve is not None:
            self.occ.set_mask(self.occ.mask & carve(self.occ.res).to(self.device))
        return None

    # -- fitting -------------------------------------------------------------------------------------
    def fitter(self, seconds: float | None = None, steps: int | None = None, progress: bool = True) -> "Fitter":
        from .fit import Fitter          # the fitter builds on this module: import it when used
        return Fitter(self, seconds=seconds, steps=steps, progress=progress)

    def fit(self, views: Iterable[Any], cameras: Tensor | Sequence[Sequence[float]], seconds: float | None = None,
            steps: int | None = None, progress: bool = True, holdout: tuple[Sequence[Any], Tensor] | None = None
            ) -> dict[str, Any]:
        """Fit to ``views`` (images, see :func:`to_image`) seen by ``cameras`` ([N, 25]) for
        ``seconds`` of training and/or ``steps`` steps (at least one must be given). Returns
        statistics (steps, seconds, training PSNR, held-out PSNR when ``holdout=(images, cameras)``)."""
        views = list(views)
        cams = torch.as_tensor(cameras, dtype=torch.float64)
        if cams.ndim != 2 or cams.shape[1] != 25:
            raise CameraError(f"cameras must be [N, 25], got shape {tuple(cams.shape)}. Fix: 25 numbers per camera")
        if len(views) != cams.shape[0]:
            raise CameraError(f"{len(views)} images but {cams.shape[0]} cameras. Fix: give one camera per image")
        f = self.fitter(seconds=seconds, steps=steps, progress=progress)
        for v, c in zip(views, cams):
            f.add_view(v, c)
        stats = f.train()
        if holdout is not None:
            scores = self.evaluate(*holdout)
            stats["holdout_psnr"] = scores
            stats["holdout_psnr_mean"] = float(np.mean(scores))
        self.stats = stats
        return stats

    # -- rendering -----------------------------------------------------------------------------------
    @torch.no_grad()
    def render_rays(self, o: Tensor, d: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor, Tensor]:
        """Rays (world) -> (rgb [B, 3] with background, depth [B], opacity [B])."""
        if self.field is None or self.occ is None:
            raise RuntimeError("the field is not fitted yet. Fix: call fit() or Nerf.load() first")
        o, d = o.to(self.device, torch.float32), d.to(self.device, torch.float32)
        use_dirs = not (isinstance(self.field, GridField) and self.field.sh_degree == 0)
        rgbs, depths, accs = [], [], []
        with threads(self.device):
            for s in range(0, o.shape[0], chunk):
                c, a, dep = march(self.field, self.occ, o[s:s + chunk], d[s:s + chunk], self.config.bound,
                                  self.step_size, use_dirs=use_dirs)
                rgbs.append(c + (1 - a)[:, None] * self.background.to(c.dtype))
                depths.append(dep)
                accs.append(a)
        return torch.cat(rgbs).clamp(0, 1), torch.cat(depths), torch.cat(accs)

    def render(self, camera: Tensor | Sequence[float], width: int | None = None, height: int | None = None
               ) -> dict[str, Tensor]:
        """Render one camera (25 numbers) -> {"rgb": [H, W, 3] in [0, 1], "depth": [H, W] (expected
        distance along the ray, 0 where nothing is hit), "opacity": [H, W]} on the CPU. Size defaults
        to the training views' resolution."""
        if self.image_size is None and (width is None or height is None):
            raise ValueError("render needs width and height (no training views known). Fix: pass width= and height=")
        w = self.image_size[0] if width is None else positive_int(width, "width", MAX_RENDER_SIDE)   # type: ignore[index]
        h = self.image_size[1] if height is None else positive_int(height, "height", MAX_RENDER_SIDE)  # type: ignore[index]
        if self.field is not None:
            self.field.eval()
        o, d = camera_rays(torch.as_tensor(camera, dtype=torch.float64), w, h, device=self.device)
        rgb, depth, acc = self.render_rays(o.reshape(-1, 3), d.reshape(-1, 3))
        return {"rgb": rgb.reshape(h, w, 3).cpu(), "depth": depth.reshape(h, w).cpu(), "opacity": acc.reshape(h, w).cpu()}

    def evaluate(self, images: Sequence[Any], cameras: Tensor) -> list[float]:
        """PSNR of renders against ``images`` (rendered at each image's size)."""
        out = []
        for img, cam in zip(images, torch.as_tensor(cameras, dtype=torch.float64)):
            im = to_image(img)
            r = self.render(cam, im.shape[1], im.shape[0])["rgb"]
            out.append(psnr(r, im))
        return out

    @torch.no_grad()
    def snapshot(self) -> "Nerf":
        """A frozen copy of the fitted state (field, occupancy, background) for rendering while
        training goes on: a training step updates the tables in place and may re-index or resample
        them, so a render must never read the live field. Call it between training steps."""
        import copy
        if self.field is None or self.occ is None:
            raise RuntimeError("nothing to snapshot: the field is not fitted. Fix: train at least one step first")
        snap = Nerf(self.config)
        snap.encoding = self.encoding
        snap.field = copy.deepcopy(self.field)
        for p in snap.field.parameters():        # the copy is never trained: drop gradients
            p.grad = None
            p.requires_grad_(False)
        snap.occ = copy.deepcopy(self.occ)
        snap.background = self.background.detach().clone()
        snap.background_mode = self.background_mode
        snap.image_size = self.image_size
        snap.camera_info = dict(self.camera_info) if self.camera_info else None
        snap.stats = dict(self.stats)
        return snap

    # -- portable assets -----------------------------------------------------------------------------
    def export_glb(self, path: str | Path, triangles: int = DEFAULT_TRIANGLES, texture_size: int = DEFAULT_TEXTURE,
                   resolution: int = 128, level: float | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Textured glTF 2.0 binary of the surface; see :func:`dp360rt.nerf.assets.export_glb`."""
        from .assets import export_glb
        return export_glb(self, path, triangles=triangles, texture_size=texture_size, resolution=resolution,
                          level=level, overwrite=overwrite)

    def export_splat(self, path: str | Path, views: Any = None, steps: int = 300, resolution: int = 64,
                     level: float = 10.0, max_splats: int = 60_000, overwrite: bool = False) -> dict[str, Any]:
        """Standard 3DGS ``.ply`` refined against ``views``; see :func:`dp360rt.nerf.assets.export_splat`."""
        from .assets import export_splat
        return export_splat(self, path, views=views, steps=steps, resolution=resolution, level=level,
                            max_splats=max_splats, overwrite=overwrite)

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` (field, occupancy, background) and ``config.json``."""
        from safetensors.torch import save_file
        if self.field is None or self.occ is None:
            raise RuntimeError("nothing to save: the field is not fitted. Fix: call fit() first")
        d = Path(folder)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create {d}: {e.strerror or e}. Fix: choose a writable --out directory") from e
        tensors = {f"field.{k}": v.detach().cpu().contiguous() for k, v in self.field.export_state().items()}  # type: ignore[operator]
        tensors["occupancy.mask"] = self.occ.state_dict()["mask"].cpu().contiguous()
        tensors["background"] = self.background.detach().cpu().float().contiguous()
        meta = {"format": "dp360rt-nerf", "version": FORMAT_VERSION, "config": asdict(self.config),
                "encoding": self.encoding, "field": self.field.config(),  # type: ignore[operator]
                "background_mode": self.background_mode, "image_size": list(self.image_size or (0, 0)),
                "camera_info": self.camera_info,
                "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float, str, list))}}
        from ..io.results import write_file_atomic, write_text_atomic
        write_file_atomic(d / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        write_text_atomic(d / "config.json", json.dumps(meta, indent=1))   # last: a folder without it is not a NeRF
        return d

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> "Nerf":
        from safetensors.torch import load_file
        d = Path(folder)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise ValueError(f"{d} is not a fitted NeRF (config.json and model.safetensors expected). "
                             "Fix: pass the --out directory of `nerf fit`")
        meta = json.loads((d / "config.json").read_text())
        if meta.get("format") != "dp360rt-nerf":
            raise ValueError(f"{d / 'config.json'} is not a dp360rt NeRF config. Fix: pass the --out directory of `nerf fit`")
        cfg = NerfConfig.from_dict(meta["config"])
        if device is not None:
            cfg.device = device
        nerf = cls(cfg)
        nerf.encoding = meta["encoding"]
        fcfg = dict(meta["field"])
        if fcfg["kind"] == "hash":
            fcfg["backend"] = cfg.hash_backend
        nerf.field = build_field(fcfg).to(nerf.device)
        tensors = load_file(str(d / "model.safetensors"))
        state = {k[len("field."):]: v for k, v in tensors.items() if k.startswith("field.")}
        nerf.field.import_state(state)  # type: ignore[operator]
        nerf.field.to(nerf.device)
        nerf.occ = OccupancyGrid(int(tensors["occupancy.mask"].shape[0]), nerf.device)
        nerf.occ.load_state_dict({"mask": tensors["occupancy.mask"].to(nerf.device)})
        nerf.background = tensors["background"].to(nerf.device)
        nerf.background_mode = meta.get("background_mode", "fixed")
        w, h = meta.get("image_size", [0, 0])
        nerf.image_size = (int(w), int(h)) if w and h else None
        nerf.stats = meta.get("stats", {})
        nerf.camera_info = meta.get("camera_info")
        return nerf
