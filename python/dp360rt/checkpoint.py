"""Reading and checking checkpoints: the authors' ``.th`` files, ``.pt/.ckpt``, ``.safetensors``,
and the fixtures' seeded weight recipe. Never unpickles code (``weights_only=True``)."""
from __future__ import annotations

import json
import pickle
import zipfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .model import DiffPortrait360

# Saved by the authors' pinned transformers 4.30 as a persistent buffer; later versions drop it.
# Stored float precisions a float parameter accepts; load_checkpoint casts them to the parameter's dtype.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IGNORED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
MOTION_MARKER = "model.diffusion_model.input_blocks_motion_module."
KIND_FILES = {"nvs": "model_state-340000.th", "backview": "back_head-230000.th"}


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the problem and the fix."""


def _short(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.th/.pt/.ckpt/.pth`` (``torch.load(weights_only=True, mmap=True)``)
    or ``.safetensors``. A ``{"state_dict": ...}`` wrapper is unwrapped. Raises
    :class:`CheckpointError` with the cause and a fix for anything else."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(f.name for f in path.iterdir() if f.suffix in (".th", ".pt", ".ckpt", ".pth", ".safetensors"))
        hint = f" (it holds {_short(inside, 3)})" if inside else ""
        raise CheckpointError(f"{path} is a directory, not a checkpoint file{hint}. Fix: pass the checkpoint file "
                              "itself, e.g. model_state-340000.th")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes). Fix: download the checkpoint again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}). It may be truncated; "
                                  "fix: re-create it with `dp360rt convert`") from e
    else:
        sd = _torch_load(path)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict of named tensors. "
                              "Fix: pass the authors' checkpoint file (a bare state_dict)")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_short(bad)}. Fix: pass a plain state_dict")
    return dict(sd)


# Lines of torch.load's own error text that advise loading with weights_only=False (which would
# run whatever code the file holds): never passed on to the user.
_TORCH_ADVICE = ("weights_only", "Weights only", "trusted source", "file an issue", "documentation of torch.load")


def torch_load_reason(e: BaseException) -> str:
    """The reason in a ``torch.load(weights_only=True)`` error, without torch's advice to retry
    with ``weights_only=False``."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(e).splitlines()]
    keep = [line for line in lines if line and not any(a in line for a in _TORCH_ADVICE)]
    return "; ".join(keep) or type(e).__name__


def load_tensors(path: str | Path, what: str = "PyTorch checkpoint",
                 fix: str = "pass the .th/.pt/.ckpt file the authors published, or a .safetensors file") -> Any:
    """``torch.load(path, weights_only=True)`` (memory-mapped for zip archives) with every failure
    turned into a :class:`CheckpointError` that names ``path`` and ``fix`` and never suggests
    ``weights_only=False``. ``what`` names the kind of file expected."""
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        magic = f.read(8)
    if not is_zip and not magic.startswith(b"\x80"):
        hint = ""
        if magic[:2] == b"PK":
            hint = " It looks like a damaged or truncated zip archive."
        raise CheckpointError(f"{path} is not a {what} (neither a torch.save zip archive nor a "
                              f"legacy pickle).{hint} Fix: {fix}")
    if not is_zip and _is_panohead_pickle(path):
        raise CheckpointError(f"{path} is a PanoHead network pickle, not a DiffPortrait360 checkpoint. Fix: pass "
                              "model_state-340000.th / back_head-230000.th here; PanoHead files go to "
                              "`dp360rt conditions --panohead` or `dp360rt convert`")
    try:
        with warnings.catch_warnings():        # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it is damaged or contains pickled Python "
            f"objects other than tensors ({torch_load_reason(e)}). dp360rt never unpickles arbitrary code. "
            f"Fix: {fix}; a file of your own: load it once in a trusted environment and re-save only its "
            "tensors (or convert it to .safetensors)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {torch_load_reason(e)}). "
                              f"The file is probably truncated or corrupted. Fix: {fix}") from None


def _torch_load(path: Path) -> Any:
    return load_tensors(path, fix="download it again, or pass the .th/.pt/.ckpt file the authors published, "
                                  "or a .safetensors file")


