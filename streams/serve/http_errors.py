"""Errors answered outside the views, in the same envelope as theirs (``streams.serve.errors``).

Two places answer without a view: aiohttp's router (a path no view serves, a method a view
does not take) and, below it, aiohttp's protocol handler (a request its HTTP parser refuses:
a malformed request line, bad headers, broken chunked framing; and an exception no view
caught). The first is handled by a middleware; the second by a request handler whose
:meth:`~EnvelopeRequestHandler.handle_error` renders the envelope instead of plain text.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web as aiohttp_web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from streams.serve.errors import REQUEST_ID, STATUS_OF_CODE, ApiError, envelope, error_headers, request_id

log = logging.getLogger(__name__)
_CODE_OF_STATUS = {status: code for code, status in STATUS_OF_CODE.items()}


def error_response(request: BaseRequest, exc: ApiError) -> aiohttp_web.Response:
    asked = request_id(request)
    headers = {REQUEST_ID: asked, **(error_headers(exc) or {})}
    return aiohttp_web.Response(
        body=envelope(exc, asked), status=exc.status, content_type="application/json", headers=headers
    )


def _status_error(status: int, message: str, details: dict[str, Any] | None = None) -> ApiError:
    """An error answering with ``status``, of the code for it (internal_error for a 5xx)."""
    code = _CODE_OF_STATUS.get(status, "internal_error" if status >= 500 else "invalid_request")
    return ApiError(code, message, status, details)


@aiohttp_web.middleware
async def router_errors_in_envelope(request: aiohttp_web.Request, handler: Any) -> aiohttp_web.StreamResponse:
    """A path no view serves (404), or a method a view does not take (405), in the error envelope.

    aiohttp's router answers these itself, in plain text, before any view runs.
    """
    try:
        response: aiohttp_web.StreamResponse = await handler(request)
        return response
    except aiohttp_web.HTTPNotFound:
        exc = ApiError("not_found", f"no view at {request.path}", details={"path": request.path})
    except aiohttp_web.HTTPMethodNotAllowed as refused:
        allowed = sorted(refused.allowed_methods)
        exc = ApiError("invalid_request", f"method {request.method} not allowed", 405, {"allowed": allowed})
        response = error_response(request, exc)
        response.headers["Allow"] = ",".join(allowed)
        return response
    except aiohttp_web.HTTPException as other:
        if other.status < 400:
            raise
        exc = _status_error(other.status, other.reason)
    return error_response(request, exc)


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's protocol handler, answering the errors it catches in the envelope."""

    def data_received(self, data: bytes) -> None:
        reading = self._current_request
        queued = len(self._messages)
        super().data_received(data)
        if reading is None or len(self._messages) <= queued:
            return
        refused = self._messages[-1][0]
        if not isinstance(refused, RawRequestMessage) and not reading.content.is_eof():
            # The parser refused what followed the body's start (broken chunked framing): it
            # queues a 400 for after the request being read, whose body would never end, so
            # the view reading it fails now instead (and answers 400 itself).
            reason = getattr(refused, "exc", None)
            reading.content.set_exception(reason if isinstance(reason, Exception) else BadHttpMessage("bad body"))

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> aiohttp_web.StreamResponse:
        # aiohttp's own logs the error and refuses when part of a response went out already.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            error = _status_error(status, "internal error")
        else:
            error = _status_error(status, f"malformed HTTP request: {message or HTTPStatus(status).phrase}")
        response = error_response(request, error)
        response.force_close()
        return response


class EnvelopeServer(Server):
    """Makes an :class:`EnvelopeRequestHandler` for each connection."""

    def __call__(self) -> RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class EnvelopeRunner(aiohttp_web.AppRunner):
    """aiohttp's application runner, serving through an :class:`EnvelopeServer`."""

    async def _make_server(self) -> Server:
        built = await super()._make_server()
        # The server aiohttp configured for the application, with the same arguments.
        return EnvelopeServer(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=built._loop,  # noqa: SLF001 - aiohttp keeps the arguments only as private attributes
            **built._kwargs,  # noqa: SLF001
        )
