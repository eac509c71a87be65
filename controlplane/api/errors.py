"""HTTP error answers of the gateway: OpenAI's error JSON for its own errors, for a worker's
failure (what kind, never which worker) and for aiohttp's (404, 405, 413), and JSON bodies."""

from __future__ import annotations

import json

from aiohttp import hdrs, web

from controlplane.api.openai_protocol import OpenAIError
from controlplane.api.responses import dumps
from controlplane.request.routing import RejectedRequest
from controlplane.workers.client import WorkerError, WorkerErrorKind

__all__ = [
    "HTTP_ERROR_CODES",
    "answer_and_close",
    "error_response",
    "json_response",
    "worker_error_to_openai",
]

_WORKER_ERROR_STATUS = {
    WorkerErrorKind.UNAVAILABLE: (503, "server_error", "worker_unavailable"),
    WorkerErrorKind.OVERLOADED: (503, "server_error", "worker_overloaded"),
    WorkerErrorKind.TIMEOUT: (504, "server_error", "worker_timeout"),
    WorkerErrorKind.REJECTED: (400, "invalid_request_error", "worker_rejected_request"),
    WorkerErrorKind.FAILED: (502, "server_error", "worker_failed"),
}
HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


_WORKER_ERROR_MESSAGES = {
    WorkerErrorKind.UNAVAILABLE: "no worker could serve it now; retry later",
    WorkerErrorKind.OVERLOADED: "the worker is overloaded; retry later",
    WorkerErrorKind.TIMEOUT: "the request's deadline passed",
    WorkerErrorKind.REJECTED: "the worker rejected the input",
    WorkerErrorKind.FAILED: "the worker failed (logged by the gateway)",
}


def worker_error_to_openai(exc: WorkerError) -> OpenAIError:
    """The client's view of a worker failure: what kind, never which worker (its endpoint) nor
    the worker's own detail (addresses, paths), which the gateway logs; a rejected input keeps
    the worker's reason, which is about the request."""
    status, error_type, code = _WORKER_ERROR_STATUS[exc.kind]
    message = f"{exc.rpc} failed: {_WORKER_ERROR_MESSAGES[exc.kind]}"
    if exc.kind is WorkerErrorKind.REJECTED:
        message += f": {exc.detail}"
    return OpenAIError(message + ".", status=status, type=error_type, code=code)


def error_response(exc: OpenAIError) -> web.Response:
    # ASCII JSON: a message quoting the client's input can always be encoded and parsed back.
    response = web.Response(
        status=exc.status, text=json.dumps(exc.to_dict()), content_type="application/json"
    )
    if isinstance(exc, RejectedRequest) and exc.retry_after_s is not None:
        response.headers[hdrs.RETRY_AFTER] = str(exc.retry_after_s)
    return response


async def answer_and_close(request: web.Request, response: web.Response) -> None:
    """Send `response`, then close the connection: aiohttp would otherwise linger reading the
    rest of the request's body (up to its lingering_time) before closing."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, text=dumps(obj), content_type="application/json")
