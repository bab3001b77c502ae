"""The service's result store: one folder per generation in the result layout.

``ROOT/{id}/back_view.png``, ``000.png`` ... ``031.png`` and, once every view is there,
``cameras.json`` (``{"views": [{"file", "camera": [25 floats]}]}``). Every file is written under a
temporary name and renamed into place, so a reader never sees a half-written file. A generation
that fails or is cancelled has its folder removed: at rest a folder is complete or absent. The
store is size-capped: when finished generations exceed ``max_bytes``, the oldest go first.
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

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAME_PATTERN = re.compile(r"^(back_view|\d{3})$")


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
        for d in sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime):
            if (d / "cameras.json").is_file() and ID_PATTERN.match(d.name):
                self._finished[d.name] = _folder_bytes(d)
            elif ID_PATTERN.match(d.name):          # left half-written by a server that was killed
                shutil.rmtree(d, ignore_errors=True)

    def new(self) -> str:
        """A fresh URL-safe generation id, its folder created."""
        with self._lock:
            while True:
                gen_id = secrets.token_urlsafe(12)
                if not (self.root / gen_id).exists():
                    break
            (self.root / gen_id).mkdir()
            self._active.add(gen_id)
        return gen_id

    def write_view(self, gen_id: str, index: int, image: np.ndarray) -> str:
        """Store one view's PNG atomically; returns its file name."""
        name = view_name(index) + ".png"
        _write_atomic(self.root / gen_id / name, encode_png(image))
        return name

    def finish(self, gen_id: str, cameras: dict[int, list[float]]) -> None:
        """Write ``cameras.json`` (orbit views in index order), mark the folder complete, evict."""
        views = [{"file": view_name(i) + ".png", "camera": cameras[i]} for i in sorted(cameras) if i >= 0]
        _write_atomic(self.root / gen_id / "cameras.json", json.dumps({"views": views}, indent=1).encode())
        with self._lock:
            self._active.discard(gen_id)
            self._finished[gen_id] = _folder_bytes(self.root / gen_id)
            self._evict()

    def discard(self, gen_id: str) -> None:
        """Remove a generation that did not finish (failed or cancelled)."""
        with self._lock:
            self._active.discard(gen_id)
            self._finished.pop(gen_id, None)
        shutil.rmtree(self.root / gen_id, ignore_errors=True)

    def file(self, gen_id: str, name: str) -> Path | None:
        """The stored PNG ``name`` (``back_view`` or ``000``..) of a generation, or None."""
        if not ID_PATTERN.match(gen_id) or not NAME_PATTERN.match(name):
            return None
        p = self.root / gen_id / f"{name}.png"
        return p if p.is_file() else None

    def folder(self, gen_id: str) -> Path | None:
        """A generation's folder (complete or still filling), or None."""
        if not ID_PATTERN.match(gen_id):
            return None
        p = self.root / gen_id
        return p if p.is_dir() else None

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _evict(self) -> None:
        total = sum(self._finished.values())
        while total > self.max_bytes and len(self._finished) > 1:
            old, size = self._finished.popitem(last=False)
            shutil.rmtree(self.root / old, ignore_errors=True)
            total -= size


def _folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
