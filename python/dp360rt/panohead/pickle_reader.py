"""A restricted reader for PanoHead network pickles (``easy-khair-180-gpc0.8-trans10-025000.pkl``).

PanoHead's own loader unpickles everything and ``exec``s the module source text stored in every
persistent object. This reader executes nothing from the file:

* Every global the pickle names is looked up in a fixed allow-list (:data:`ALLOWED`) and replaced
  by a function or placeholder of ours; any other global (``os.system``, ``builtins.eval``, a
  ``__reduce__`` of any class) raises :class:`UnsafePickleError` before anything is called.
* A persistent object (``torch_utils.persistence._reconstruct_persistent_obj``) becomes a
  :class:`PersistentObject` holding its class name and state; the class name must be one of
  PanoHead's (:data:`PERSISTENT_CLASSES`); its ``module_src`` is never compiled, only hashed.
* Tensor storages (``torch.storage._load_from_bytes``) are decoded from the legacy ``torch.save``
  layout by :func:`decode_storage` with a second allow-list (storage types only).

``read_network_pickle(path).state_dict("G_ema")`` and ``.spec("G_ema")`` are what
:func:`dp360rt.panohead.weights.generator_from_state` needs.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import CheckpointError

GENERATOR_CLASS = "training.triplane.TriPlaneGenerator"
RELEASE_FILE = "easy-khair-180-gpc0.8-trans10-025000.pkl"


class PanoHeadCheckpointError(CheckpointError):
    """A PanoHead file cannot be used; the message names the problem and the fix."""


# class names of the persistent objects in PanoHead's G, G_ema and D (bare names, as pickled)
PERSISTENT_CLASSES = {
    "TriPlaneGenerator": "training.triplane", "OSGDecoder": "training.triplane",
    "ImportanceRenderer": "training.volumetric_rendering.renderer",
    "MipRayMarcher2": "training.volumetric_rendering.ray_marcher",
    **{n: "training.networks_stylegan2" for n in (
        "Generator", "MappingNetwork", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer", "ToRGBLayer",
        "FullyConnectedLayer", "Conv2dLayer", "DiscriminatorBlock", "DiscriminatorEpilogue", "MinibatchStdLayer",
        "Discriminator")},
    **{n: "training.superresolution" for n in (
        "SuperresolutionHybrid8XDC", "SuperresolutionHybrid8X", "SuperresolutionHybrid4X", "SuperresolutionHybrid2X",
        "SynthesisBlockNoUp", "SynthesisLayerNoUp")},
    **{n: "training.dual_discriminator" for n in (
        "MaskDualDiscriminatorV2", "MaskDualDiscriminator", "DualDiscriminator", "SingleDiscriminator",
        "DummyDualDiscriminator")},
}
STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
NUMERIC_KINDS = "biufc?"


class UnsafePickleError(PanoHeadCheckpointError):
    """The pickle names something outside the allow-list; nothing from it was executed."""


class PersistentObject:
    """A PanoHead persistent module as pickled: class name, defining module, state (``__dict__``)."""

    def __init__(self, class_name: str, module: str, state: dict, source_sha256: str):
        self.class_name, self.module, self.state, self.source_sha256 = class_name, module, state, source_sha256

    def __repr__(self) -> str:
        return f"PersistentObject({self.module}.{self.class_name})"


class PlainModule:
    """A plain ``torch.nn`` module (or PanoHead's RaySampler) pickled by NEWOBJ + BUILD: only its state is kept."""
    kind = ""

    def __init__(self, *args):
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for {self.kind}: {type(state).__name__}")
        self.state = state


def _plain(kind: str) -> type:
    return type(kind.rsplit(".", 1)[1], (PlainModule,), {"kind": kind})


class EasyDict(dict):
    """dnnlib's attribute dict, as a plain dict."""


class _Guarded:
    """An allow-listed callable; BUILD on it (setting attributes of our function) is refused."""
    __slots__ = ("fn", "name")

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle tries to set attributes of {self.name}")


def _reconstruct_persistent(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("a persistent object is not a class record. Fix: pass a PanoHead network pickle")
    name = meta.get("class_name")
    if name not in PERSISTENT_CLASSES:
        raise UnsafePickleError(f"persistent class {name!r} is not one of PanoHead's; its embedded source was not run. "
                                f"Fix: pass the released PanoHead pickle ({RELEASE_FILE}) or a .safetensors made by "
                                "`dp360rt convert`")
    src = meta.get("module_src", "")
    sha = hashlib.sha256(src.encode("utf-8") if isinstance(src, str) else b"").hexdigest()
    state = meta.get("state")
    if not isinstance(state, dict):
        raise UnsafePickleError(f"persistent object {name} has no state dict")
    return PersistentObject(name, PERSISTENT_CLASSES[name], state, sha)


class _LegacyStorageUnpickler(pickle.Unpickler):
    """The protocol-2 pickles inside one legacy ``torch.save`` blob: only storage types, persistent ids."""

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return ("storage-type", name)
        raise UnsafePickleError(f"a tensor storage names {module}.{name}; only torch storage types are allowed")

    def persistent_load(self, pid):
        return ("pid", pid)


def decode_storage(blob: bytes) -> Tensor:
    """One storage of a legacy (non-zip) ``torch.save`` blob -> flat tensor (a copy, own memory).

    Layout: pickles of the magic number, the version, system info, the object (a persistent id
    ``('storage', StorageType, key, location, numel, view)``) and the key list; then per key an
    int64 element count and the raw little-endian bytes."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError("a tensor storage is not a byte string")
    f = io.BytesIO(blob)
    try:
        magic = _LegacyStorageUnpickler(f).load()
        if magic != LEGACY_MAGIC:
            raise PanoHeadCheckpointError("a tensor storage blob has the wrong magic number (not a legacy torch.save)")
        version = _LegacyStorageUnpickler(f).load()
        info = _LegacyStorageUnpickler(f).load()
        obj = _LegacyStorageUnpickler(f).load()
        keys = _LegacyStorageUnpickler(f).load()
    except (EOFError, pickle.UnpicklingError, struct.error) as e:
        raise PanoHeadCheckpointError(f"a tensor storage blob is truncated or corrupted ({e}). Fix: download the file again") from e
    if version != 1001 or not isinstance(info, dict) or not info.get("little_endian", False):
        raise PanoHeadCheckpointError(f"unsupported legacy storage (version {version}, little_endian "
                                      f"{isinstance(info, dict) and info.get('little_endian')})")
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "pid" and isinstance(obj[1], tuple)
            and len(obj[1]) >= 5 and obj[1][0] == "storage" and isinstance(obj[1][1], tuple)):
        raise UnsafePickleError("a tensor storage blob holds something other than one storage")
    _, (_, type_name), key, _location, numel = obj[1][:5]
    if not isinstance(keys, list) or keys != [key]:
        raise PanoHeadCheckpointError("a tensor storage blob lists unexpected storage keys")
    dtype = STORAGE_DTYPES[type_name]
    head = f.read(8)
    if len(head) != 8:
        raise PanoHeadCheckpointError("a tensor storage blob is truncated. Fix: download the file again")
    (count,) = struct.unpack("<q", head)
    size = torch.empty((), dtype=dtype).element_size()
    data = f.read(count * size)
    if count != numel or len(data) != count * size:
        raise PanoHeadCheckpointError(f"a tensor storage blob is truncated ({len(data)} of {count * size} bytes). "
                                      "Fix: download the file again")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None) -> Tensor:
    if not isinstance(storage, Tensor):
        raise UnsafePickleError("a tensor is built from something that is not a decoded storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    last = int(offset) + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else int(offset) - 1
    if len(size) != len(stride) or int(offset) < 0 or last >= storage.numel():
        raise PanoHeadCheckpointError(f"a tensor of size {size} does not fit its storage of {storage.numel()} elements")
    return torch.as_strided(storage, size, stride, int(offset)).clone()


def _rebuild_parameter(data: Tensor, requires_grad=False, hooks=None) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafePickleError("a parameter is built from something that is not a tensor")
    return data


class _DType:
    """numpy.dtype(name, align, copy) for numeric types only; BUILD sets the byte order."""

    def __init__(self, name, align=False, copy=True):
        try:
            dt = np.dtype(str(name))
        except TypeError as e:
            raise UnsafePickleError(f"numpy dtype {name!r} is not understood") from e
        if dt.kind not in NUMERIC_KINDS:
            raise UnsafePickleError(f"numpy dtype {name!r} is not numeric; refused")
        self.np = dt

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.np = self.np.newbyteorder(state[1])


def _np_scalar(dtype: _DType, data: bytes = b"") -> Any:
    if not isinstance(dtype, _DType) or not isinstance(data, bytes) or len(data) != dtype.np.itemsize:
        raise UnsafePickleError("a numpy scalar is malformed")
    return np.frombuffer(data, dtype=dtype.np)[0].item()


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): decode_storage,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
}
ALLOWED_CLASSES: dict[tuple[str, str], type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("numpy", "dtype"): _DType,
    **{tuple(k.rsplit(".", 1)): _plain(k) for k in (  # type: ignore[misc]
        "training.volumetric_rendering.ray_sampler.RaySampler", "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.Softplus", "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.activation.LeakyReLU", "torch.nn.modules.linear.Identity")},
}


class _NetworkUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return _Guarded(ALLOWED[(module, name)], f"{module}.{name}")
        if (module, name) in ALLOWED_CLASSES:
            return ALLOWED_CLASSES[(module, name)]
        raise UnsafePickleError(f"the pickle refers to the Python global {module}.{name}, which a PanoHead network "
                                "pickle never holds; nothing was executed. Fix: pass the released PanoHead pickle "
                                f"({RELEASE_FILE}) unchanged, or a .safetensors made by `dp360rt convert`")

    def persistent_load(self, pid):
        raise UnsafePickleError("the pickle uses persistent ids, which PanoHead network pickles do not")


def _plain_data(x: Any) -> Any:
    """EasyDicts, OrderedDicts, tuples -> JSON-able dicts and lists."""
    if isinstance(x, dict):
        return {str(k): _plain_data(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain_data(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    return x


class NetworkSnapshot:
    """A read PanoHead network pickle: ``objects`` is its top-level dict (``G``, ``D``, ``G_ema``,
    ``training_set_kwargs``, ``augment_pipe``) with modules as :class:`PersistentObject`."""

    def __init__(self, objects: dict, path: str):
        self.objects, self.path = objects, path

    def module(self, name: str) -> PersistentObject:
        m = self.objects.get(name)
        if not isinstance(m, PersistentObject):
            raise PanoHeadCheckpointError(f"{self.path} holds no {name} network (keys: {', '.join(map(str, self.objects))}). "
                                          f"Fix: pass a PanoHead training snapshot ({RELEASE_FILE})")
        return m

    def state_dict(self, name: str = "G_ema") -> dict[str, Tensor]:
        """The module's ``state_dict()`` as PyTorch would write it (parameters, persistent buffers, children)."""
        out: dict[str, Tensor] = {}

        def walk(obj: Any, prefix: str) -> None:
            st = obj.state
            skip = set(st.get("_non_persistent_buffers_set") or ())
            for k, v in (st.get("_parameters") or {}).items():
                if v is not None:
                    out[prefix + k] = v
            for k, v in (st.get("_buffers") or {}).items():
                if v is not None and k not in skip:
                    out[prefix + k] = v
            for k, child in (st.get("_modules") or {}).items():
                if child is not None:
                    if not isinstance(child, (PersistentObject, PlainModule)):
                        raise PanoHeadCheckpointError(f"{self.path}: {prefix}{k} is not a module")
                    walk(child, f"{prefix}{k}.")

        walk(self.module(name), "")
        return out

    def spec(self, name: str = "G_ema") -> dict:
        """The generator's class, init kwargs and rendering attributes (JSON-able)."""
        m = self.module(name)
        full = f"{m.module}.{m.class_name}"
        if full != GENERATOR_CLASS:
            raise PanoHeadCheckpointError(f"{self.path}: {name} is a {full}, not a {GENERATOR_CLASS}")
        st = m.state
        if st.get("_init_args"):
            raise PanoHeadCheckpointError(f"{self.path}: {name} was built with positional init args; expected kwargs only")
        return {"class_name": full, "init_kwargs": _plain_data(st.get("_init_kwargs") or {}),
                "neural_rendering_resolution": st.get("neural_rendering_resolution"),
                "rendering_kwargs": _plain_data(st.get("rendering_kwargs"))}

    def source_hashes(self) -> dict[str, str]:
        """SHA-256 of the (never executed) module source stored with each persistent class."""
        found: dict[str, str] = {}

        def walk(obj: Any) -> None:
            if isinstance(obj, PersistentObject):
                found[f"{obj.module}.{obj.class_name}"] = obj.source_sha256
            if isinstance(obj, (PersistentObject, PlainModule)):
                for child in (obj.state.get("_modules") or {}).values():
                    walk(child)

        for v in self.objects.values():
            walk(v)
        return found


def _refuse_other_formats(path: Path, head: bytes) -> None:
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        dp360 = script = False
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                script = any("/code/" in n for n in names)
                pkl = next((n for n in names if n.endswith("data.pkl")), None)
                dp360 = pkl is not None and b"model.diffusion_model." in z.read(pkl)
        except (zipfile.BadZipFile, OSError, RuntimeError):
            pass
        if script:
            raise PanoHeadCheckpointError(f"{path} is a TorchScript archive (such as NVIDIA's VGG16 vgg16.pt), not a "
                                          "PanoHead network pickle. Fix: pass vgg16.pt with --vgg, and the PanoHead "
                                          f"generator ({RELEASE_FILE} or its converted .safetensors) with --panohead")
        what = "a DiffPortrait360 checkpoint (a torch.save zip with model.diffusion_model.* keys)" if dp360 else \
            "a torch.save zip archive"
        raise PanoHeadCheckpointError(f"{path} is {what}, not a PanoHead network pickle. Fix: pass the PanoHead "
                                      f"generator ({RELEASE_FILE} or its converted .safetensors)")
    if not head.startswith(b"\x80"):
        raise PanoHeadCheckpointError(f"{path} is not a pickle (it starts with {head[:8]!r}). Fix: pass the PanoHead "
                                      f"network pickle ({RELEASE_FILE})")


def read_network_pickle(path: str | Path) -> NetworkSnapshot:
    """Read a PanoHead network pickle without executing anything in it (see the module docstring).

    Raises :class:`UnsafePickleError` for any global or class outside the allow-lists and
    :class:`~dp360rt.panohead.weights.PanoHeadCheckpointError` for missing, empty, truncated or
    foreign files (a DiffPortrait360 checkpoint is named as such)."""
    path = Path(path)
    if not path.is_file():
        raise PanoHeadCheckpointError(f"PanoHead file not found: {path}")
    if path.stat().st_size == 0:
        raise PanoHeadCheckpointError(f"{path} is empty (0 bytes). Fix: download {RELEASE_FILE} again")
    with open(path, "rb") as f:
        _refuse_other_formats(path, f.read(8))
        f.seek(0)
        try:
            obj = _NetworkUnpickler(f).load()
        except UnsafePickleError:
            raise
        except PanoHeadCheckpointError as e:
            raise PanoHeadCheckpointError(f"{path}: {e}") from e
        except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError, RecursionError) as e:
            raise PanoHeadCheckpointError(f"{path} could not be read ({type(e).__name__}: {e}). The file is probably "
                                          "truncated or corrupted. Fix: download it again") from e
    if not isinstance(obj, dict):
        raise PanoHeadCheckpointError(f"{path} holds a {type(obj).__name__}, not a network snapshot dict. Fix: pass "
                                      f"a PanoHead training snapshot ({RELEASE_FILE})")
    return NetworkSnapshot(obj, str(path))