def _is_panohead_pickle(path: Path) -> bool:
    """A StyleGAN/PanoHead network pickle names its persistence helper within its first bytes."""
    with open(path, "rb") as f:
        return b"torch_utils.persistence" in f.read(1 << 16)


def detect_kind(sd: Mapping[str, Tensor]) -> str | None:
    """``"nvs"`` when the 360° motion-module keys are present, ``"backview"`` when only the UNet is,
    None when it is not a DiffPortrait360 state dict at all."""
    if any(k.startswith(MOTION_MARKER) for k in sd):
        return "nvs"
    if any(k.startswith("model.diffusion_model.") for k in sd):
        return "backview"
    return None


def check_state_dict(model: DiffPortrait360, sd: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Strictly match ``sd`` against ``model``: same kind, same keys, same shapes, finite values.
    Returns the state dict to load (ignored keys removed). Raises :class:`CheckpointError`."""
    kind = detect_kind(sd)
    if kind is None and any(k.startswith("backbone.synthesis.") for k in sd):
        raise CheckpointError(f"{source} is a PanoHead generator, not a DiffPortrait360 checkpoint. Fix: pass "
                              f"{KIND_FILES[model.kind]}; PanoHead files go to `dp360rt conditions --panohead`")
    if kind is None:
        raise CheckpointError(f"{source} is not a DiffPortrait360 checkpoint (no 'model.diffusion_model.*' keys; "
                              f"first keys: {_short(sorted(sd), 3)}). Fix: pass {KIND_FILES[model.kind]}")
    if kind != model.kind:
        raise CheckpointError(
            f"{source} is the {'360° view' if kind == 'nvs' else 'back-view'} generator ({KIND_FILES[kind]}), "
            f"but the {'360° view' if model.kind == 'nvs' else 'back-view'} model ({KIND_FILES[model.kind]}) "
            f"was expected (told apart by the motion-module keys). Fix: swap the two checkpoint arguments")
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the {model.kind} model built from the config: {len(missing)} missing key(s)"
            f"{': ' + _short(missing) if missing else ''}; {len(unexpected)} unexpected key(s)"
            f"{': ' + _short(unexpected) if unexpected else ''}. Fix: use the checkpoint that belongs to this "
            "config (official files need config='full')")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensor(s) have the wrong shape (file vs model): "
                              f"{_short(wrong, 3)}. Fix: build the model with the config these weights were "
                              "trained with (official files: config='full')")
    wrong_dtype = [f"{k} ({sd[k].dtype})" for k, v in expected.items()
                   if (sd[k].dtype not in FLOAT_DTYPES if v.is_floating_point() else sd[k].dtype != v.dtype)]
    if wrong_dtype:
        raise CheckpointError(f"{source}: {len(wrong_dtype)} tensor(s) are stored as integer, bool, complex or "
                              f"8-bit float numbers where the model has float weights: {_short(wrong_dtype, 5)}. "
                              "dp360rt does not dequantize or truncate weights. Fix: pass the original float "
                              "checkpoint (float32, or float16/bfloat16/float64, which are cast on load)")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) contain NaN or Inf: {_short(bad, 3)}. "
                              "The file is corrupted; fix: download it again")
    return sd


def load_checkpoint(model: DiffPortrait360, source: str | Path | Mapping[str, Tensor]) -> DiffPortrait360:
    """Load weights strictly into ``model`` from a file path or an in-memory state dict.

    Keeps each parameter's dtype and device: weights stored as float16, bfloat16 or float64 are
    cast explicitly to the parameter's dtype (float32 as built); integer, bool, complex or 8-bit
    float tensors are refused. A model built on ``device="meta"`` takes the loaded tensors
    (cast to its parameters' dtypes) instead of copying into random weights; from an in-memory
    state dict, the tensors already in the right dtype are then shared with the caller's dict, not
    copied (nothing in dp360rt writes to weights, and a copy would double the peak memory).
    Raises :class:`CheckpointError` naming the problem and its fix.
    """
    return load_state(model, checked_state_dict(model, source), copy=not isinstance(source, Mapping))


def checked_state_dict(model: DiffPortrait360, source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of ``source`` (a file, memory-mapped, or a dict) checked against ``model``
    (:func:`check_state_dict`, plus the schedule tables' exact dtypes); tensors as stored, not yet
    cast. Raises :class:`CheckpointError`."""
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = read_state_dict(source) if not isinstance(source, Mapping) else source
    sd = check_state_dict(model, sd, name)
    expected = model.state_dict()
    for k, _ in model.named_buffers():
        if "." not in k and sd[k].dtype != expected[k].dtype:
            raise CheckpointError(f"{name}: schedule table '{k}' is {sd[k].dtype}, expected "
                                  f"{expected[k].dtype} (the reference keeps these tables exact)")
    return sd


def load_state(model: DiffPortrait360, sd: Mapping[str, Tensor], copy: bool = False) -> DiffPortrait360:
    """Load a :func:`checked_state_dict` into ``model``, each tensor cast to its parameter's dtype
    (see :func:`load_checkpoint`). ``copy``: a tensor that goes into a 'meta' slot without a cast
    is copied, not taken: for a memory-mapped file, whose every page a half-precision load reads,
    one float32 norm taken as it is would keep the whole mapping (and its pages in RSS) alive."""
    expected = model.state_dict()

    def own(k: str, v: Tensor) -> Tensor:
        if v.dtype != expected[k].dtype:
            return v.to(expected[k].dtype)
        return v.clone() if copy and expected[k].is_meta else v

    sd = {k: own(k, v) for k, v in sd.items()}
    # A model built on 'meta' (no memory, no random init) takes the loaded tensors as they are.
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    if on_meta:
        model.requires_grad_(False)
    return model


def _fingerprint(t: Tensor) -> tuple:
    """A cheap content hash: shape, dtype and a few hundred strided elements (exactness is then
    checked with ``torch.equal`` on the candidates only, so full-size loads stay fast)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 256)
    sample = flat[::step][:256].float().cpu().numpy().tobytes()
    return (tuple(t.shape), t.dtype, t.device.type, zlib.crc32(sample))


def identical_tensors(keep: torch.nn.Module, model: torch.nn.Module, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``model``'s state dict ``sd`` whose tensor, cast to ``model``'s dtype for
    that key, equals a tensor ``keep`` holds (same shape, dtype and values, whatever its name),
    mapped to ``keep``'s own tensor (its Parameter object for a parameter).

    Both official checkpoints carry the same frozen VAE and CLIP text tower: loading those keys
    from this dict (``load_state_dict(..., assign=True)`` into a 'meta' model) makes the two models
    hold one copy. Each entry is cast and compared alone, so the other model's weights are never all
    materialized here. Moving or casting the models afterwards keeps the sharing (``Module.to``
    converts a shared tensor in place)."""
    index: dict[tuple, list[Tensor]] = {}
    for t in list(keep.parameters()) + list(keep.buffers()):
        if not t.is_meta:
            index.setdefault(_fingerprint(t), []).append(t)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = model.state_dict()
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        v = v.to(expected[k].dtype)
        match = next((c for c in index.get(_fingerprint(v), ()) if torch.equal(c, v)), None)
        if match is not None and isinstance(match, torch.nn.Parameter) == (k in params):
            out[k] = match
    return out


# -- the fixtures' seeded recipe -------------------------------------------------------------------
RECIPE_OFFSET = {"nvs": 1, "backview": 2}


def recipe_tensor(key: str, seed: int, entry: Mapping[str, Any]) -> Tensor:
    """One tensor of a fixtures' seeded recipe: ``float32(mean + std * z)`` (float64 math, one
    rounding), ``z`` standard normal of ``entry["shape"]`` from a legacy numpy RandomState seeded by
    ``(crc32(key) + seed) mod 2^32`` (``seed`` already holds the recipe's per-model offset)."""
    z = np.random.RandomState((zlib.crc32(key.encode("utf-8")) + seed) % 2 ** 32).standard_normal(entry["shape"])
    v = np.asarray(float(entry["mean"]) + float(entry["std"]) * np.asarray(z, dtype=np.float64), dtype=np.float32)
    return torch.from_numpy(v.reshape(entry["shape"]))


def read_recipe(fixture_dir: str | Path, fmt: str, weights: str,
                error: type[CheckpointError] = CheckpointError) -> tuple[dict[str, Any], dict[str, Any]]:
    """A seeded-recipe fixture set's ``init.json`` (checked to be format ``fmt``) and
    ``buffers.pt``; a missing or malformed file raises ``error`` naming it and ``weights``, the
    weight files that can stand in for the recipe."""
    d = Path(fixture_dir)
    try:
        init = json.loads((d / "init.json").read_text())
        buffers = torch.load(d / "buffers.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise error(f"{d}: weight recipe incomplete ({Path(e.filename).name} missing). Fix: a fixture set needs "
                    f"init.json + buffers.pt, or {weights}") from e
    except (ValueError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise error(f"{d}: init.json or buffers.pt is malformed ({e})") from e
    if not isinstance(init, dict) or init.get("format") != fmt:
        got = init.get("format") if isinstance(init, dict) else type(init).__name__
        raise error(f"{d}/init.json is not a {fmt} recipe (format {got!r})")
    return init, buffers


def materialize_recipe(fixture_dir: str | Path, kind: str) -> dict[str, Tensor]:
    """Rebuild a fixture set's state dict of ``kind`` bit-exactly from ``init.json`` + ``buffers.pt``.

    Each parameter is ``float32(mean + std * z)`` with ``z`` from a legacy numpy RandomState seeded
    by ``(crc32(key) + seed + offset) mod 2^32`` (offset 1 for nvs, 2 for backview).
    """
    d = Path(fixture_dir)
    init, buffers = read_recipe(d, "dp360-init-v1", "nvs_tiny.th / backview_tiny.th")
    if kind not in init.get("models", {}) or kind not in buffers:
        raise CheckpointError(f"{d}/init.json is not a dp360-init-v1 recipe holding model {kind!r}")
    seed = int(init["seed"])
    sd: dict[str, Tensor] = {}
    for key, e in init["models"][kind].items():
        sd[key] = recipe_tensor(key, seed + RECIPE_OFFSET[kind], e)
    overlap = set(sd) & set(buffers[kind])
    if overlap:
        raise CheckpointError(f"{d}: recipe and buffers.pt both define {_short(sorted(overlap))}")
    sd.update(buffers[kind])
    return sd


def fixture_state_dict(fixture_dir: str | Path, kind: str) -> dict[str, Tensor]:
    """A fixture set's weights: ``{kind}_tiny.th`` when present, else the seeded recipe."""
    f = Path(fixture_dir) / f"{kind}_tiny.th"
    return read_state_dict(f) if f.is_file() else materialize_recipe(fixture_dir, kind)


def convert(src: str | Path, dst: str | Path, fp16: bool = False) -> dict[str, Any]:
    """Convert a checkpoint to ``.safetensors`` (optionally float32 weights -> float16; the float16
    schedule tables stay as they are). Returns a small summary dict."""
    from safetensors.torch import save_file

    from .io.checks import writable_dir
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"output must end in .safetensors, got {dst.name}")
    if dst.is_dir():
        raise CheckpointError(f"{dst} is a directory. Fix: give the output file's name, e.g. {dst / 'model.safetensors'}")
    writable_dir(dst.parent, "output folder")         # before reading gigabytes
    sd = read_state_dict(src)
    kind = detect_kind(sd)
    if kind is None:
        raise CheckpointError(f"{src} is not a DiffPortrait360 checkpoint (no 'model.diffusion_model.*' keys)")
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    if fp16:
        sd = {k: (v.half() if v.dtype == torch.float32 and k != "logvar" else v) for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    from .io.results import write_file_atomic
    write_file_atomic(dst, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt", "kind": kind,
                                                                        "source": Path(src).name}))
    return {"kind": kind, "tensors": len(sd), "bytes": dst.stat().st_size}
