"""Serving: the native step loop (``dp360rt._C``) driving sampling tasks, streaming views."""
from .stream import Handle, RequestCancelled, Runtime, View

__all__ = ["Runtime", "Handle", "View", "RequestCancelled"]
