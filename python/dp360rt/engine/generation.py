"""What a generation returns: the back view, the 32 views, their cameras and latents, and how to
save them (:meth:`GenerationResult.save`). Both :class:`~dp360rt.engine.pipeline.Pipeline` and the
streaming runtime (:meth:`dp360rt.engine.runtime.Handle.result`) build one."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..io.images import save_png

if TYPE_CHECKING:
    from ..nerf import Nerf


@dataclass
class GenerationResult:
    """Output of :meth:`dp360rt.engine.pipeline.Pipeline.__call__` and :meth:`dp360rt.engine.runtime.Handle.result`.

    back_view: [3, H, W] in [0, 1] (8-bit exact, as the authors save it); views: [N, 3, H, W] in
    [0, 1]; cameras: [N, 25] PanoHead labels when known; latents: [N, 4, h, w] final latents;
    timings: seconds per stage.
    """

    back_view: Tensor
    views: Tensor
    cameras: Tensor | None = None
    latents: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    unet_calls: int = 0
    crop: Any = None            # the dp360rt.crop.CropResult of crop="auto"
    inversion: Any = None       # the dp360rt.invert.Inversion of the 3D-aware noise stage

    def fit_nerf(self, seconds: float | None = 60.0, steps: int | None = None, progress: bool = True,
                 **options: Any) -> "Nerf":
        """Fit an instant NeRF to the 32 views and their cameras and return it (render with
        ``nerf.render(camera, width, height)``; ``nerf.stats`` holds steps, seconds and PSNR).
        ``options`` override :class:`dp360rt.nerf.NerfConfig` fields (``encoding``, ``device``, ...)."""
        from ..nerf import Nerf
        if self.cameras is None:
            raise ValueError("these views have no cameras, so a NeRF cannot be fitted. Fix: generate with the "
                             "sphere32 conditions (the default), whose PanoHead cameras are known")
        nerf = Nerf(**options)
        nerf.fit(list(self.views), self.cameras, seconds=seconds, steps=steps, progress=progress)
        return nerf

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``back_view.png``, ``000.png`` ... ``cameras.json``, ``timings.json`` and, last,
        ``manifest.json`` (the NeRF views layout; with ``crop="auto"`` also ``crop/``: crop.png,
        camera.json, overlay.png; with 3D-aware noise also ``inversion/``) into ``out_dir``, atomically: the folder is built
        aside and moved into place when complete. An existing non-empty ``out_dir`` is refused
        unless ``overwrite=True`` (then replaced as a whole, never mixed)."""
        from ..io.results import ResultDir
        with ResultDir(out_dir, kind="views", overwrite=overwrite) as r:
            self.write_into(r.path)
            return r.commit(views=len(self.views))

    def write_into(self, d: Path) -> None:
        """Write the files of :meth:`save` (each atomically) into the existing folder ``d``, no manifest."""
        from ..io.results import write_text_atomic
        save_png(self.back_view, d / "back_view.png")
        entries = []
        for i, v in enumerate(self.views):
            name = f"{i:03d}.png"
            save_png(v, d / name)
            entry: dict[str, Any] = {"file": name}
            if self.cameras is not None:
                entry["camera"] = [float(x) for x in self.cameras[i]]
            entries.append(entry)
        write_text_atomic(d / "cameras.json", json.dumps({"views": entries}, indent=1))
        write_text_atomic(d / "timings.json", json.dumps(self.timings, indent=1))
        Prepared(None, crop=self.crop, inversion=self.inversion).save_extras(d)


@dataclass
class Prepared:
    """A portrait after the stages before the diffusion models (:meth:`dp360rt.Pipeline.prepare`):
    the portrait to generate from (the 512² crop with ``crop="auto"``), the 3D-aware noise's
    features [32, 3, S, S] in [-1, 1] (or None), the :class:`dp360rt.crop.CropResult` and the
    :class:`dp360rt.invert.Inversion` (or None)."""
    portrait: Any
    features: Any = None
    crop: Any = None
    inversion: Any = None

    def save_extras(self, out_dir: str | Path) -> list[Path]:
        """Write ``crop/`` and ``inversion/`` into ``out_dir`` as :meth:`GenerationResult.save` does;
        returns the folders written."""
        d, written = Path(out_dir), []
        if self.crop is not None:
            written.append(self.crop.save(d / "crop"))
        if self.inversion is not None:
            written.append(self.inversion.save(d / "inversion"))
        return written

