"""``dp360rt serve``: the streaming HTTP service over one pipeline, optionally on Ray Serve.

* :mod:`.app`: :func:`create_app`, the Starlette app (routes, auth, admission, SSE, metrics);
* :mod:`.backend`: :class:`LocalBackend`, generations on a pipeline in this process;
* :mod:`.ray_app`: the same app as a Ray Serve ingress over N generation replicas;
* :mod:`.events`: :class:`GenerationListener`, how the viewer hears about views;
* :mod:`.store`, :mod:`.metrics`, :mod:`.errors`, :mod:`.cli`.

Needs the ``serve`` extra (Starlette, uvicorn, python-multipart; Ray Serve for ``--ray``).
"""
from .events import GenerationListener

__all__ = ["GenerationListener", "create_app", "LocalBackend", "ResultStore"]


def __getattr__(name: str):       # starlette is imported only when the app is asked for
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "LocalBackend":
        from .backend import LocalBackend
        return LocalBackend
    if name == "ResultStore":
        from .store import ResultStore
        return ResultStore
    raise AttributeError(name)
