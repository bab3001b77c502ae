"""Image input/output: portraits, the authors' camera condition folders, 8-bit round trips.

Policy for portraits (any size, any mode): converted to RGB (alpha composited on white), center
cropped to a square, resized to the model resolution (512 for the official checkpoints) with
Pillow's bicubic filter, mapped to [-1, 1]. For a square input this equals the authors' transform.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

CONDITION_COUNT = 32
BACK_CONDITION_INDEX = 18          # 0000018.png is the view from behind (the back-view hint)
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An input image or folder cannot be used; the message names the problem and the fix."""


def open_image(path: str | Path) -> Image.Image:
    """Open and decode an image file with its EXIF orientation applied (phone photos come out
    upright). The size is checked from the header before any pixel is decoded: more than
    :data:`MAX_PIXELS` pixels is refused. Raises :class:`ImageError` naming the problem and fix."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file. Fix: pass the PNG or JPEG file itself")
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes). Fix: pass a PNG or JPEG image")
    # Pillow warns above its own MAX_IMAGE_PIXELS and refuses above twice that (DecompressionBombError,
    # caught below); the size is checked against ours from the header. Pillow's limit is left as the
    # caller set it: it is global state of every other user of Pillow in the process.
    too_large = f"Fix: downscale it to at most {MAX_PIXELS // 1_000_000} MP (e.g. 2048x2048 is plenty)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(f"{path} is too large: {img.width}x{img.height} = {img.width * img.height / 1e6:.0f} MP, "
                             f"more than {MAX_PIXELS // 1_000_000} MP. {too_large}")
        img.load()
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as e:
        raise ImageError(f"{path} is not an image Pillow can read. Fix: pass a PNG or JPEG file") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large ({e}). {too_large}") from e
    except (OSError, SyntaxError) as e:
        raise ImageError(f"{path} could not be decoded ({e}); it may be truncated. Fix: re-export the image") from e
    return img


# Modes whose samples are not 8-bit: Pillow's own convert("RGB") clips them to 0..255.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float gray image -> 8-bit "L" by the range of its format:
    16-bit modes (and "I" holding 0..65535, as 16-bit PNGs decode) by 65535; float ("F") by the
    smallest of 1, 255, 65535 that holds its values (float images are usually in [0, 1]); other
    "I" data by its own min..max."""
    a = np.asarray(img).astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError(f"the {img.mode} image contains NaN or Inf pixels. Fix: pass an image with finite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 65535:
        a = a / next(r for r in (1.0, 255.0, 65535.0) if hi <= r)
    else:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels become white (the generated views' background);
    16-bit and float images are scaled by their real range (see :func:`_high_bit_to_l`)."""
    if img.mode in HIGH_BIT_MODES:
        img = _high_bit_to_l(img)
    if img.mode in ("La", "RGBa"):             # premultiplied alpha: undo it first
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"images of mode {img.mode} cannot be converted to RGB ({e}). "
                         "Fix: save the portrait as an 8-bit RGB PNG or JPEG") from e


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (a - 0.5) / 0.5


def load_portrait(source: str | Path | Image.Image | Tensor, size: int = 512) -> Tensor:
    """A portrait as the model sees it: [1, 3, size, size] in [-1, 1].

    Accepts a path, a PIL image, or a tensor [3, H, W] / [1, 3, H, W] already in [-1, 1].
    """
    if isinstance(source, Tensor):
        t = source[None] if source.dim() == 3 else source
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
            raise ImageError(f"portrait tensor must be [3, H, W] or [1, 3, H, W], got {tuple(source.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ImageError("portrait tensor contains NaN or Inf. Fix: pass finite values in [-1, 1]")
        if t.shape[2:] != (size, size):
            raise ImageError(f"portrait tensor is {tuple(t.shape[2:])}, the model needs {size}x{size}. "
                             "Fix: pass an image file or PIL image (resized automatically)")
        return t.float()
    img = ImageOps.exif_transpose(source) if isinstance(source, Image.Image) else open_image(source)
    if img.width < 1 or img.height < 1:
        raise ImageError("portrait image is empty (0 pixels)")
    img = to_rgb(img)
    s = min(img.width, img.height)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    return pil_to_tensor(img)[None]


def condition_files(folder: str | Path, count: int = CONDITION_COUNT) -> list[Path]:
    """The authors' camera condition files ``0000000.png`` ... in order; validates the folder."""
    d = Path(folder)
    if not d.is_dir():
        raise ImageError(f"condition folder not found: {d}. Fix: pass the authors' cam_condition/sphere32 folder")
    files = [d / f"{i:07d}.png" for i in range(count)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        found = len(list(d.glob("*.png")))
        raise ImageError(f"condition folder {d} must hold {count} files 0000000.png ... {count - 1:07d}.png; "
                         f"missing {len(missing)} (e.g. {', '.join(missing[:3])}), {found} PNGs found. "
                         "Fix: pass the authors' sphere32 folder unchanged")
    return files


def load_conditions(folder: str | Path, size: int = 512, count: int = CONDITION_COUNT) -> Tensor:
    """The camera condition images as pose hints: [count, 3, size, size] in [-1, 1]."""
    out = []
    first = None
    for f in condition_files(folder, count):
        img = open_image(f)
        if first is None:
            first = img.size
        elif img.size != first:
            raise ImageError(f"condition images differ in size: {f.name} is {img.size}, the first is {first}. "
                             "Fix: use one consistent set of condition renders")
        out.append(pil_to_tensor(to_rgb(img).resize((size, size), Image.BICUBIC)))
    return torch.stack(out)


def load_frames(folder: str | Path, size: int = 512, count: int = CONDITION_COUNT) -> Tensor:
    """Feature images for the 3D-aware start (PNG frames in name order): [count, 3, size, size]."""
    d = Path(folder)
    files = sorted(d.glob("*.png")) + sorted(d.glob("*.jpg"))
    if len(files) != count:
        raise ImageError(f"feature folder {d} must hold exactly {count} PNG/JPEG frames, found {len(files)}")
    return torch.stack([pil_to_tensor(to_rgb(open_image(f)).resize((size, size), Image.BICUBIC)) for f in files])


def check_conditions(cond: Tensor, size: int, frames: int, features: Tensor | None = None) -> None:
    """Refuse condition images (and feature frames) a generation cannot use, before any model
    runs: cond [N, 3, size, size] finite, N a multiple of the window length ``frames`` and past
    the back-view hint (index 18); features, when given, of cond's shape and finite."""
    if cond.dim() != 4 or cond.shape[1:] != (3, size, size):
        raise ImageError(f"conditions must be [N, 3, {size}, {size}], got {tuple(cond.shape)}. Fix: pass the "
                         "condition folder, or condition images at the model's resolution")
    if cond.shape[0] % frames:
        raise ImageError(f"{cond.shape[0]} condition images cannot be split into windows of {frames} frames (N must "
                         f"be a multiple of {frames}). Fix: pass the whole sphere32 set ({CONDITION_COUNT} images)")
    if cond.shape[0] <= BACK_CONDITION_INDEX:
        raise ImageError(f"need at least {BACK_CONDITION_INDEX + 1} condition images (index {BACK_CONDITION_INDEX} "
                         f"is the back-view hint), got {cond.shape[0]}. Fix: pass the whole sphere32 set")
    if not bool(torch.isfinite(cond).all()):
        raise ImageError("condition images contain NaN or Inf. Fix: pass finite values in [-1, 1]")
    if features is not None:
        if not isinstance(features, Tensor) or features.shape != cond.shape:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ImageError(f"feature frames {got} must match the conditions {tuple(cond.shape)}. Fix: one "
                             "feature frame per condition image (a tensor, or a folder via load_frames)")
        if not bool(torch.isfinite(features).all()):
            raise ImageError("feature frames contain NaN or Inf. Fix: pass finite values in [-1, 1]")


def to_unit(images: Tensor) -> Tensor:
    """Model output in about [-1, 1] -> [0, 1] (clamped), as the authors save views."""
    return ((images.float().clamp(-1, 1) + 1) / 2)


def to_uint8(images01: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> uint8 HWC-ready values, with torchvision's save_image rounding."""
    return (images01 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def quantize8(images: Tensor) -> Tensor:
    """Round trip through an 8-bit PNG (the authors save the back view and re-read it): [-1,1] -> [-1,1]."""
    return (to_uint8(to_unit(images)).float() / 255.0 - 0.5) / 0.5


def save_png(image01: Tensor, path: str | Path) -> None:
    """Save one [3, H, W] image in [0, 1] as an 8-bit PNG (atomically: a temporary name, then a rename)."""
    from .results import write_file_atomic
    arr = to_uint8(image01.detach().cpu()).permute(1, 2, 0).numpy()
    write_file_atomic(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def synthetic_conditions(n: int = 32, size: int = 64) -> torch.Tensor:
    """Stand-in camera condition images [n, 3, size, size] in [-1, 1]: a shaded disc whose
    shading turns with the orbit azimuth (the authors' renders are not redistributable here)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = (xs ** 2 + ys ** 2 < 0.6).float()
    out = []
    for i in range(n):
        az = 2 * math.pi * i / n
        shade = 0.5 + 0.5 * (xs * math.cos(az) + ys * 0.3)
        img = torch.stack([shade * disc, (1 - shade) * disc, 0.5 * disc])
        out.append(img * 2 - 1)
    return torch.stack(out)


def synthetic_portrait(size: int = 64) -> torch.Tensor:
    """A stand-in portrait [1, 3, size, size] in [-1, 1]: a skin-toned ellipse on a dark ground
    (tests, the demo and benchmarks; random weights make any picture as good as another)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    face = ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 < 1).float()
    img = torch.stack([0.9 * face + 0.1, 0.7 * face + 0.1, 0.6 * face + 0.1])
    return (img * 2 - 1)[None]
