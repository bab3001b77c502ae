"""``dp360rt view``: the viewer alone, for a saved result, a fitted NeRF or a synthetic scene, with
no diffusion model loaded (the page's upload is off: there is no service to generate with)."""
from __future__ import annotations

import re
from pathlib import Path

from ..nerf import Nerf, load_views
from ..nerf.cameras import load_image
from .sessions import NerfSession, NerfSessions

SYNTHETIC_LABEL = ("Synthetic scene '{scene}': the built-in test head of dp360rt.nerf.synthetic "
                   "(ellipsoids, rendered exactly), not a generated portrait")


def _is_nerf_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "result"


def load_path(sessions: NerfSessions, path: str | Path, gen_id: str | None = None, mode: str = "always") -> NerfSession:
    """Preload a views folder (``result.save`` layout: PNGs + ``cameras.json``, optionally
    ``back_view.png`` and a fitted ``nerf/``) or a fitted NeRF folder (``nerf.save``; the views
    of its parent folder are shown when there). A views folder without ``nerf/`` is fitted now
    (``mode="on_view"``: when the page first shows it)."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"{d} is not a folder. Fix: pass a views folder (PNGs + cameras.json, as `dp360rt generate "
                         "--out` writes) or a fitted NeRF folder (as `dp360rt nerf fit --out` writes)")
    gen_id = gen_id or _slug(d.resolve().name)
    if _is_nerf_dir(d):
        nerf_dir, views_dir = d, (d.parent if (d.parent / "cameras.json").is_file() else None)
    else:
        nerf_dir = d / "nerf" if _is_nerf_dir(d / "nerf") else None
        views_dir = d
        if not (d / "cameras.json").is_file():
            raise ValueError(f"{d} is neither a views folder (no cameras.json) nor a fitted NeRF (no config.json and "
                             "model.safetensors). Fix: pass the --out folder of `dp360rt generate`, `dp360rt demo` "
                             "or `dp360rt nerf fit`")
    images, cams, back = [], None, None
    if views_dir is not None:
        images, cams, _ = load_views(views_dir)
        if (views_dir / "back_view.png").is_file():
            back = load_image(views_dir / "back_view.png")
    label = f"{d}"
    if nerf_dir is not None:
        return sessions.add_nerf(gen_id, Nerf.load(nerf_dir), label=label, images=images, cameras=cams,
                                 back_view=back)
    return sessions.add_views(gen_id, images, cams, label=label, back_view=back, mode=mode)


def load_synthetic(sessions: NerfSessions, scene: str = "head", size: int = 64, mode: str = "always") -> NerfSession:
    """Render a built-in synthetic scene on the sphere32 orbit and fit it in the background
    (``mode="on_view"``: when the page first shows it)."""
    from ..nerf.synthetic import SCENES, render_views
    if scene not in SCENES:
        raise ValueError(f"unknown synthetic scene {scene!r}. Fix: use one of {', '.join(SCENES)}")
    images, cams = render_views(scene, size=size)
    return sessions.add_views(f"synthetic-{scene}", images, cams, label=SYNTHETIC_LABEL.format(scene=scene), mode=mode)


def build_app(sessions: NerfSessions):
    """The standalone Starlette app of ``dp360rt view`` over preloaded ``sessions``."""
    import contextlib
    from starlette.applications import Starlette
    from .routes import viewer_routes

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sessions.close()

    return Starlette(routes=viewer_routes(sessions, upload=False, standalone=True), lifespan=lifespan)
