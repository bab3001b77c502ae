"""``dp360rt invert`` and the 3D-aware-noise options of ``generate`` / ``stream``.

:func:`add_parser` registers ``invert``; :func:`add_noise3d_args` adds ``--panohead``, ``--vgg``,
``--3d-noise``, ``--no-3d-noise``, ``--w-steps``, ``--pti-steps`` to a verb and
:func:`inverter_from_args` turns them into an :class:`~dp360rt.invert.Inverter` (or None).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from .projector import PTI_STEPS, SEED, W_STEPS


def add_noise3d_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--panohead", metavar="FILE", help="PanoHead generator (.pkl or converted .safetensors): with "
                                                      "--vgg, the portrait is inverted for 3D-aware noise")
    p.add_argument("--vgg", metavar="FILE", help="NVIDIA's StyleGAN2-ADA metrics vgg16.pt (the projector's "
                                                 "perceptual loss; read as data, never executed)")
    p.add_argument("--3d-noise", dest="noise3d", action="store_true",
                   help="with --random: run the 3D-aware-noise stage on random tiny PanoHead + VGG16 weights")
    p.add_argument("--no-3d-noise", dest="no_noise3d", action="store_true",
                   help="skip the inversion stage even when --panohead/--vgg are given")
    p.add_argument("--w-steps", type=int, default=W_STEPS, help=f"W projection steps (default {W_STEPS})")
    p.add_argument("--pti-steps", type=int, default=PTI_STEPS, help=f"pivotal tuning steps (default {PTI_STEPS})")


def _check_steps(a: argparse.Namespace) -> None:
    if a.w_steps < 1:
        raise ValueError(f"--w-steps must be >= 1, got {a.w_steps}. Fix: e.g. --w-steps {W_STEPS}")
    if a.pti_steps < 0:
        raise ValueError(f"--pti-steps must be >= 0, got {a.pti_steps}. Fix: e.g. --pti-steps {PTI_STEPS}")


def check_noise3d_files(a: argparse.Namespace) -> None:
    """Name a missing --panohead / --vgg file before any weights load."""
    if a.no_noise3d or not (a.panohead or a.vgg):
        return
    if not (a.panohead and a.vgg):
        missing = "--vgg" if a.panohead else "--panohead"
        raise ValueError(f"3D-aware noise needs both --panohead FILE and --vgg FILE; {missing} is missing. Fix: pass "
                         "both (the PanoHead generator and NVIDIA's vgg16.pt), or --no-3d-noise")
    from ..panohead.pickle_reader import PanoHeadCheckpointError
    from .vgg_file import FIX_GET, VGGFileError
    if not Path(a.panohead).is_file():
        raise PanoHeadCheckpointError(f"PanoHead file not found: {a.panohead}. Fix: pass the PanoHead generator "
                                      "(easy-khair-180-gpc0.8-trans10-025000.pkl or its converted .safetensors)")
    if not Path(a.vgg).is_file():
        raise VGGFileError(f"VGG16 file not found: {a.vgg}. {FIX_GET}")
    _check_steps(a)


def inverter_from_args(a: argparse.Namespace, device):
    """The Inverter the options ask for, or None (no stage 1)."""
    from .stage import Inverter
    if a.no_noise3d:
        return None
    if a.panohead or a.vgg:
        check_noise3d_files(a)
        return Inverter(a.panohead, a.vgg, device=device, w_steps=a.w_steps, pti_steps=a.pti_steps)
    if a.noise3d:
        if not getattr(a, "random", None):
            raise ValueError("--3d-noise runs on random weights with --random only. Fix: pass --panohead FILE and "
                             "--vgg FILE for real weights")
        _check_steps(a)
        return Inverter.random("tiny", device=device, w_steps=a.w_steps, pti_steps=a.pti_steps)
    return None


def cmd_invert(a: argparse.Namespace) -> int:
    from ..io.progress import progress_bar
    from .stage import Inverter
    _check_steps(a)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..io.images import open_image
    open_image(a.crop)                     # a bad image is named before the networks load
    camera = None
    cam_file = Path(a.camera) if a.camera else Path(a.crop).with_name("camera.json")
    if a.camera or cam_file.is_file():
        try:
            camera = torch.tensor(json.loads(cam_file.read_text())["camera"], dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the camera from {cam_file} ({type(e).__name__}: {e}). Fix: pass the "
                             "camera.json `dp360rt crop` wrote (its \"camera\": 25 numbers)") from e
        print(f"camera from {cam_file}")
    else:
        warnings.warn(f"no camera.json beside {a.crop} and no --camera: the frontal camera is used. Fix: run "
                      "`dp360rt crop PHOTO --out DIR` and invert DIR/crop.png")
    t = time.perf_counter()
    if a.random:
        inv = Inverter.random(a.random, device=dev, w_steps=a.w_steps, pti_steps=a.pti_steps, seed=a.seed,
                              batch=a.batch)
    else:
        if not (a.panohead and a.vgg):
            raise ValueError("pass --panohead FILE and --vgg FILE (or --random tiny for random weights)")
        check_noise3d_files(argparse.Namespace(panohead=a.panohead, vgg=a.vgg, no_noise3d=False,
                                               w_steps=a.w_steps, pti_steps=a.pti_steps))
        inv = Inverter(a.panohead, a.vgg, device=dev, w_steps=a.w_steps, pti_steps=a.pti_steps, seed=a.seed,
                       batch=a.batch)
    load = time.perf_counter() - t
    result = inv(a.crop, camera, progress=progress_bar())
    result.timings["load"] = load
    out = result.save(a.out)
    print(f"wrote {out}/features/000.png ... {len(result.frames) - 1:03d}.png (use with generate --features "
          f"{out}/features), projected.png, w.safetensors; timings (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    return 0


def add_parser(subparsers) -> None:
    """Register ``invert`` on the main CLI's ``subparsers``."""
    p = subparsers.add_parser("invert", help="invert a face crop into PanoHead (W projection + pivotal tuning) and "
                                             "render the 32 feature frames of the 3D-aware noise")
    p.add_argument("crop", help="the 512² face crop (dp360rt crop's crop.png; its camera.json beside it is used)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--panohead", metavar="FILE", help="PanoHead generator (.pkl or converted .safetensors)")
    p.add_argument("--vgg", metavar="FILE", help="NVIDIA's StyleGAN2-ADA metrics vgg16.pt")
    p.add_argument("--random", metavar="CONFIG", help="random PanoHead weights of a config (tiny) and a tiny VGG16")
    p.add_argument("--camera", metavar="JSON", help="camera.json with the crop's 25-number camera (default: the "
                                                    "camera.json beside the crop)")
    p.add_argument("--w-steps", type=int, default=W_STEPS, help=f"W projection steps (default {W_STEPS})")
    p.add_argument("--pti-steps", type=int, default=PTI_STEPS, help=f"pivotal tuning steps (default {PTI_STEPS})")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the w noise and renderer draws (default {SEED})")
    p.add_argument("--batch", type=int, default=8, help="frames per render call (default 8)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.set_defaults(fn=cmd_invert)
