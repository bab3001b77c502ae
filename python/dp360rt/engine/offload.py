"""Edge mode: the two diffusion models take turns in memory.

The back-view model runs once per portrait, before the 360° model; holding both costs their
weights together (about 9.4 GB in bfloat16 at full size). :class:`ModelSwap` keeps one resident:
the other's own parameters are written once to a file (``torch.save``, one per model, in an
offload directory) and replaced by 'meta' placeholders; making it resident again loads that file
memory-mapped (``weights_only=True``) and moves the tensors to the device. Tensors the two models
hold as one copy (the frozen VAE and text tower, see
:func:`dp360rt.checkpoint.identical_tensors`) and all buffers never leave: both models need
them, so they stay correct whichever model is resident.
"""
from __future__ import annotations

import ctypes
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from ..model import DiffPortrait360


def _slots(model: nn.Module, skip: set[int]) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every parameter slot of ``model`` not in ``skip`` (by tensor id), grouped by tensor: the
    first name the tensor has -> the (module, attribute) slots that hold it."""
    by_id: dict[int, str] = {}
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules():
        for name, p in mod._parameters.items():
            if p is None or id(p) in skip:
                continue
            key = by_id.setdefault(id(p), f"{mod_name}.{name}" if mod_name else name)
            out.setdefault(key, []).append((mod, name))
    return out


def move_resident(model: nn.Module, device: torch.device) -> None:
    """Move the tensors of ``model`` that are not offloaded ('meta') to ``device``, in place
    (shared tensors keep being shared)."""
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and not p.is_meta and p.device != device:
                p.data = p.data.to(device)
        for name, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[name] = b.to(device)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).
    An offloaded model's weights are thousands of blocks freed between live ones: without this,
    glibc keeps most of those gigabytes in the process's RSS (3 GiB at full size, measured)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class ModelSwap:
    """Keeps at most one of ``models`` (kind -> model) resident on ``device``.

    ``use(kind)`` offloads the other model and loads ``kind``; ``resident`` names the loaded one;
    ``reloads`` and ``reload_seconds`` count what the turns cost. Files go to ``directory``
    (default: a fresh temporary folder, removed by :meth:`close`). The first model in ``models``
    starts resident; the others are offloaded at once.
    """

    def __init__(self, models: dict[str, DiffPortrait360], device: torch.device, directory: str | Path | None = None):
        self.models = models
        self.device = torch.device(device)
        self.directory = Path(tempfile.mkdtemp(prefix="dp360rt-offload-") if directory is None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Our temporary folder holds gigabytes: removed by close(), else when the swap is garbage
        # collected or the interpreter exits, never left behind by a caller who forgot close().
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True) \
            if directory is None else None
        ids = {kind: {id(p) for p in m.parameters()} for kind, m in models.items()}
        shared = set.intersection(*ids.values()) if len(ids) > 1 else set()
        self._slots = {kind: _slots(m, shared) for kind, m in models.items()}
        self._saved: set[str] = set()
        self.reloads = 0
        self.reload_seconds = 0.0
        kinds = list(models)
        self.resident: str | None = kinds[0]
        for kind in kinds[1:]:
            self._offload(kind)
        for m in models.values():
            move_resident(m, self.device)

    def file(self, kind: str) -> Path:
        return self.directory / f"{kind}.pt"

    def use(self, kind: str) -> DiffPortrait360:
        """Make ``kind`` the resident model (offloading the current one first) and return it."""
        if kind not in self.models:
            raise KeyError(f"unknown model kind {kind!r}; expected one of {sorted(self.models)}")
        if self.resident != kind:
            if self.resident is not None:
                self._offload(self.resident)
            self._load(kind)
        return self.models[kind]

    def _offload(self, kind: str) -> None:
        slots = self._slots[kind]
        if kind not in self._saved:        # weights never change: written once, later turns just drop them
            tensors = {key: s[0][0]._parameters[s[0][1]].detach() for key, s in slots.items()}
            tmp = self.file(kind).with_suffix(".tmp")
            torch.save(tensors, tmp)
            tmp.replace(self.file(kind))
            del tensors
            self._saved.add(kind)
        for key, s in slots.items():
            p = s[0][0]._parameters[s[0][1]]
            meta = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for mod, name in s:
                mod._parameters[name] = meta
        if self.resident == kind:
            self.resident = None
        release_freed_memory()

    def _load(self, kind: str) -> None:
        tic = time.perf_counter()
        state = torch.load(self.file(kind), map_location="cpu", weights_only=True, mmap=True)
        for key, s in self._slots[kind].items():
            p = nn.Parameter(state[key].to(self.device), requires_grad=False)
            for mod, name in s:
                mod._parameters[name] = p
        del state
        self.resident = kind
        self.reloads += 1
        self.reload_seconds += time.perf_counter() - tic

    def close(self) -> None:
        """Remove the offload files (when the folder was ours; also done when the swap is garbage
        collected or at interpreter exit)."""
        if self._cleanup is not None:
            self._cleanup()
