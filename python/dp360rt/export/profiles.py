"""Static shape profiles: which batch shapes each exported network is built for, named after their use.

A profile fixes, for one model kind, the rows of every network call the fast sampler makes
(:func:`dp360rt.sampler.fast.sample_windows_fast`), so every exported file has fully static shapes
(what TensorRT builds best and what ONNX Runtime plans memory for):

``window8``       360° model, one 8-frame window per UNet call, guidance branches in two calls
                  (``BatchPlan(windows_per_call=1, batch_cfg=False)``): UNet 8 rows, all conditional,
                  plus the no-bank UNet for the 8 unconditional rows.
``window8x2cfg``  one window per call with both guidance branches batched (``BatchPlan(1, True)``):
                  UNet 16 rows = 8 conditional + 8 unconditional.
``batch32``       all four windows of a 360° generation per call, branches in two calls
                  (``BatchPlan(4, False)``): UNet 32 conditional rows, no-bank UNet 32 rows.
``backview``      back-view model: 1 conditional row + 1 unconditional row (batched guidance, the
                  pipeline's default), and the 1-row variants (separate branches, single calls).

Custom profiles: ``NAME=ROWS:COND[:KIND]`` (e.g. ``w2x2=32:16`` for two windows with batched
guidance); the pose net and the no-bank UNet get ``COND`` rows.

Image size: a profile is exported at the config's square image size unless it names another,
``PROFILE@HxW`` in pixels (e.g. ``window8@128x192``: 16x24 latents), height and width multiples of
the VAE's factor 8.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

KINDS = ("nvs", "backview")
LATENT_FACTOR = 8                         # image pixels per latent pixel (the VAE's downsampling)
MODULES = ("text", "vae_encoder", "vae_decoder", "pose", "appearance", "unet_nobank", "unet")


@dataclass(frozen=True)
class Profile:
    """Batch shapes of one use of one model kind (spatial sizes come from the model config)."""

    name: str
    kind: str
    unet: tuple[tuple[int, int], ...]        # (rows, cond_rows) of UNet calls that read the bank
    nobank: tuple[int, ...]                  # rows of unconditional-only UNet calls
    pose: tuple[int, ...]                    # rows of pose ControlNet calls (= conditional rows)
    refs: int                                # references in the bank (front + back views)
    vae_encoder: tuple[int, ...] = (1,)
    vae_decoder: tuple[int, ...] = (1,)
    text: tuple[int, ...] = (1,)
    image_hw: tuple[int, int] | None = None  # (height, width) in pixels; None: the config's square size
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"profile {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        for rows, cond in self.unet:
            if not 0 < cond <= rows:
                raise ValueError(f"profile {self.name!r}: UNet call of {rows} rows with {cond} conditional rows; "
                                 "need 0 < cond_rows <= rows")
        if self.image_hw is not None and (len(self.image_hw) != 2
                                          or any(v <= 0 or v % LATENT_FACTOR for v in self.image_hw)):
            raise ValueError(f"profile {self.name!r}: image size {self.image_hw} must be (height, width), positive "
                             f"multiples of {LATENT_FACTOR}. Fix: pass e.g. @128x192")

    def batches(self, module: str) -> list[tuple[int, int | None]]:
        """(rows, cond_rows or None) of every exported variant of ``module`` in this profile."""
        if module == "unet":
            return [(r, c) for r, c in self.unet]
        if module == "appearance":
            return [(self.refs, None)]
        return [(b, None) for b in {"unet_nobank": self.nobank, "pose": self.pose, "vae_encoder": self.vae_encoder,
                                    "vae_decoder": self.vae_decoder, "text": self.text}[module]]


BUILTIN_PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("window8", "nvs", unet=((8, 8),), nobank=(8,), pose=(8,), refs=2, vae_encoder=(1, 8), vae_decoder=(1, 8),
            description="one 8-frame window per UNet call, guidance branches in two calls"),
    Profile("window8x2cfg", "nvs", unet=((16, 8),), nobank=(8,), pose=(8,), refs=2, vae_encoder=(1, 8),
            vae_decoder=(1, 8), description="one window per call, 8 conditional + 8 unconditional rows batched"),
    Profile("batch32", "nvs", unet=((32, 32),), nobank=(32,), pose=(32,), refs=2, vae_encoder=(1, 8),
            vae_decoder=(1, 8), description="all four windows per call (32 rows), guidance branches in two calls"),
    Profile("backview", "backview", unet=((2, 1), (1, 1)), nobank=(1,), pose=(1,), refs=1,
            description="back-view model: 1 conditional (+1 unconditional) row"),
)}
DEFAULT_PROFILES = ("window8", "window8x2cfg", "batch32", "backview")

_CUSTOM = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<rows>\d+):(?P<cond>\d+)(?::(?P<kind>nvs|backview))?$")
_SIZE = re.compile(r"^(?P<spec>.+)@(?P<h>\d+)x(?P<w>\d+)$")


def sized(profile: Profile, image_hw: tuple[int, int] | None) -> Profile:
    """``profile`` at image size ``image_hw`` (pixels), named ``NAME@HxW``; None keeps it as it is."""
    if image_hw is None:
        return profile
    h, w = int(image_hw[0]), int(image_hw[1])
    return dataclasses.replace(profile, name=f"{profile.name}@{h}x{w}", image_hw=(h, w))


def parse_profile(spec: str) -> Profile:
    """A built-in profile name, or ``NAME=ROWS:COND[:KIND]``, either optionally ``@HxW`` (image pixels)."""
    m = _SIZE.match(spec)
    if m:
        return sized(parse_profile(m["spec"]), (int(m["h"]), int(m["w"])))
    if spec in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[spec]
    m = _CUSTOM.match(spec)
    if not m:
        raise ValueError(f"unknown profile {spec!r}: use one of {sorted(BUILTIN_PROFILES)} or NAME=ROWS:COND[:KIND] "
                         "(e.g. w2x2=32:16), optionally @HxW for another image size (e.g. window8@128x192)")
    rows, cond, kind = int(m["rows"]), int(m["cond"]), m["kind"] or "nvs"
    if m["name"] in BUILTIN_PROFILES:
        raise ValueError(f"custom profile {spec!r} reuses the built-in name {m['name']!r}")
    return Profile(m["name"], kind, unet=((rows, cond),), nobank=(cond,), pose=(cond,), refs=2 if kind == "nvs" else 1,
                   vae_encoder=(1, 8) if kind == "nvs" else (1,), vae_decoder=(1, 8) if kind == "nvs" else (1,),
                   description=f"custom: {rows} rows, {cond} conditional")


def parse_profiles(specs: list[str] | tuple[str, ...] | None) -> list[Profile]:
    out, seen = [], set()
    for s in specs or DEFAULT_PROFILES:
        p = parse_profile(s)
        if p.name in seen:
            raise ValueError(f"profile {p.name!r} given twice")
        seen.add(p.name)
        out.append(p)
    return out
