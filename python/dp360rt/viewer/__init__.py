"""The browser viewer: the views as they stream and the fitted NeRF orbited live.

The server renders the fitted field for the camera the page asks for and streams the frames back
over a WebSocket (as nerfstudio's viewer does); no NeRF runs in the browser.

* :mod:`.sessions`: :class:`NerfSessions`, one NeRF per generation fitted in the background while
  its views arrive (the service's generation listener), renders from frozen snapshots;
* :mod:`.frames`: the WebSocket's frame requests and the JPEG/PNG encoding;
* :mod:`.routes`: :func:`viewer_routes`, the page, status, WebSocket and download routes;
* :mod:`.app`: the standalone app of ``dp360rt view`` (a saved result, a fitted NeRF or the
  built-in synthetic head scene, no diffusion model loaded);
* ``static/``: the page (plain HTML/JS/CSS, no build step, no CDN).

Needs the ``serve`` extra (Starlette, uvicorn).
"""
from .frames import FrameRequest, FrameRequestError, encode_frame, parse_frame_request
from .sessions import NerfSession, NerfSessions



def __getattr__(name: str):
    # the routes need Starlette (the serve extra); the sessions and frames work without it
    if name == "viewer_routes":
        from .routes import viewer_routes
        return viewer_routes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FrameRequest", "FrameRequestError", "NerfSession", "NerfSessions", "encode_frame",
           "parse_frame_request", "viewer_routes"]
