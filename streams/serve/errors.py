"""The API's one error type and the envelope every error answer carries (DOMAIN.md):
``{"error": {"code", "message", "details"}, "request_id"}``."""

from __future__ import annotations

import re
import secrets
from typing import Any

import orjson

#: Each error code and the status it answers with unless the error names another.
STATUS_OF_CODE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "rate_limited": 429,
    "internal_error": 500,
}
#: Seconds a client is asked to wait before retrying a 503 (``Retry-After``) unless the error says otherwise.
RETRY_AFTER = 1


class ApiError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        details: Any = None,
        retry_after: int | None = None,
        auth_challenge: bool = False,
    ) -> None:
        super().__init__(message)
        #: Whether the answer tells the client how to authenticate (``WWW-Authenticate``).
        self.auth_challenge = auth_challenge
        self.code = code
        self.message = message
        self.status = status or STATUS_OF_CODE.get(code, 400)
        self.details = details or {}
        #: Sent as ``Retry-After`` (seconds); every 503 carries one.
        self.retry_after = retry_after if retry_after is not None else RETRY_AFTER if self.status == 503 else None


def invalid(field: str, message: str) -> ApiError:
    """A 400 for one request field (a parameter or a body field)."""
    return ApiError("invalid_request", message, details={"field": field})


def envelope(exc: ApiError, request_id: str) -> bytes:
    body = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}, "request_id": request_id}
    return orjson.dumps(body)


def error_headers(exc: ApiError) -> dict[str, str] | None:
    headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    if exc.auth_challenge:
        headers["WWW-Authenticate"] = 'Bearer realm="blackroad"'
    return headers or None


#: Carries a request's id both ways: a client's own is kept if it is a plausible one.
REQUEST_ID = "X-Request-ID"
_REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(request: Any) -> str:
    """The request's id: its ``X-Request-ID`` when that is 1-128 of ``A-Z a-z 0-9 . _ : -``, else a new one."""
    given = request.headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID_SHAPE.fullmatch(given):
        return str(given)
    return f"req_{secrets.token_hex(8)}"
