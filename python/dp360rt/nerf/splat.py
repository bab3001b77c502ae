"""3D Gaussian splats from a fitted field, in the standard 3DGS ``.ply`` layout.

:func:`init_splat_from_views` seeds the Gaussians where the field's volume-render weights
concentrate along the training views' rays (the point where each ray's opacity reaches 1/2,
with the colour rendered there), merged to about one per view pixel of surface;
:func:`init_splat` (no views) seeds one per surface voxel of the field (a voxel whose density is
high while a neighbour's is low). :func:`dp360rt.nerf.assets.export_splat` refines them against
the training views (:mod:`.splat_refine`) and writes them with :func:`write_splat_ply`;
:func:`read_splat_ply` reads the file back.

File layout (binary little endian, one ``vertex`` element, float32 properties in this order):
``x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3``. Colour is SH degree 0
(``f_dc = (rgb - 0.5) / C0``); the 45 ``f_rest`` are written as zeros so viewers that expect
degree 3 load it too. ``opacity`` is a logit, ``scale_*`` natural logs, ``rot_*`` a quaternion
(w, x, y, z).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import Nerf

SH_C0 = 0.28209479177387814
N_REST = 45
PLY_PROPERTIES = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                  + [f"f_rest_{i}" for i in range(N_REST)]
                  + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
MAX_SPLATS = 2_000_000


class EmptyFieldError(ValueError):
    """The field has nothing occupied above the threshold: there is no surface to export."""


def surface_points(nerf: "Nerf", resolution: int = 64, level: float = 10.0, chunk: int = 1 << 16
                   ) -> tuple[Tensor, Tensor, float]:
    """Centres of the field's surface voxels on a ``resolution``^3 grid over the box ->
    (x01 [M, 3] in the unit cube, density [M], voxel side in world units). A surface voxel has
    density >= ``level`` and at least one of its 6 neighbours below it. Raises
    :class:`EmptyFieldError` when there are none."""
    if nerf.field is None or nerf.occ is None:
        raise RuntimeError("the field is not fitted. Fix: fit or load a model first")
    r = resolution
    ax = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    nerf.field.eval()
    dens = []
    with torch.no_grad():
        for s in range(0, pts.shape[0], chunk):
            p = pts[s:s + chunk].to(nerf.device)
            sig = nerf.field.density(p).float()
            dens.append(torch.where(nerf.occ.lookup(p), sig, torch.zeros_like(sig)).cpu())
    vol = torch.cat(dens).reshape(r, r, r)
    inside = vol >= level
    # a voxel is on the surface when some neighbour is outside: min-pool of `inside` via max-pool of its negation
    outside_near = torch.nn.functional.max_pool3d((~inside).float()[None, None], 3, 1, 1, ceil_mode=False)[0, 0] > 0
    surf = (inside & outside_near).reshape(-1)
    if not bool(surf.any()):
        raise EmptyFieldError(f"the field has no surface (no voxel of {r}^3 reaches density {level:g}, max "
                              f"{float(vol.max()):.3g}): nothing to export. Fix: fit the NeRF longer, or lower --level")
    return pts[surf], vol.reshape(-1)[surf], 2 * nerf.config.bound / r


def init_splat(nerf: "Nerf", resolution: int = 64, level: float = 10.0, max_splats: int = 200_000,
               seed: int = 0) -> dict[str, Tensor]:
    """Gaussians from the field's surface voxels (:func:`surface_points`; at most ``max_splats``,
    a random subset when more) -> params {"means" [N, 3] world, "log_scales" [N, 3],
    "quats" [N, 4] (w, x, y, z), "logit_opacity" [N], "f_dc" [N, 3]} (float32, CPU). Each is an
    isotropic Gaussian of about the voxel's size, opacity from the voxel's alpha, colour the
    field's colour seen from outside (looking toward the box centre)."""
    x01, sig, side = surface_points(nerf, resolution, level)
    if x01.shape[0] > max_splats:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x01.shape[0], generator=g)[:max_splats]
        x01, sig = x01[keep], sig[keep]
    b = nerf.config.bound
    means = x01 * (2 * b) - b
    dirs = -means / means.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    with torch.no_grad():
        cols = []
        for s in range(0, x01.shape[0], 1 << 16):
            _, rgb = nerf.field(x01[s:s + (1 << 16)].to(nerf.device), dirs[s:s + (1 << 16)].to(nerf.device))  # type: ignore[misc]
            cols.append(rgb.float().cpu())
    rgb = torch.cat(cols).clamp(0, 1)
    alpha = (-torch.expm1(-sig * side)).clamp(0.05, 0.95)
    n = means.shape[0]
    return {"means": means.float().contiguous(),
            "log_scales": torch.full((n, 3), math.log(0.6 * side)),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "logit_opacity": torch.logit(alpha).float(),
            "f_dc": ((rgb - 0.5) / SH_C0).float()}


