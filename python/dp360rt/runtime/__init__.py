"""Serving: the native step loop (``dp360rt._C``) driving sampling tasks, streaming views."""
from .stream import BACK_VIEW_INDEX, Handle, RequestCancelled, Runtime, View

__all__ = ["Runtime", "Handle", "View", "RequestCancelled", "BACK_VIEW_INDEX"]
