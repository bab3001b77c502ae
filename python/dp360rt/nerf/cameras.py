"""Cameras: the PanoHead/EG3D 25-number convention, rays, the sphere32 orbit, ``cameras.json``.

Convention
----------
A camera is **25 numbers**: the 4x4 *cam2world* matrix row-major (16 numbers), then the 3x3
*normalized* intrinsics row-major (9 numbers)::

    [r00 r01 r02 tx  r10 r11 r12 ty  r20 r21 r22 tz  0 0 0 1   fx 0 cx  0 fy cy  0 0 1]

* Camera axes are OpenCV's: **x right, y down, z forward** (the viewing direction). The columns
  of ``cam2world[:3, :3]`` are these axes in world coordinates; ``cam2world[:3, 3]`` is the
  camera centre.
* Intrinsics are in units of the image size: ``fx, cx`` in image widths, ``fy, cy`` in image
  heights (EG3D/PanoHead default ``fx = fy = 4.2647``, ``cx = cy = 0.5``), so one camera serves
  every resolution.
* Pixel (row ``i``, column ``j``) of a ``W x H`` image is the ray through the normalized image
  point ``u = (j + 0.5) / W``, ``v = (i + 0.5) / H``::

      d_cam = ((u - cx) / fx, (v - cy) / fy, 1),   d_world = R @ d_cam / |d_cam|,   o = t

  and conversely a world point ``X`` with ``p = R^T (X - t)`` lands at
  ``u = fx * p_x / p_z + cx``, ``v = fy * p_y / p_z + cy``, i.e. column ``u W - 0.5``,
  row ``v H - 0.5`` (:func:`project_points`).
* World: **+y is up** (as EG3D's look-at with up vector ``(0, 1, 0)``): a camera built by
  :func:`look_at` has its image-down axis along the projection of ``-y``, so images are upright
  and a point above the look-at point lands at a *smaller* row index.

Orbit (:func:`sphere32_cameras`): camera ``k`` of ``n = 32`` sits at azimuth
``a_k = 2 pi k / n`` and elevation ``e`` on a sphere of radius ``r`` around the look-at point ``c``::

    eye_k = c + r (cos e sin a_k,  sin e,  cos e cos a_k)

so camera 0 is in front (on +z, looking along -z, as EG3D's frontal camera; world +x is the
right side of its image), camera 8 on +x, camera 16 behind, camera 24 on -x; a positive
elevation looks down from above.

Views folder layout: PNG images plus ``cameras.json`` =
``{"views": [{"file": "000.png", "camera": [25 numbers]}, ...]}``.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..io.images import ImageError

DEFAULT_FOCAL = 4.2647          # EG3D / PanoHead normalized focal length (18.837 deg field of view)
DEFAULT_RADIUS = 2.7
CAMERA_NUMBERS = 25


class CameraError(ImageError):
    """A camera, an image or a views folder that cannot be used (a ``ValueError``); the message
    names the problem and the fix."""


def intrinsics(fx: float = DEFAULT_FOCAL, fy: float | None = None, cx: float = 0.5, cy: float = 0.5) -> Tensor:
    """The normalized 3x3 intrinsics matrix."""
    fy = fx if fy is None else fy
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def look_at(eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0), up: Sequence[float] = (0.0, 1.0, 0.0)) -> Tensor:
    """cam2world [4, 4] (float64) of a camera at ``eye`` looking at ``target``, image upright with
    respect to the world ``up`` vector (OpenCV axes: z = forward, x = z x up, y = z x x = image down)."""
    eye_t = torch.as_tensor(eye, dtype=torch.float64)
    z = torch.as_tensor(target, dtype=torch.float64) - eye_t
    if float(z.norm()) < 1e-12:
        raise CameraError("look_at: eye and target coincide. Fix: place the camera away from the look-at point")
    z = z / z.norm()
    upv = torch.as_tensor(up, dtype=torch.float64)
    x = torch.linalg.cross(z, upv)
    if float(x.norm()) < 1e-9:          # looking straight up/down: pick any horizontal right axis
        x = torch.linalg.cross(z, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, eye_t
    return m


def make_camera(cam2world: Tensor, K: Tensor | None = None) -> Tensor:
    """Pack a cam2world [4, 4] and normalized intrinsics [3, 3] into the 25-number vector (float64)."""
    K = intrinsics() if K is None else torch.as_tensor(K, dtype=torch.float64)
    return torch.cat([torch.as_tensor(cam2world, dtype=torch.float64).reshape(16), K.reshape(9)])


def orbit_cameras(n: int = 32, radius: float = DEFAULT_RADIUS, elevation_deg: float = 0.0,
                  lookat: Sequence[float] = (0.0, 0.0, 0.0), fx: float = DEFAULT_FOCAL,
                  start_azimuth_deg: float = 0.0) -> Tensor:
    """``n`` cameras evenly spaced in azimuth over 360 deg (see the module docstring) -> [n, 25] float64."""
    c = torch.as_tensor(lookat, dtype=torch.float64)
    e = math.radians(elevation_deg)
    cams = []
    for k in range(n):
        a = math.radians(start_azimuth_deg) + 2 * math.pi * k / n
        eye = c + radius * torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
        cams.append(make_camera(look_at(eye, c), intrinsics(fx)))
    return torch.stack(cams)


def sphere32_cameras(radius: float = DEFAULT_RADIUS, elevation_deg: float = 0.0,
                     lookat: Sequence[float] = (0.0, 0.0, 0.0), fx: float = DEFAULT_FOCAL) -> Tensor:
    """The sphere32 orbit: 32 cameras, azimuth ``2 pi k / 32`` (camera 0 on +z, camera 8 on +x),
    at ``radius`` around ``lookat``, all looking at it, EG3D intrinsics. [32, 25] float64."""
    return orbit_cameras(32, radius, elevation_deg, lookat, fx)


def split_camera(cam: Tensor) -> tuple[Tensor, Tensor]:
    """[..., 25] -> (cam2world [..., 4, 4], K [..., 3, 3])."""
    cam = torch.as_tensor(cam)
    if cam.shape[-1] != CAMERA_NUMBERS:
        raise CameraError(f"a camera has {cam.shape[-1]} numbers, expected {CAMERA_NUMBERS} "
                          "(4x4 cam2world row-major, then 3x3 normalized intrinsics). Fix: write all 25 numbers")
    return cam[..., :16].reshape(*cam.shape[:-1], 4, 4), cam[..., 16:].reshape(*cam.shape[:-1], 3, 3)


def camera_rays(cam: Tensor, width: int, height: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Rays of every pixel: (origins [H, W, 3], unit directions [H, W, 3]) in world coordinates,
    row-major pixel order (the convention in the module docstring)."""
    c2w, K = split_camera(torch.as_tensor(cam, dtype=torch.float64).cpu())
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    u = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    d = torch.stack([(uu - cx) / fx, (vv - cy) / fy, torch.ones_like(uu)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    d = d @ c2w[:3, :3].T
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[:3, 3].expand_as(d)
    return o.to(device=device, dtype=dtype).contiguous(), d.to(device=device, dtype=dtype).contiguous()


def project_points(cam: Tensor, points: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """World points [..., 3] -> (pixel coordinates [..., 2] as (row, column) where integer values
    are pixel centres, depth along the camera z axis [...]). Inverse of :func:`camera_rays`."""
    c2w, K = split_camera(torch.as_tensor(cam, dtype=torch.float64))
    p = (torch.as_tensor(points, dtype=torch.float64) - c2w[:3, 3]) @ c2w[:3, :3]
    z = p[..., 2]
    u = K[0, 0] * p[..., 0] / z + K[0, 2]
    v = K[1, 1] * p[..., 1] / z + K[1, 2]
    return torch.stack([v * height - 0.5, u * width - 0.5], -1), z


# ---------------------------------------------------------------------------------------------
# cameras.json and views folders
# ---------------------------------------------------------------------------------------------

def _parse_camera(entry: Any, where: str) -> Tensor:
    try:
        nums = [float(x) for x in entry]
    except (TypeError, ValueError):
        raise CameraError(f"{where}: the camera is not a list of numbers. Fix: give 25 numbers "
                          "(4x4 cam2world row-major, then 3x3 normalized intrinsics)") from None
    if len(nums) != CAMERA_NUMBERS:
        raise CameraError(f"{where}: the camera has {len(nums)} numbers, expected {CAMERA_NUMBERS} "
                          "(4x4 cam2world row-major, then 3x3 normalized intrinsics). Fix: write all 25 numbers")
    t = torch.tensor(nums, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise CameraError(f"{where}: the camera has non-finite numbers. Fix: write finite values")
    c2w, K = split_camera(t)
    if abs(float(torch.linalg.det(c2w[:3, :3]))) < 1e-6 or float(K[0, 0]) == 0 or float(K[1, 1]) == 0:
        raise CameraError(f"{where}: degenerate camera (singular rotation or zero focal length). "
                          "Fix: check the matrix order (cam2world row-major, then intrinsics)")
    return t


def read_cameras_json(path: str | Path) -> tuple[list[str | None], Tensor | None]:
    """Read ``cameras.json`` -> (file names or None per entry, cameras [N, 25] float64 or None when
    no entry has a camera). Accepts ``{"views": [...]}``, a bare list of entries, or a bare list
    of 25-number lists."""
    p = Path(path)
    if p.is_dir():
        p = p / "cameras.json"
    if not p.is_file():
        raise CameraError(f"{p} not found. Fix: write a cameras.json with "
                          '{"views": [{"file": "000.png", "camera": [25 numbers]}, ...]}')
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CameraError(f"{p} is not readable JSON ({e}). Fix: write valid JSON "
                          '{"views": [{"file": "000.png", "camera": [25 numbers]}, ...]}') from None
    views = data.get("views") if isinstance(data, dict) else data
    if not isinstance(views, list) or not views:
        raise CameraError(f'{p}: expected a non-empty "views" list. Fix: write '
                          '{"views": [{"file": "000.png", "camera": [25 numbers]}, ...]}')
    files: list[str | None] = []
    cams: list[Tensor | None] = []
    for i, v in enumerate(views):
        where = f"{p} view {i}"
        if isinstance(v, dict):
            f = v.get("file")
            if f is not None and not isinstance(f, str):
                raise CameraError(f'{where}: "file" must be a string. Fix: give the PNG file name')
            files.append(f)
            cams.append(_parse_camera(v["camera"], where) if v.get("camera") is not None else None)
        else:
            files.append(None)
            cams.append(_parse_camera(v, where))
    have = [c is not None for c in cams]
    if not any(have):
        return files, None
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise CameraError(f"{p}: views {missing[:8]} have no camera while others do. Fix: give every view a camera")
    return files, torch.stack(cams)  # type: ignore[arg-type]


def cameras_or_orbit(cams: Tensor | None, n: int, where: str | Path) -> Tensor:
    """``cams``, or when a cameras.json gave none (a generation whose poses were not recorded),
    the default orbit of ``n`` views (:func:`orbit_cameras`: radius 2.7, elevation 0, camera 0 in
    front), with a warning."""
    if cams is not None:
        return cams
    warnings.warn(f"{where} has no cameras: assuming the {n} views lie on the default orbit (radius {DEFAULT_RADIUS}, "
                  "elevation 0, camera 0 in front, evenly spaced in azimuth)")
    return orbit_cameras(n)


def resolve_cameras(cameras: Tensor | str | Path | None, n: int, conditions: Any = None) -> Tensor:
    """The cameras of ``n`` generated views -> [n, 25] float64.

    ``cameras``: a [n, 25] tensor/array, a ``cameras.json`` path, or None: then the condition
    folder's own ``cameras.json`` when ``conditions`` is a folder that has one, else the default
    orbit (:func:`orbit_cameras`: camera 0 in front, radius 2.7, elevation 0), which is how the
    authors' sphere32 condition set is read here (it ships images, not poses)."""
    where: str | Path = "cameras"
    if cameras is None:
        if isinstance(conditions, (str, Path)) and (Path(conditions) / "cameras.json").is_file():
            cameras = Path(conditions) / "cameras.json"
        else:
            return orbit_cameras(n)
    if isinstance(cameras, (str, Path)):
        where = cameras
        _, cams = read_cameras_json(cameras)
        if cams is None:
            raise CameraError(f"{cameras} lists no cameras. Fix: give each view a \"camera\" of 25 numbers")
    else:
        cams = torch.as_tensor(np.asarray(cameras) if not isinstance(cameras, Tensor) else cameras, dtype=torch.float64)
    if cams.shape != (n, CAMERA_NUMBERS):
        raise CameraError(f"{where}: expected {n} cameras of {CAMERA_NUMBERS} numbers (one per view), got shape "
                          f"{tuple(cams.shape)}. Fix: give one 25-number PanoHead camera per condition image")
    if not bool(torch.isfinite(cams).all()):
        raise CameraError(f"{where} contain NaN or Inf. Fix: give finite camera numbers")
    return cams.cpu()


def write_cameras_json(path: str | Path, cameras: Tensor | Iterable[Sequence[float]], files: Sequence[str] | None = None) -> Path:
    """Write ``{"views": [{"file": ..., "camera": [25 numbers]}, ...]}``."""
    cams = [[float(x) for x in c] for c in cameras]
    entries = []
    for i, c in enumerate(cams):
        e: dict[str, Any] = {}
        if files is not None:
            e["file"] = files[i]
        e["camera"] = c
        entries.append(e)
    from ..io.results import write_text_atomic
    return write_text_atomic(path, json.dumps({"views": entries}, indent=1))


def load_image(path: str | Path) -> Tensor:
    """A PNG (or any image PIL reads) as float32 [H, W, 3] in [0, 1]; alpha is composited over white
    (decoded as portraits are: EXIF orientation, 16-bit and float by their range, size limit)."""
    from ..io.images import open_image, to_rgb
    p = Path(path)
    if not p.is_file():
        raise CameraError(f"image {p} not found. Fix: put the file listed in cameras.json next to it")
    try:
        arr = np.asarray(to_rgb(open_image(p)), dtype=np.float32) / 255.0
    except ImageError as e:
        raise CameraError(f"cannot read image {p} ({e}). Fix: replace it with a valid PNG") from None
    return torch.from_numpy(arr.copy())


def to_image(img: Any) -> Tensor:
    """Accept [H, W, 3] / [3, H, W] tensors or arrays (float in [0, 1] or uint8), PIL images or
    paths -> float32 [H, W, 3] in [0, 1] on CPU."""
    if isinstance(img, (str, Path)):
        return load_image(img)
    if hasattr(img, "convert") and hasattr(img, "size"):         # PIL
        img = np.asarray(img.convert("RGB"))
    t = torch.as_tensor(np.asarray(img) if not isinstance(img, Tensor) else img).detach().cpu()
    if t.ndim != 3:
        raise ValueError(f"an image must be [H, W, 3] or [3, H, W], got shape {tuple(t.shape)}. Fix: pass one RGB image")
    if t.shape[-1] not in (3, 4) and t.shape[0] in (3, 4):
        t = t.permute(1, 2, 0)
    if t.shape[-1] == 4:
        a = t[..., 3:].float() / (255.0 if t.dtype == torch.uint8 else 1.0)
        rgb = t[..., :3].float() / (255.0 if t.dtype == torch.uint8 else 1.0)
        return (rgb * a + (1 - a)).contiguous()
    if t.shape[-1] != 3:
        raise ValueError(f"an image must have 3 colour channels, got shape {tuple(t.shape)}. Fix: pass RGB images")
    if t.dtype == torch.uint8:
        return t.float().div(255.0).contiguous()
    return t.float().clamp(0, 1).contiguous()


def save_image(image: Tensor, path: str | Path) -> None:
    """Write float [H, W, 3] in [0, 1] as an 8-bit PNG."""
    from PIL import Image
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    from ..io.results import write_file_atomic
    write_file_atomic(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def view_file(folder: Path, name: str, where: str) -> Path:
    """``folder / name`` when it stays inside ``folder`` (after following symlinks); an absolute
    path, ``..`` or a symlink out of the folder is refused: a views folder is self-contained, and
    a cameras.json must not make dp360rt read files elsewhere."""
    p = Path(name)
    inside = folder.resolve()
    target = (folder / p).resolve()
    if p.is_absolute() or ".." in p.parts or (target != inside and inside not in target.parents):
        raise CameraError(f'{where}: "file" {name!r} points outside the views folder {folder}. Fix: give the '
                          "name of an image inside the folder (e.g. 000.png), not an absolute path, '..' or a "
                          "symlink to elsewhere")
    return folder / p


def load_views(folder: str | Path) -> tuple[list[Tensor], Tensor, list[str]]:
    """Read a views folder -> (images [H, W, 3] float in [0, 1], cameras [N, 25] float64, file names).

    Every entry of ``cameras.json`` needs a ``file``. A folder with ``manifest.json`` (every folder
    dp360rt writes) must match it: files of another or an interrupted run raise
    :class:`~dp360rt.io.results.IncompleteRunError`; one without (hand-made) is used with a warning.
    When no entry has a camera (e.g. a generation
    whose poses were unknown), the views are assumed to lie on the default orbit
    (:func:`orbit_cameras` with N views, camera 0 in front), with a warning.
    """
    d = Path(folder)
    if not d.is_dir():
        raise CameraError(f"views folder {d} not found. Fix: pass a folder with PNG images and cameras.json")
    if not (d / "cameras.json").is_file():
        pngs = sorted(x.name for x in d.glob("*.png"))
        raise CameraError(f"{d / 'cameras.json'} not found ({len(pngs)} PNG files in the folder). Fix: write "
                          '{"views": [{"file": "000.png", "camera": [25 numbers]}, ...]} next to the images')
    files, cams = read_cameras_json(d / "cameras.json")
    if any(f is None for f in files):
        raise CameraError(f'{d / "cameras.json"}: every view needs a "file" entry naming its PNG. '
                          'Fix: write {"file": "000.png", "camera": [...]} per view')
    for i, f in enumerate(files):
        view_file(d, f, f"{d / 'cameras.json'} view {i}")  # type: ignore[arg-type]
    pngs = {x.name for x in d.glob("*.png")}
    missing = [f for f in files if not (d / f).is_file()]  # type: ignore[operator]
    if missing:
        raise CameraError(f"{d}: cameras.json lists {len(files)} views but {len(missing)} of their images are missing "
                          f"(e.g. {missing[0]}; the folder has {len(pngs)} PNGs). Fix: the image and camera counts must "
                          "match: one PNG per cameras.json entry")
    from ..io.results import check_run_folder
    if check_run_folder(d, [str(f) for f in files]) is None:
        warnings.warn(f"{d} has no manifest.json (not written by dp360rt, or by an older version): its views are "
                      "used as they are; nothing checks that they come from one run", stacklevel=2)
    cams = cameras_or_orbit(cams, len(files), d / "cameras.json")
    images = [load_image(d / f) for f in files]  # type: ignore[operator]
    return images, cams, [str(f) for f in files]


def write_views(folder: str | Path, images: Sequence[Tensor], cameras: Tensor, files: Sequence[str] | None = None) -> Path:
    """Write a views folder (PNG per view + cameras.json)."""
    d = Path(folder)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output directory {d}: {e.strerror or e}. Fix: choose a writable directory") from e
    files = list(files) if files is not None else [f"{i:03d}.png" for i in range(len(images))]
    for im, f in zip(images, files):
        save_image(im, d / f)
    write_cameras_json(d / "cameras.json", cameras, files)
    return d
