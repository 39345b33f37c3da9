"""Errors a request can end with, as docs/client-protocol.md ("Error codes") names them."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Answered as ``{"id", "ok": false, "error": {"code", "message", **extra}}``."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}


def invalid(message: str) -> ApiError:
    return ApiError("invalid_request", message)


def denied(message: str) -> ApiError:
    return ApiError("permission_denied", message)


def unavailable(message: str) -> ApiError:
    return ApiError("unavailable", message)
