"""The service's client errors: a status code and a JSON body ``{"error": {"message", "fix"}}``."""
from __future__ import annotations

from starlette.responses import JSONResponse


class ServeError(Exception):
    """A request the service refuses (4xx) or cannot serve now (503): says what and how to fix it."""

    def __init__(self, status: int, message: str, fix: str, headers: dict[str, str] | None = None):
        super().__init__(f"{message}. Fix: {fix}")
        self.status, self.message, self.fix = status, message, fix
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.fix, self.headers)


def error_response(status: int, message: str, fix: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "fix": fix}}, status_code=status, headers=headers)


def split_fix(text: str, default_fix: str) -> tuple[str, str]:
    """Split a library message ``"... Fix: ..."`` (dp360rt's convention) into (message, fix)."""
    head, sep, tail = text.partition("Fix:")
    if sep:
        return head.strip().rstrip(".;"), tail.strip()
    return text.strip(), default_fix
