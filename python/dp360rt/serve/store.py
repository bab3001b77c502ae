"""The service's result store: one folder per generation in the result layout.

While a generation runs its files go into ``ROOT/.partial-{id}/`` (served from there to this
process's clients only); ``finish`` writes ``cameras.json`` (``{"views": [{"file", "camera"}]}``)
and ``manifest.json`` last (every file with its size and sha256, as :mod:`dp360rt.io.results`
writes it) and renames the folder to ``ROOT/{id}/``. So a folder named by an id is complete, and
only a complete folder carries ``manifest.json``. Every file is written under a temporary name and
renamed into place, so a reader never sees a half-written file. A generation that fails or is
cancelled has its folder removed; partial folders left by a killed server are never served and
are removed when a store opens the root. The store is size-capped: when finished generations
exceed ``max_bytes``, the oldest go first. The portable heads made later from a finished
generation's NeRF (``assets/head.glb``, ``assets/head.ply``) are kept in its folder, beside the
manifest that describes the views (they are not in it: they come from a fit, not from the run).
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.results import MANIFEST, sha256_file

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAME_PATTERN = re.compile(r"^(back_view|\d{3})$")
# relative paths a backend may add to a generation (crop/..., inversion/...): plain names, no "..", no dotfiles
EXTRA_PATTERN = re.compile(r"^(crop|inversion)(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}){1,2}$")
PARTIAL = ".partial-"
# portable heads made from a finished generation's fitted NeRF (GET .../head.glb, .../head.ply)
ASSET_NAMES = ("head.glb", "head.ply")
ASSETS = "assets"


def view_name(index: int) -> str:
    """File stem of a view: ``back_view`` for index -1, else ``000`` .. ``031``."""
    return "back_view" if index < 0 else f"{index:03d}"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class ResultStore:
    """Generation folders under ``root`` (default: a temporary folder removed by :meth:`close`).

    ``max_bytes``: cap on the finished generations' total size; the oldest are evicted first
    (generations still running are never evicted)."""

    def __init__(self, root: str | Path | None = None, max_bytes: int = 2 << 30):
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dp360rt-store-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._finished: OrderedDict[str, int] = OrderedDict()    # id -> bytes, oldest first
        self._active: set[str] = set()
        self.removed_at_start = 0
        for d in sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime):
            if ID_PATTERN.match(d.name) and (d / MANIFEST).is_file():
                self._finished[d.name] = _folder_bytes(d)
            elif d.name.startswith(PARTIAL) or ID_PATTERN.match(d.name):   # left by a server that was killed
                shutil.rmtree(d, ignore_errors=True)
                self.removed_at_start += 1

    def new(self) -> str:
        """A fresh URL-safe generation id, its (partial) folder created."""
        with self._lock:
            while True:
                gen_id = secrets.token_urlsafe(12)
                if not (self.root / gen_id).exists() and not self._partial(gen_id).exists():
                    break
            self._partial(gen_id).mkdir()
            self._active.add(gen_id)
        return gen_id

    def write_view(self, gen_id: str, index: int, image: np.ndarray) -> str:
        """Store one view's PNG atomically; returns its file name."""
        name = view_name(index) + ".png"
        self._write(gen_id, name, encode_png(image))
        return name

    def write_extra(self, gen_id: str, files: dict[str, bytes]) -> None:
        """Store a generation's other results (``crop/...``, ``inversion/...``: relative path -> bytes)."""
        for rel, data in files.items():
            if not EXTRA_PATTERN.match(rel):
                raise ValueError(f"{rel!r} is not a result file the store keeps (crop/..., inversion/...)")
            self._write(gen_id, rel, data)

    def _write(self, gen_id: str, rel: str, data: bytes) -> None:
        # Under the lock: a write racing a discard (the client hung up while its view was being
        # stored) must not recreate a file in a folder being removed, or the folder survives.
        with self._lock:
            if gen_id not in self._active:
                return
            p = self._partial(gen_id) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(p, data)

    def finish(self, gen_id: str, cameras: dict[int, list[float]]) -> None:
        """Write ``cameras.json`` (orbit views in index order) and ``manifest.json``, move the
        folder into place (complete), evict the oldest past the cap."""
        d = self._partial(gen_id)
        views = [{"file": view_name(i) + ".png", "camera": cameras[i]} for i in sorted(cameras) if i >= 0]
        self._write(gen_id, "cameras.json", json.dumps({"views": views}, indent=1).encode())
        with self._lock:
            if gen_id not in self._active:           # discarded meanwhile
                return
            files = {f.relative_to(d).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(d.rglob("*")) if f.is_file()}
            manifest = {"run_id": gen_id, "kind": "views", "complete": True, "views": len(views), "files": files}
            _write_atomic(d / MANIFEST, json.dumps(manifest, indent=1).encode())
            os.replace(d, self.root / gen_id)
            self._active.discard(gen_id)
            self._finished[gen_id] = _folder_bytes(self.root / gen_id)
            self._evict()

    def discard(self, gen_id: str) -> None:
        """Remove a generation (failed, cancelled or deleted), complete or not."""
        if not ID_PATTERN.match(gen_id):
            return
        with self._lock:
            self._active.discard(gen_id)
            self._finished.pop(gen_id, None)
            shutil.rmtree(self._partial(gen_id), ignore_errors=True)
            shutil.rmtree(self.root / gen_id, ignore_errors=True)

    def file(self, gen_id: str, name: str) -> Path | None:
        """The stored PNG ``name`` (``back_view`` or ``000``..) of a complete generation, or of one
        running in this process; None otherwise."""
        with self._lock:            # not between finish's rename and its bookkeeping
            return self.file_unlocked(gen_id, name)

    def file_unlocked(self, gen_id: str, name: str) -> Path | None:
        if not ID_PATTERN.match(gen_id) or not NAME_PATTERN.match(name):
            return None
        for d in (self.root / gen_id, self._partial(gen_id) if gen_id in self._active else None):
            if d is not None and (d / f"{name}.png").is_file():
                return d / f"{name}.png"
        return None

    def read(self, gen_id: str, name: str) -> bytes | None:
        """The bytes of :meth:`file` (read under the lock: a finishing generation's folder is renamed
        from ``.partial-ID`` to ``ID``, and a path looked up before would be gone when opened)."""
        with self._lock:
            p = self.file_unlocked(gen_id, name)
            return p.read_bytes() if p is not None else None

    def write_asset(self, gen_id: str, name: str, data: bytes) -> bool:
        """Keep an asset made from a complete generation (``assets/head.glb``, ``assets/head.ply``),
        written atomically; False when the generation is not (or no longer) complete here."""
        if name not in ASSET_NAMES or not ID_PATTERN.match(gen_id):
            raise ValueError(f"{name!r} is not an asset the store keeps ({', '.join(ASSET_NAMES)})")
        with self._lock:
            d = self.root / gen_id
            if gen_id not in self._finished or not (d / MANIFEST).is_file():
                return False
            (d / ASSETS).mkdir(exist_ok=True)
            _write_atomic(d / ASSETS / name, data)
            self._finished[gen_id] = _folder_bytes(d)
            self._evict()
            return True

    def read_asset(self, gen_id: str, name: str) -> bytes | None:
        """An asset kept by :meth:`write_asset`, or None."""
        if name not in ASSET_NAMES or not ID_PATTERN.match(gen_id):
            return None
        with self._lock:
            p = self.root / gen_id / ASSETS / name
            return p.read_bytes() if p.is_file() else None

    def folder(self, gen_id: str) -> Path | None:
        """A complete generation's folder, or None."""
        if not ID_PATTERN.match(gen_id):
            return None
        p = self.root / gen_id
        return p if (p / MANIFEST).is_file() else None

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _partial(self, gen_id: str) -> Path:
        return self.root / f"{PARTIAL}{gen_id}"

    def _evict(self) -> None:
        total = sum(self._finished.values())
        while total > self.max_bytes and len(self._finished) > 1:
            old, size = self._finished.popitem(last=False)
            shutil.rmtree(self.root / old, ignore_errors=True)
            total -= size


def _folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