def median_depth(nerf: "Nerf", o: Tensor, d: Tensor, chunk: int = 4096) -> Tensor:
    """Distance along each ray (o, d [B, 3] world, d unit) where its opacity reaches 1/2 (the
    median of the volume-render weights: unlike their mean it never lies in the empty space
    between two surfaces) -> [B], the ray's far end where it never does."""
    from .render import occupied_range, sampled_densities
    step, b = nerf.step_size, nerf.config.bound
    out = []
    for s in range(0, o.shape[0], chunk):
        oc, dc = o[s:s + chunk].to(nerf.device), d[s:s + chunk].to(nerf.device)
        near, far = occupied_range(nerf.occ, oc, dc, b)
        t, sigma = sampled_densities(nerf.field, nerf.occ, oc, dc, near, far, b, step)      # [R, K]
        k = t.shape[1]
        reached = torch.cumsum(sigma * step, 1) >= math.log(2.0)                            # 1 - exp(-sum) >= 1/2
        first = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(far, k - 1, dtype=torch.long))
        out.append(t.gather(1, first[:, None])[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0)      # a view that shows nothing has no rays here


def expected_surface(nerf: "Nerf", cameras: Tensor, width: int, height: int, max_side: int = 256,
                     min_opacity: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Where the field's volume-render weights concentrate along the rays of ``cameras`` ([N, 25],
    views ``width`` x ``height``, rendered at most ``max_side`` pixels a side): the surface point
    (:func:`median_depth`) of every pixel whose opacity is at least ``min_opacity`` -> (points
    [M, 3] world, rgb [M, 3] the rendered colour without the background, footprint [M] the world
    size of one view pixel there)."""
    from .cameras import camera_rays, split_camera
    k = min(1.0, max_side / max(width, height))
    w, h = max(1, round(width * k)), max(1, round(height * k))
    bg = nerf.background.detach().cpu().float()
    pts, cols, feet = [], [], []
    nerf.field.eval()                                                                       # type: ignore[union-attr]
    with torch.no_grad():
        for cam in torch.as_tensor(cameras, dtype=torch.float64):
            r = nerf.render(cam, w, h)
            o, d = camera_rays(cam, w, h)
            keep = r["opacity"] >= min_opacity
            a = r["opacity"][keep][:, None]
            depth = median_depth(nerf, o[keep], d[keep])
            pts.append(o[keep] + d[keep] * depth[:, None])
            cols.append(((r["rgb"][keep] - (1 - a) * bg) / a).clamp(0, 1))
            feet.append(depth / (float(split_camera(cam)[1][0, 0]) * width))   # focal length in view pixels
    return torch.cat(pts), torch.cat(cols), torch.cat(feet)


def merge_in_cells(points: Tensor, rgb: Tensor, cell: float, max_count: int) -> tuple[Tensor, Tensor, float]:
    """One point per occupied cube of side ``cell`` (mean position and colour of the points in
    it); the cell grows until at most ``max_count`` remain -> (points [K, 3], rgb [K, 3], cell)."""
    while True:
        key = torch.floor(points / cell).long()
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)
        if uniq.shape[0] <= max_count:
            break
        # points on a surface: the count falls with the square of the cell side
        cell *= 1.05 * math.sqrt(uniq.shape[0] / max_count)
    n = torch.bincount(inv, minlength=uniq.shape[0]).float()[:, None]
    mean = lambda v: torch.zeros(uniq.shape[0], v.shape[1]).index_add_(0, inv, v.float()) / n   # noqa: E731
    return mean(points), mean(rgb), cell


def init_splat_from_views(nerf: "Nerf", cameras: Tensor, width: int, height: int, max_splats: int = 200_000,
                          cell_pixels: float = 1.0, opacity: float = 0.5) -> dict[str, Tensor]:
    """Gaussians on the field's expected surface seen by the training ``cameras`` ([N, 25],
    views ``width`` x ``height``; :func:`expected_surface`), merged to one per cube of about
    ``cell_pixels`` view pixels (larger when more than ``max_splats`` would remain) -> params
    like :func:`init_splat`: isotropic, as large as the cube, ``opacity``, the rendered colour.
    Raises :class:`EmptyFieldError` when no ray reaches the surface."""
    pts, rgb, foot = expected_surface(nerf, cameras, width, height)
    if pts.shape[0] == 0:
        raise EmptyFieldError("no training ray reaches the field's surface (opacity >= 0.5): nothing to export. "
                              "Fix: fit the NeRF longer, or check the views' cameras")
    means, cols, cell = merge_in_cells(pts, rgb, cell_pixels * float(foot.median()), max_splats)
    n = means.shape[0]
    return {"means": means.contiguous(),
            "log_scales": torch.full((n, 3), math.log(0.5 * cell)),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
            "logit_opacity": torch.full((n,), math.log(opacity / (1 - opacity))),
            "f_dc": ((cols - 0.5) / SH_C0).float()}


def write_splat_ply(params: dict[str, Tensor], path: str | Path) -> Path:
    """Write ``params`` (see :func:`init_splat`) to ``path`` as a standard 3DGS ``.ply`` (layout
    in the module docstring), atomically (temporary name, then rename)."""
    from ..io.results import write_file_atomic
    n = int(params["means"].shape[0])
    data = np.zeros((n, len(PLY_PROPERTIES)), np.float32)
    data[:, 0:3] = params["means"].detach().cpu().numpy()
    data[:, 6:9] = params["f_dc"].detach().cpu().numpy()
    o = 9 + N_REST
    data[:, o] = params["logit_opacity"].detach().cpu().numpy()
    data[:, o + 1:o + 4] = params["log_scales"].detach().cpu().numpy()
    q = params["quats"].detach().cpu()
    data[:, o + 4:o + 8] = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
    header = "ply\nformat binary_little_endian 1.0\ncomment dp360rt gaussian splat (sh degree 0)\n" \
             f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in PLY_PROPERTIES) + "end_header\n"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(data.astype("<f4").tobytes())
    return write_file_atomic(path, write)


def read_splat_ply(path: str | Path) -> dict[str, Any]:
    """Read a binary little-endian 3DGS ``.ply`` -> {"properties": [names in file order],
    "count": N, "data": float32 [N, P]} plus params {"means", "f_dc", "logit_opacity",
    "log_scales", "quats"} as tensors. Raises ``ValueError`` naming what is wrong with the file."""
    p = Path(path)
    raw = p.read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{p} is not a PLY file. Fix: pass a .ply written by `dp360rt nerf export --splat`")
    lines = raw[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{p}: not binary little endian. Fix: write the splat with `dp360rt nerf export --splat`")
    count, props = 0, []
    for ln in lines:
        parts = ln.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            if parts[1] != "float":
                raise ValueError(f"{p}: property {parts[-1]} is {parts[1]}, expected float")
            props.append(parts[2])
    body = raw[end + len(b"end_header\n"):]
    if len(body) != count * len(props) * 4:
        raise ValueError(f"{p}: {len(body)} data bytes for {count} vertices of {len(props)} floats. Fix: the file is truncated; export it again")
    data = np.frombuffer(body, "<f4").reshape(count, len(props)).astype(np.float32)
    col = {name: i for i, name in enumerate(props)}
    t = lambda names: torch.from_numpy(data[:, [col[n] for n in names]].copy())   # noqa: E731
    return {"properties": props, "count": count, "data": data,
            "means": t(["x", "y", "z"]), "f_dc": t(["f_dc_0", "f_dc_1", "f_dc_2"]),
            "logit_opacity": t(["opacity"])[:, 0], "log_scales": t(["scale_0", "scale_1", "scale_2"]),
            "quats": t(["rot_0", "rot_1", "rot_2", "rot_3"])}
