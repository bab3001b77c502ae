"""PanoHead weights: building the generator from its init kwargs, strict loading, safetensors,
and the fixtures' seeded recipe.

A *spec* is the JSON-able description of a generator: ``{"class_name": ..., "init_kwargs": {...},
"neural_rendering_resolution": R, "rendering_kwargs": {...}}`` (the last two are the instance
attributes of the snapshot, which may differ from the init kwargs, e.g. ``density_noise``).
``dp360rt convert`` stores it in the safetensors header as ``init_kwargs`` (a JSON string).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..checkpoint import read_recipe, recipe_tensor
from .generator import TriPlaneGenerator
from .pickle_reader import GENERATOR_CLASS, RELEASE_FILE, PanoHeadCheckpointError, read_network_pickle

UNREAD_KEYS = ("dataset_label_std",)        # the training loop's buffer: optional in a file


def _short(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def build_generator(spec: Mapping, device: str | torch.device = "cpu") -> TriPlaneGenerator:
    """A generator with random weights from a spec (see the module docstring), in eval mode.
    Instance attributes ``neural_rendering_resolution`` and ``rendering_kwargs`` are applied."""
    name = spec.get("class_name", GENERATOR_CLASS)
    if name != GENERATOR_CLASS:
        raise PanoHeadCheckpointError(f"generator class {name!r} is not ported. Fix: pass a PanoHead "
                                      f"{GENERATOR_CLASS} snapshot ({RELEASE_FILE})")
    if not isinstance(spec.get("init_kwargs"), Mapping):
        raise PanoHeadCheckpointError("the generator spec has no init_kwargs. Fix: convert the .pkl with "
                                      "`dp360rt convert PANOHEAD.pkl OUT.safetensors`")
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        g = TriPlaneGenerator(**spec["init_kwargs"])
    if spec.get("rendering_kwargs") is not None:
        g.rendering_kwargs = dict(spec["rendering_kwargs"])
    if spec.get("neural_rendering_resolution") is not None:
        g.neural_rendering_resolution = int(spec["neural_rendering_resolution"])
    if str(device) != "meta":
        g = g.to(device)
    return g.eval().requires_grad_(False)


def check_state_dict(g: TriPlaneGenerator, sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Strict key/shape/finiteness check of a PanoHead G state dict against ``g``; returns the
    dict to load. A DiffPortrait360 state dict gets its own error."""
    if any(k.startswith("model.diffusion_model.") for k in sd):
        raise PanoHeadCheckpointError(f"{source} is a DiffPortrait360 checkpoint, not PanoHead. Fix: pass the PanoHead "
                                      f"generator ({RELEASE_FILE} or its converted .safetensors)")
    expected = g.state_dict()
    missing = sorted(set(expected) - set(sd) - set(UNREAD_KEYS))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise PanoHeadCheckpointError(
            f"{source} does not match the PanoHead generator built from its init kwargs: {len(missing)} missing "
            f"key(s){': ' + _short(missing) if missing else ''}; {len(unexpected)} unexpected key(s)"
            f"{': ' + _short(unexpected) if unexpected else ''}. Fix: use the init kwargs stored with these weights")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise PanoHeadCheckpointError(f"{source}: {len(wrong)} tensor(s) have the wrong shape (file vs model): "
                                      f"{_short(wrong, 3)}. Fix: use the init kwargs stored with these weights")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PanoHeadCheckpointError(f"{source}: {len(bad)} tensor(s) contain NaN or Inf: {_short(bad, 3)}. "
                                      "The file is corrupted; fix: download it again")
    return dict(sd)


def generator_from_state(spec: Mapping, sd: Mapping[str, Tensor], source: str,
                         device: str | torch.device = "cpu") -> TriPlaneGenerator:
    """Build from ``spec`` and load ``sd`` strictly (float32)."""
    g = build_generator(spec)
    sd = check_state_dict(g, sd, source)
    g.load_state_dict({k: v.float() for k, v in sd.items()}, strict=not set(UNREAD_KEYS) - set(sd))
    return g.to(device)


def save_safetensors(path: str | Path, sd: Mapping[str, Tensor], spec: Mapping, source: str = "") -> Path:
    """Write a generator's state dict (float32, contiguous) with the spec as JSON in the header."""
    from safetensors.torch import save_file
    path = Path(path)
    meta = {"format": "pt", "source": source or "panohead G_ema", "init_kwargs": json.dumps(spec, sort_keys=True)}
    save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state dict, spec) of a converted PanoHead ``.safetensors`` (the fast path: memory-mapped)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise PanoHeadCheckpointError(f"PanoHead file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise PanoHeadCheckpointError(f"{path} could not be read as .safetensors ({e}). The file is probably truncated "
                                      "or corrupted. Fix: convert the .pkl again") from e
    if "init_kwargs" not in meta:
        if any(k.startswith("model.diffusion_model.") for k in sd):
            raise PanoHeadCheckpointError(f"{path} is a DiffPortrait360 checkpoint, not PanoHead. Fix: pass the PanoHead "
                                          f"generator ({RELEASE_FILE} or its converted .safetensors)")
        raise PanoHeadCheckpointError(f"{path} has no PanoHead init kwargs in its header. Fix: make it with "
                                      "`dp360rt convert PANOHEAD.pkl OUT.safetensors`")
    try:
        spec = json.loads(meta["init_kwargs"])
    except json.JSONDecodeError as e:
        raise PanoHeadCheckpointError(f"{path}: the init kwargs in its header are not JSON ({e}). Fix: convert again") from e
    return sd, spec


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> TriPlaneGenerator:
    """G_ema of a PanoHead file, in eval mode: a converted ``.safetensors`` (fast) or the released
    network pickle (``.pkl``, read by :mod:`dp360rt.panohead.pickle_reader`, nothing executed)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd, spec = read_safetensors(path)
        return generator_from_state(spec, sd, str(path), device)
    snap = read_network_pickle(path)
    return generator_from_state(snap.spec("G_ema"), snap.state_dict("G_ema"), str(path), device)


# -- the fixtures' seeded recipe ("panohead-init-v1") -----------------------------------------------

def recipe_state_dicts(fixture_dir: str | Path, models=("G_ema",)) -> dict[str, dict[str, Tensor]]:
    """Rebuild a fixture set's state dicts bit-exactly: for each key of ``init.json``,
    ``float32(mean + std * z)``, z standard normal from a numpy RandomState seeded by
    ``(crc32(key) + seed + model_offsets[model]) mod 2^32``; plus the stored ``buffers.pt``."""
    init, consts = read_recipe(fixture_dir, "panohead-init-v1", "G_ema.safetensors", PanoHeadCheckpointError)
    out = {}
    for model in models:
        entries = init["models"][model]
        seed = int(init["seed"]) + int(init["model_offsets"][model])
        sd = {}
        for key, e in entries.items():
            sd[key] = recipe_tensor(key, seed, e)
        sd.update(consts.get(model, {}))
        out[model] = sd
    return out


def fixture_spec(fixture_dir: str | Path) -> dict:
    """G_ema's spec of a fixture set (``G_ema_init_kwargs.json``)."""
    p = Path(fixture_dir) / "G_ema_init_kwargs.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise PanoHeadCheckpointError(f"{p} not found. Fix: a PanoHead fixture set holds G_ema_init_kwargs.json") from None
    except json.JSONDecodeError as e:
        raise PanoHeadCheckpointError(f"{p} is not JSON ({e})") from e
