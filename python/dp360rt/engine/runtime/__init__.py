"""Serving: the native step loop (``dp360rt._C``) driving sampling tasks, streaming views."""
from .host import RuntimeHost
from .stream import BACK_VIEW_INDEX, Handle, RequestCancelled, Runtime, View

__all__ = ["Runtime", "RuntimeHost", "Handle", "View", "RequestCancelled", "BACK_VIEW_INDEX"]
