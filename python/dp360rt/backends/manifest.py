"""The export manifest: ``manifest.json`` of an export directory (written by the offline toolchain,
``python -m dp360rt.export``) describes each ONNX file - module, shape profiles, input and output
names/shapes/dtypes, file hashes - and the state-dict hashes that tie an export to the weights it
was built from. Written by :mod:`dp360rt.export.onnx_export`, read by every exported backend
(:mod:`.exported`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dp360rt-export-v1"
# Which official state-dict prefix holds the weights of each exported module.
MODULE_PREFIX = {
    "text": "cond_stage_model",
    "vae_encoder": "first_stage_model",
    "vae_decoder": "first_stage_model",
    "appearance": "control_model",
    "pose": "pose_control_model",
    "unet": "model.diffusion_model",
    "unet_nobank": "model.diffusion_model",
}
# Manifest dtype names -> torch dtypes (TensorSpec.dtype).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8}


class ExportMismatchError(ValueError):
    """An export directory cannot serve a call or a model: the message names what differs and the fix."""


# -- the manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ExportedFile:
    """One ONNX file of an export (``manifest.json`` entry)."""

    file: str                        # path relative to the export directory
    kind: str                        # nvs | backview
    module: str                      # text, vae_encoder, vae_decoder, appearance, pose, unet, unet_nobank
    profiles: tuple[str, ...]
    rows: int                        # batch rows of the call (refs for the appearance net)
    cond_rows: int | None            # unet: rows reading the bank
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    precision: str                   # fp32 | fp16
    sha256: str                      # of the .onnx file
    data_file: str | None            # the kind's external weights file (relative), KIND/weights.data
    data_sha256: str | None
    bytes: int                       # .onnx + external data
    state_dict_sha256: str           # of the module's weights (its state-dict prefix) at export
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExportedFile":
        return cls(file=str(d["file"]), kind=str(d["kind"]), module=str(d["module"]),
                   profiles=tuple(d.get("profiles", ())), rows=int(d["rows"]),
                   cond_rows=None if d.get("cond_rows") is None else int(d["cond_rows"]),
                   inputs=tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                   outputs=tuple(TensorSpec.from_json(x) for x in d["outputs"]), opset=int(d["opset"]),
                   precision=str(d["precision"]), sha256=str(d["sha256"]), data_file=d.get("data_file"),
                   data_sha256=d.get("data_sha256"), bytes=int(d.get("bytes", 0)),
                   state_dict_sha256=str(d.get("state_dict_sha256", "")), raw=dict(d))

    def describe(self) -> str:
        shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in self.inputs[:2])
        cond = f", cond_rows {self.cond_rows}" if self.cond_rows is not None else ""
        return f"{self.file} (profiles {', '.join(self.profiles) or '-'}; {shapes}{cond})"


class ExportManifest:
    """``manifest.json`` of an export directory."""

    def __init__(self, directory: str | Path, data: Mapping[str, Any]):
        self.dir = Path(directory)
        self.data = data
        if data.get("format") != MANIFEST_FORMAT:
            raise ExportMismatchError(f"{self.dir / MANIFEST_NAME}: format {data.get('format')!r}, expected "
                                      f"{MANIFEST_FORMAT!r}. Fix: re-export with this version (python -m dp360rt.export ...)")
        self.files = [ExportedFile.from_json(f) for f in data.get("files", [])]
        self.models: dict[str, Any] = dict(data.get("models", {}))

    @classmethod
    def load(cls, directory: str | Path) -> "ExportManifest":
        d = Path(directory)
        p = d / MANIFEST_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {d}. Fix: export first, e.g. "
                                    f"`python -m dp360rt.export --config full --nvs NVS.th --backview BACK.th --out {d}`")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ExportMismatchError(f"{p} is not valid JSON ({e}); re-export") from e
        return cls(d, data)

    def path(self, entry: ExportedFile) -> Path:
        return self.dir / entry.file

    def select(self, kind: str, profiles: Iterable[str] | None = None) -> list[ExportedFile]:
        want = None if profiles is None else set(profiles)
        return [f for f in self.files if f.kind == kind and (want is None or want & set(f.profiles))]

    @property
    def profiles(self) -> dict[str, Any]:
        return dict(self.data.get("profiles", {}))


# -- weights identity ------------------------------------------------------------------------------
def _tensor_record(key: str, t: Tensor) -> tuple[bytes, Any]:
    t = t.detach().to("cpu").contiguous()
    head = f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode()
    body = t.reshape(-1).view(torch.uint8).numpy() if t.numel() and t.dtype != torch.bool else t.numpy().tobytes()
    return head, body


def state_dict_hashes(state: Mapping[str, Tensor], prefixes: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """(sha256 of the whole state dict, sha256 of the entries under each ``prefix.``) in one pass:
    key, dtype, shape and bytes of each entry, keys sorted. Identifies the weights of an export."""
    full = hashlib.sha256()
    per = {p: hashlib.sha256() for p in prefixes}
    for k in sorted(state):
        head, body = _tensor_record(k, state[k])
        hs = [full] + [h for p, h in per.items() if k.startswith(p + ".")]
        for h in hs:
            h.update(head)
            h.update(body)
    return full.hexdigest(), {p: h.hexdigest() for p, h in per.items()}


def state_dict_sha256(state: Mapping[str, Tensor], prefix: str | None = None) -> str:
    """sha256 of a state dict, or of its entries under ``prefix.`` (see :func:`state_dict_hashes`)."""
    if prefix is None:
        return state_dict_hashes(state)[0]
    sub = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state_dict_hashes(sub, [prefix])[1][prefix]


def config_json(cfg: Any) -> Any:
    """A model config as plain JSON values (tuples as lists), for comparing with a manifest."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
