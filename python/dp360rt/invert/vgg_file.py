"""Load the projector's VGG16 weights from a user-supplied file without executing anything in it.

Accepted files:

* NVIDIA's StyleGAN2-ADA metrics network ``vgg16.pt`` (what the authors' projector downloads): a
  TorchScript zip archive. ``torch.jit.load`` would compile and run the Python code stored in its
  ``code/`` folder; we never do. Its ``data.pkl`` (the module tree and its tensors) is read by a
  restricted unpickler: TorchScript classes (``__torch__.*``) become inert records, tensors are
  rebuilt from the archive's raw storages, and any other global is refused. Only the convolution
  and LPIPS tensors are decoded (the ≈ 0.5 GB of classifier weights are skipped).
* A ``.safetensors`` or a ``torch.save`` state dict (read with ``weights_only=True``) holding the
  same names (``layers.conv1.weight`` ... ``lpips4``), e.g. written from :class:`VGG16LPIPS`.

The widths are taken from the file, so smaller (test) networks load the same way.
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from .vgg import CONVS_PER_STAGE, VGG16LPIPS

VGG_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt"
FIX_GET = f"Fix: pass NVIDIA's StyleGAN2-ADA metrics network vgg16.pt ({VGG_URL}), downloaded once, with --vgg"
STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16}
N_CONVS = sum(CONVS_PER_STAGE)
NEEDED = tuple(f"layers.conv{k}.{p}" for k in range(1, N_CONVS + 1) for p in ("weight", "bias")) + \
    tuple(f"lpips{i}" for i in range(len(CONVS_PER_STAGE)))


class VGGFileError(CheckpointError):
    """The VGG16 file cannot be used; the message names the problem and the fix."""


class UnsafeVGGFileError(VGGFileError):
    """The archive's data.pkl names a global outside the allow-list; nothing from it was executed."""


class ScriptRecord:
    """A TorchScript object (``__torch__.NAME``) as pickled: its class name and attribute dict.
    Each qualified name gets an inert subclass (pickle's NEWOBJ needs a type); nothing of the
    archive's code is looked up."""
    qualname = ""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeVGGFileError(f"TorchScript object {self.qualname} has a non-dict state")
        self.state = state


class LazyTensor:
    """A tensor of the archive, decoded only when asked for (``.load()``)."""

    def __init__(self, storage: "LazyStorage", offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    @property
    def shape(self) -> tuple:
        return self.size

    def load(self) -> Tensor:
        flat = self.storage.load()
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride)) if all(self.size) else -1
        if len(self.size) != len(self.stride) or self.offset < 0 or last >= flat.numel():
            raise VGGFileError(f"a tensor of size {self.size} does not fit its storage of {flat.numel()} elements")
        return torch.as_strided(flat, self.size, self.stride, self.offset).clone()


class LazyStorage:
    def __init__(self, archive: zipfile.ZipFile, entry: str, dtype: torch.dtype, numel: int):
        self.archive, self.entry, self.dtype, self.numel = archive, entry, dtype, int(numel)

    def load(self) -> Tensor:
        try:
            data = self.archive.read(self.entry)
        except KeyError:
            raise VGGFileError(f"the archive lacks the tensor data {self.entry}; it is truncated. {FIX_GET}") from None
        need = self.numel * torch.empty((), dtype=self.dtype).element_size()
        if len(data) < need:
            raise VGGFileError(f"{self.entry} holds {len(data)} bytes, {need} expected; the file is truncated. {FIX_GET}")
        return torch.frombuffer(bytearray(data[:need]), dtype=self.dtype) if need else torch.empty(0, dtype=self.dtype)


def _intlist(items: Any) -> list:
    return list(items)


class _ScriptDataUnpickler(pickle.Unpickler):
    """``data.pkl`` of a TorchScript archive: only inert records, tensors and plain containers."""

    def __init__(self, f, archive: zipfile.ZipFile, prefix: str):
        super().__init__(f)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return type("ScriptRecord", (ScriptRecord,), {"qualname": f"{module}.{name}"})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist", "build_genericlist"):
            return _intlist
        if module == "torch" and name in STORAGE_DTYPES:
            return ("storage-type", name)
        if module == "torch" and name.endswith("Storage"):
            raise VGGFileError(f"the archive stores {name} tensors; the VGG16 weights are floating point. {FIX_GET}")
        raise UnsafeVGGFileError(f"the archive's data.pkl refers to the Python global {module}.{name}, which a VGG16 "
                                 f"TorchScript file never needs; nothing was executed. {FIX_GET}")

    def persistent_load(self, pid: Any):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], tuple)
                and pid[1][:1] == ("storage-type",)):
            raise UnsafeVGGFileError(f"unexpected persistent id in data.pkl ({str(pid)[:60]}). {FIX_GET}")
        _, (_, type_name), key, _location, numel = pid[:5]
        return LazyStorage(self.archive, f"{self.prefix}data/{key}", STORAGE_DTYPES[type_name], numel)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *rest) -> LazyTensor:
        if not isinstance(storage, LazyStorage):
            raise UnsafeVGGFileError("a tensor is built from something that is not an archive storage")
        return LazyTensor(storage, offset, size, stride)


def _walk(obj: Any, prefix: str, out: dict[str, LazyTensor], depth: int = 0) -> None:
    if depth > 16:
        raise VGGFileError("the TorchScript module tree is nested too deeply for a VGG16")
    if isinstance(obj, ScriptRecord):
        for k, v in obj.state.items():
            if isinstance(k, str):
                _walk(v, f"{prefix}{k}.", out, depth + 1)
    elif isinstance(obj, LazyTensor):
        out[prefix[:-1]] = obj


