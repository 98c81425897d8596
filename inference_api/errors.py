"""The one exception type for a request that cannot be served as sent: HTTP status, words and a reason code."""
from __future__ import annotations


class InputError(Exception):
    """`status` is the HTTP status to answer with, `detail` says what was wrong and what to do, `code` is the
    stable reason code (schemas.ERROR_CODES); `headers` go on the error response (e.g. Retry-After)."""

    def __init__(self, status: int, detail: str, code: str = "bad_request", headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.headers = status, detail, code, headers or {}
