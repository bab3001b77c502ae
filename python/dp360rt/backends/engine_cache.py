"""The TensorRT engine cache: an engine is reused only for exactly what it was built from.

A TensorRT engine is valid for one ONNX file, one precision, one set of static shapes, one
TensorRT version and one GPU model (name and compute capability); loading it anywhere else either
fails deep inside TensorRT or - worse - silently runs an engine of an older export. So every
engine is stored under its :class:`EngineKey`: the file name carries a digest of all key fields,
a JSON sidecar holds the fields themselves and the engine bytes' sha256. A lookup only ever
returns an engine whose sidecar equals the requested key field by field and whose bytes hash to
the recorded value. Anything else is rebuilt, or with ``rebuild=False`` refused with
:class:`StaleEngineError` naming the mismatched field(s).

Pure Python (no TensorRT needed): the environment fields can be passed in, which is how the
tests exercise it on CPU.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

KEY_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    onnx_sha256: str          # content of the ONNX file (and its external data)
    precision: str            # fp32 | fp16 | bf16 | fp8 | int8
    profile: str              # shape profile: profile names + the static input shapes
    trt_version: str
    gpu_name: str
    compute_capability: str   # "major.minor"

    def fields(self) -> dict[str, str]:
        return asdict(self)

    def digest(self) -> str:
        blob = json.dumps({"v": KEY_VERSION, **self.fields()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def differences(self, other: "EngineKey") -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_fields(cls, d: dict) -> "EngineKey":
        return cls(**{f.name: str(d[f.name]) for f in fields(cls)})


class StaleEngineError(RuntimeError):
    """The cache holds no engine for this key (and rebuilding was not allowed). ``mismatched``
    names the key fields in which the closest cached engine differs."""

    def __init__(self, message: str, mismatched: list[str] | None = None):
        super().__init__(message)
        self.mismatched = mismatched or []


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def onnx_content_sha256(onnx_path: str | Path, data_path: str | Path | None = None,
                        memo: str | Path | None = None) -> str:
    """sha256 over an ONNX file followed by its external data file (if any).

    ``memo``: a JSON file remembering hashes by (path, size, mtime), so multi-GB files are hashed
    again only after they change."""
    paths = [Path(onnx_path)] + ([Path(data_path)] if data_path else [])
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    table: dict = {}
    if memo is not None and Path(memo).is_file():
        try:
            table = json.loads(Path(memo).read_text())
        except (json.JSONDecodeError, OSError):
            table = {}
    k = json.dumps(stamp)
    if k in table:
        return table[k]
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    digest = h.hexdigest()
    if memo is not None:
        table[k] = digest
        _atomic_write(Path(memo), json.dumps(table, indent=1).encode())
    return digest


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """Engines in ``directory``, as ``{stem}.{key digest}.engine`` + ``.json`` sidecar."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def engine_path(self, stem: str, key: EngineKey) -> Path:
        return self.dir / f"{stem}.{key.digest()}.engine"

    @staticmethod
    def sidecar(engine: Path) -> Path:
        return engine.with_name(engine.name + ".json")

    def entries(self, stem: str) -> list[tuple[Path, EngineKey | None]]:
        """Cached engines of ``stem`` with their recorded keys (None: sidecar missing or unreadable)."""
        out = []
        for p in sorted(self.dir.glob(f"{stem}.*.engine")):
            if p.name.count(".") != stem.count(".") + 2:   # another stem sharing this prefix
                continue
            try:
                key = EngineKey.from_fields(json.loads(self.sidecar(p).read_text())["key"])
            except (OSError, KeyError, TypeError, json.JSONDecodeError):
                key = None
            out.append((p, key))
        return out

    def lookup(self, stem: str, key: EngineKey) -> Path | None:
        """The engine built for exactly ``key``, or None. Never returns a file whose sidecar differs in
        any field or whose bytes do not hash to the recorded value."""
        p = self.engine_path(stem, key)
        if not p.is_file():
            return None
        try:
            meta = json.loads(self.sidecar(p).read_text())
            recorded = EngineKey.from_fields(meta["key"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            return None
        if recorded != key or meta.get("engine_sha256") != sha256_file(p):
            return None
        return p

    def store(self, stem: str, key: EngineKey, data: bytes, extra: dict | None = None) -> Path:
        p = self.engine_path(stem, key)
        _atomic_write(p, data)
        meta = {"key": key.fields(), "engine_sha256": sha256_bytes(data), "bytes": len(data),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
        _atomic_write(self.sidecar(p), json.dumps(meta, indent=1).encode())
        return p

    def explain_miss(self, stem: str, key: EngineKey) -> tuple[str, list[str]]:
        """Why no engine matches: the closest cached engine of ``stem`` and its differing fields."""
        cands = [(p, k) for p, k in self.entries(stem)]
        if not cands:
            return f"no cached engine for {stem} in {self.dir}", []
        same_name = self.engine_path(stem, key)
        if same_name.is_file():
            return (f"the cached engine {same_name.name} does not verify (sidecar missing/changed or engine bytes "
                    "altered since it was written)", ["engine_sha256"])
        scored = sorted(((k.differences(key) if k else ["<unreadable sidecar>"], p, k) for p, k in cands),
                        key=lambda t: len(t[0]))
        diff, p, k = scored[0]
        if k is None:
            return f"the cached engine {p.name} has no readable key", diff
        detail = "; ".join(f"{f}: cached {getattr(k, f)!r} vs now {getattr(key, f)!r}" for f in diff)
        return f"the cached engine {p.name} was built for a different {', '.join(diff)} ({detail})", diff

    def get(self, stem: str, key: EngineKey, build: Callable[[], bytes], rebuild: bool = True,
            prune: bool = True, extra: dict | None = None) -> tuple[bytes, Path, bool]:
        """(engine bytes, path, came from cache). A miss builds (``build()``) and stores - removing
        this stem's stale engines when ``prune`` - or with ``rebuild=False`` raises :class:`StaleEngineError`."""
        p = self.lookup(stem, key)
        if p is not None:
            return p.read_bytes(), p, True
        if not rebuild:
            why, diff = self.explain_miss(stem, key)
            raise StaleEngineError(f"TensorRT engine for {stem}: {why}. Refusing to load a stale engine; "
                                   "fix: allow a rebuild (rebuild=True, or drop --no-rebuild)", diff)
        data = build()
        if prune:
            for old, _ in self.entries(stem):
                if old != self.engine_path(stem, key):
                    old.unlink(missing_ok=True)
                    self.sidecar(old).unlink(missing_ok=True)
        return data, self.store(stem, key, data, extra), False