def read_torchscript_tensors(path: Path, archive: zipfile.ZipFile) -> dict[str, Tensor]:
    """The VGG16 tensors (:data:`NEEDED`) of a TorchScript archive, by their module paths."""
    names = archive.namelist()
    pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        raise VGGFileError(f"{path} is a zip archive without data.pkl, not a TorchScript network. {FIX_GET}")
    prefix = pkl[: -len("data.pkl")]
    import io
    try:
        root = _ScriptDataUnpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    except VGGFileError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, IndexError, KeyError,
            AttributeError, RecursionError, zipfile.BadZipFile) as e:
        raise VGGFileError(f"{path} could not be read ({type(e).__name__}: {e}). The file is probably truncated or "
                           f"corrupted. {FIX_GET}") from e
    if not isinstance(root, ScriptRecord):
        raise VGGFileError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module. {FIX_GET}")
    found: dict[str, LazyTensor] = {}
    _walk(root, "", found)
    return _pick(path, {k: v for k, v in found.items()}, lazy=True)


def _pick(path: Path, tensors: dict[str, Any], lazy: bool = False) -> dict[str, Tensor]:
    if any(k.startswith("model.diffusion_model.") for k in tensors):
        raise VGGFileError(f"{path} is a DiffPortrait360 checkpoint, not the VGG16 perceptual network. {FIX_GET}")
    missing = [k for k in NEEDED if k not in tensors]
    if missing:
        some = ", ".join(sorted(tensors)[:4]) or "none"
        raise VGGFileError(f"{path} is not NVIDIA's VGG16 LPIPS network: {len(missing)} of its {len(NEEDED)} tensors "
                           f"are missing (e.g. {', '.join(missing[:3])}; the file has {some} ...). {FIX_GET}")
    out = {}
    for k in NEEDED:
        t = tensors[k].load() if lazy else tensors[k]
        if not t.is_floating_point():
            raise VGGFileError(f"{path}: {k} is {t.dtype}, not floating point. {FIX_GET}")
        out[k] = t.float()
    return out


def _state_dict_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise VGGFileError(f"{path} could not be read as .safetensors ({e}). {FIX_GET}") from e
        if any(k.startswith(("backbone.", "superresolution.")) for k in sd):
            raise VGGFileError(f"{path} is a PanoHead generator, not the VGG16 perceptual network. Fix: pass it with "
                               f"--panohead; --vgg takes NVIDIA's vgg16.pt ({VGG_URL})")
        return _pick(path, sd)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses code; a damaged zip raises various errors
        raise VGGFileError(f"{path} was refused by torch.load(weights_only=True) ({type(e).__name__}). {FIX_GET}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise VGGFileError(f"{path} holds a {type(sd).__name__}, not a VGG16 state dict. {FIX_GET}")
    return _pick(path, sd)


def load_vgg(path: str | Path, device: str | torch.device = "cpu") -> VGG16LPIPS:
    """The projector's perceptual network from ``path`` (see the module docstring), in eval mode,
    gradients off. Raises :class:`VGGFileError` naming the problem and the fix for a missing,
    empty, truncated or foreign file (a PanoHead or DiffPortrait360 file is named as such)."""
    path = Path(path)
    if path.is_dir():
        raise VGGFileError(f"{path} is a directory, not the VGG16 file. {FIX_GET}")
    if not path.is_file():
        raise VGGFileError(f"VGG16 file not found: {path}. {FIX_GET}")
    if path.stat().st_size == 0:
        raise VGGFileError(f"{path} is empty (0 bytes). {FIX_GET}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if path.suffix == ".pkl" or (head.startswith(b"\x80") and b"torch_utils.persistence" in head):
        raise VGGFileError(f"{path} is a PanoHead network pickle, not the VGG16 perceptual network. Fix: pass it with "
                           f"--panohead; --vgg takes NVIDIA's vgg16.pt ({VGG_URL})")
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                if any("/code/" in n for n in z.namelist()):
                    sd = read_torchscript_tensors(path, z)
                else:
                    sd = None
        except zipfile.BadZipFile as e:
            raise VGGFileError(f"{path} is a damaged zip archive ({e}); the file is probably truncated. {FIX_GET}") from e
        if sd is None:
            sd = _state_dict_file(path)
    elif path.suffix == ".safetensors":
        sd = _state_dict_file(path)
    else:
        raise VGGFileError(f"{path} is neither a TorchScript archive, a .safetensors nor a torch.save file (it starts "
                           f"with {head[:8]!r}). {FIX_GET}")
    widths = tuple(int(sd[f"lpips{i}"].numel()) for i in range(len(CONVS_PER_STAGE)))
    net = VGG16LPIPS(widths)
    expected = net.state_dict()
    state = {}
    for k, v in expected.items():
        t = sd[k]
        if k.startswith("lpips"):
            t = t.reshape(-1)
        if tuple(t.shape) != tuple(v.shape):
            raise VGGFileError(f"{path}: {k} has shape {tuple(t.shape)}, a VGG16 with these tap widths needs "
                               f"{tuple(v.shape)}. {FIX_GET}")
        if not bool(torch.isfinite(t).all()):
            raise VGGFileError(f"{path}: {k} contains NaN or Inf; the file is corrupted. {FIX_GET}")
        state[k] = t
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)
