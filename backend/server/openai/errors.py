"""Failures in OpenAI's JSON error shape, with the HTTP status each one deserves.

Every failure first goes through the table the gRPC services use (``status.status_for``), and
its gRPC code picks the HTTP status: a bad field, an unknown model, a full queue or a loading
server is classified once, the same way on every front. The body is what OpenAI's clients
parse: ``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the bad field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
from aiohttp import web

from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.server.status import ModelNotFoundError, status_for

# The HTTP status of each gRPC code the services' table produces.
_HTTP_STATUS: Mapping[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}
# OpenAI's error types: the client's fault, the key, the load, or the server's fault.
_TYPES: Mapping[HTTPStatus, str] = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
}
_CLIENT_ERROR = "invalid_request_error"
_SERVER_ERROR = "server_error"


@dataclass
class ApiError(Exception):
    """A failure to answer with ``status`` and OpenAI's error body."""

    status: HTTPStatus
    message: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        server_side = self.status >= HTTPStatus.INTERNAL_SERVER_ERROR
        return _TYPES.get(self.status, _SERVER_ERROR if server_side else _CLIENT_ERROR)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.json_response(
            self.body(), status=self.status, headers=headers, dumps=json.dumps
        )


def renamed(error: BaseException, renames: Mapping[str, str]) -> BaseException:
    """``error`` naming the request's own field where the engine knows it by another name
    (``max_tokens`` sent as ``max_completion_tokens``, ``logprobs`` as ``top_logprobs``)."""
    if isinstance(error, InvalidRequestError) and error.field in renames:
        return type(error)(renames[error.field], error.message)
    return error


def api_error(error: BaseException) -> ApiError:
    """The HTTP answer to any failure: its status, message and the field it names."""
    if isinstance(error, ApiError):
        return error
    code, details = status_for(error)
    status = _HTTP_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
    if isinstance(error, ModelNotFoundError):
        return ApiError(status, details, "model", "model_not_found")
    param = getattr(error, "field", None)
    return ApiError(status, details, param if isinstance(param, str) else None)
