"""What every backend over an export directory shares (:class:`ExportedBackend`): reading the
manifest, checking it belongs to the model, picking the file whose static shapes match a call and
refusing loudly when none does. Subclasses load and run one file:
:class:`~dp360rt.backends.ort_backend.OrtBackend` (ONNX Runtime),
:class:`~dp360rt.backends.trt_backend.TrtBackend` (TensorRT).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .manifest import MODULE_PREFIX, ExportedFile, ExportManifest, ExportMismatchError, config_json, state_dict_hashes

# Modules whose rows are independent samples: a batch may be split over the exported batch sizes.
SPLITTABLE = ("text", "vae_encoder", "vae_decoder", "appearance")


class ExportedBank:
    """One step's bank for an exported UNet: entries [1, M, C] (one request), fed as inputs."""

    def __init__(self, entries: Sequence[Tensor]):
        if not entries:
            raise ExportMismatchError("empty bank")
        if entries[0].shape[0] != 1:
            raise ExportMismatchError(f"exported UNets hold one bank group (entries [1, M, C]); got "
                                      f"{entries[0].shape[0]} groups. Fix: one request per sampler call")
        self.entries = [e.contiguous() for e in entries]


class ExportedBackend:
    """The fast sampler's :class:`~dp360rt.backends.base.Backend` over the static-shape files of one
    model kind in an export directory. Subclasses provide :meth:`_make_runner` (load one file) only.

    Every call picks the file whose static input shapes equal the call's (and, for the UNet, whose
    conditional row count equals ``cond_rows``); when none does it raises
    :class:`ExportMismatchError` listing what was exported - never a silent fallback.
    """

    name = "exported"

    def __init__(self, export_dir: str | Path, kind: str, profiles: Iterable[str] | None = None,
                 manifest: ExportManifest | None = None):
        self.manifest = manifest or ExportManifest.load(export_dir)
        self.kind = kind
        self.profiles = None if profiles is None else tuple(profiles)
        if self.profiles is not None:
            known = set(self.manifest.profiles) | {p for f in self.manifest.files for p in f.profiles}
            unknown = [p for p in self.profiles if p not in known]
            if unknown:
                raise ExportMismatchError(f"profile(s) {unknown} not in the export at {self.manifest.dir} "
                                          f"(has {sorted(known)}). Fix: export them (--profiles ...)")
        self.entries = self.manifest.select(kind, self.profiles)
        if not self.entries:
            have = sorted({f.kind for f in self.manifest.files})
            raise ExportMismatchError(f"the export at {self.manifest.dir} has no files for the {kind} model"
                                      f"{' in profiles ' + str(list(self.profiles)) if self.profiles else ''} "
                                      f"(it has kinds {have}). Fix: export the {kind} model (--{kind} CKPT)")
        self._runners: dict[str, Callable[[dict[str, Tensor]], list[Tensor]]] = {}

    # -- construction helpers --------------------------------------------------------------------
    @classmethod
    def _check_model(cls, manifest: ExportManifest, model: Any, entries: list[ExportedFile],
                     verify_weights: bool) -> None:
        """Refuse an export built from another config or other weights than ``model``."""
        info = manifest.models.get(model.kind)
        if info is None:
            raise ExportMismatchError(f"the export at {manifest.dir} holds no {model.kind} model")
        want, have = info.get("config"), config_json(model.cfg)
        if want is not None and want != have:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ExportMismatchError(f"the export at {manifest.dir} was built for another {model.kind} config "
                                      f"(differs in: {', '.join(diff)}). Fix: re-export for this model")
        if verify_weights:
            prefixes = sorted({MODULE_PREFIX[e.module] for e in entries})
            _, hashes = state_dict_hashes({k: v for k, v in model.state_dict().items()
                                           if any(k.startswith(p + ".") for p in prefixes)}, prefixes)
            for prefix in prefixes:
                ours = hashes[prefix]
                for e in entries:
                    if MODULE_PREFIX[e.module] == prefix and e.state_dict_sha256 and e.state_dict_sha256 != ours:
                        raise ExportMismatchError(
                            f"{e.file} was exported from other {prefix} weights than this model's (state-dict "
                            f"sha256 {e.state_dict_sha256[:12]}... vs {ours[:12]}...). Fix: re-export from this "
                            "checkpoint, or pass verify_weights=False to run the exported weights anyway")

    # -- selection -------------------------------------------------------------------------------
    def _candidates(self, module: str) -> list[ExportedFile]:
        return [e for e in self.entries if e.module == module]

    def _select(self, module: str, feeds: Mapping[str, Tensor], cond_rows: int | None = None) -> ExportedFile:
        cands = self._candidates(module)
        for e in cands:
            if cond_rows is not None and e.cond_rows != cond_rows:
                continue
            if {s.name for s in e.inputs} != set(feeds):
                continue
            if all(tuple(feeds[s.name].shape) == s.shape for s in e.inputs):
                return e
        call = ", ".join(f"{k} {list(v.shape)}" for k, v in list(feeds.items())[:4])
        if module in ("unet", "unet_nobank"):
            call += f", cond_rows {cond_rows or 0}"
        have = "; ".join(e.describe() for e in cands) or "none"
        hint = (" or run the sampler with a BatchPlan whose UNet batch is one of the exported ones"
                if module.startswith("unet") or module == "pose" else "")
        raise ExportMismatchError(
            f"{type(self).__name__} ({self.kind}): no exported '{module}' file has the static shapes of this call "
            f"({call}). Exported '{module}' variants: {have}. Fix: export a profile with these shapes "
            f"(python -m dp360rt.export --profiles ..., custom NAME=ROWS:COND, another image size PROFILE@HxW){hint}")

    def _run(self, module: str, feeds: dict[str, Tensor], cond_rows: int | None = None) -> list[Tensor]:
        entry = self._select(module, feeds, cond_rows)
        runner = self._runners.get(entry.file)
        if runner is None:
            runner = self._runners[entry.file] = self._make_runner(entry)
        return runner(feeds)

    def _make_runner(self, entry: ExportedFile) -> Callable[[dict[str, Tensor]], list[Tensor]]:
        raise NotImplementedError

    def _run_split(self, module: str, feeds: dict[str, Tensor]) -> list[Tensor]:
        """Per-sample networks (:data:`SPLITTABLE`): run a batch as chunks of exported batch sizes,
        largest first; raises the usual shape error when no chunking covers it."""
        assert module in SPLITTABLE, module
        n = next(iter(feeds.values())).shape[0]
        sizes = sorted({e.inputs[0].shape[0] for e in self._candidates(module)
                        if all(tuple(s.shape[1:]) == tuple(feeds[s.name].shape[1:]) if s.name in feeds else False
                               for s in e.inputs)}, reverse=True)
        chunks: list[int] = []
        while sum(chunks) < n:
            b = next((b for b in sizes if b <= n - sum(chunks)), None)
            if b is None:
                return self._run(module, feeds)   # raises the shape error listing the exports
            chunks.append(b)
        if len(chunks) == 1:
            return self._run(module, feeds)
        outs, s = [], 0
        for b in chunks:
            outs.append(self._run(module, {k: v[s:s + b] for k, v in feeds.items()}))
            s += b
        return [torch.cat(parts) for parts in zip(*outs)]

    # -- the Backend protocol ----------------------------------------------------------------------
    def appearance(self, refs: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        # references are independent rows: several bank groups (requests / timesteps) are written
        # as chunks of the exported reference count
        return self._run_split("appearance", {"refs": refs, "t": t, "context": context})

    def bank(self, entries: list[Tensor]) -> ExportedBank:
        """Entries [G, M, C]; exported UNets take one group (G = 1), checked here."""
        return ExportedBank(entries)

    def pose(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        return self._run("pose", {"x": x, "hint": hint, "t": t, "context": context})

    def unet(self, x: Tensor, t: Tensor, context: Tensor, bank: ExportedBank | None,
             residuals: list[Tensor] | None, cond_rows: int | Sequence[int]) -> Tensor:
        feeds = {"x": x, "t": t, "context": context}
        groups = [cond_rows] if isinstance(cond_rows, int) else [int(r) for r in cond_rows]
        if len(groups) > 1:
            raise ExportMismatchError(
                f"{type(self).__name__}: this UNet call reads {len(groups)} bank groups (rows {groups}: requests or "
                "timesteps sharing one call); exported UNets read one group. Fix: sample one request at one "
                "timestep per call with this backend, or use the torch backend")
        cond_rows = groups[0] if groups else 0
        if not cond_rows:
            return self._run("unet_nobank", feeds)[0]
        if bank is None or residuals is None:
            raise ExportMismatchError(f"{type(self).__name__}: a UNet call with {cond_rows} conditional rows needs the "
                                      "bank and the pose residuals (exported UNets take both as inputs)")
        if not isinstance(bank, ExportedBank):
            raise TypeError(f"bank must come from this backend's bank(), got {type(bank).__name__}")
        feeds.update({f"bank_{i:02d}": e for i, e in enumerate(bank.entries)})
        feeds.update({f"res_{i:02d}": r for i, r in enumerate(residuals)})
        return self._run("unet", feeds, cond_rows)[0]

    # -- the other networks (pipeline stages outside the sampler) ----------------------------------
    def encode_text(self, token_ids: Tensor) -> Tensor:
        return self._run_split("text", {"token_ids": token_ids})[0]

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self._run_split("vae_encoder", {"image": image})
        return mean, logvar

    def decode_latent(self, latent: Tensor) -> Tensor:
        return self._run_split("vae_decoder", {"latent": latent})[0]

    def describe(self) -> str:
        return "\n".join(f"  {e.module:<12} {e.describe()}" for e in self.entries)
