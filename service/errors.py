"""The one error type the HTTP edge turns into a JSON answer `{"error": ..., "detail": ...}`."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal with its HTTP status, a short machine-readable code and a message that says why."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}
