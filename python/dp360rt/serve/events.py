"""Generation events for code that lives next to the service (the viewer's NeRF fitter, loggers).

The service calls every listener on the event-loop thread of the process that serves HTTP (the
ingress replica under Ray), in order, after the view's PNG is in the store. A listener must return
quickly and hand heavy work to its own thread; an exception it raises is logged and ignored, so a
broken listener never breaks a stream.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("dp360rt.serve")


class GenerationListener:
    """Base class with no-op methods: override the ones you need.

    ``on_view`` gets ``index`` -1 for the back view and 0..31 for the orbit's views, ``camera`` the
    25 PanoHead numbers (list of float), ``image`` a numpy uint8 array [H, W, 3]. ``on_end``'s
    ``status`` is ``done``, ``failed`` or ``cancelled``. ``on_start``'s ``options`` are the
    request's (steps, seed, crop, noise, orbit, nerf) and the replica's (``replica``; ``viewer``:
    where its viewer server is, under Ray); ``on_delete`` follows a DELETE of a
    finished generation (its files are gone).
    """

    def on_start(self, gen_id: str, options: dict[str, Any]) -> None:
        pass

    def on_view(self, gen_id: str, index: int, camera: list[float], image: np.ndarray) -> None:
        pass

    def on_end(self, gen_id: str, status: str) -> None:
        pass

    def on_delete(self, gen_id: str) -> None:
        pass


def notify(listeners: list[Any], method: str, *args: Any) -> None:
    """Call ``method(*args)`` on every listener that has it; log (never raise) what they raise."""
    for listener in listeners:
        fn = getattr(listener, method, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a listener's bug must not end the stream
            log.exception("generation listener %r failed in %s", listener, method)
