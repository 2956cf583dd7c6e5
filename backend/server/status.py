"""One table from failures to gRPC status codes, shared by every service on the port."""

from __future__ import annotations

import grpc

from pagedserve.backend.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    PagedServeError,
    QueueFullError,
    RequestFailedError,
)


class RpcStatusError(Exception):
    """A failure the edge decides itself (unknown model, not ready): carries its code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ModelNotFoundError(RpcStatusError):
    def __init__(self, requested: str, served: str) -> None:
        super().__init__(
            grpc.StatusCode.NOT_FOUND,
            f"model: {requested!r} is not served here (serving {served!r})",
        )


class UnavailableError(RpcStatusError):
    def __init__(self, reason: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, reason)


class InvalidArgumentError(RpcStatusError):
    """A field the edge rejects before the engine sees it; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field


# Most specific first: isinstance order matters (RequestTooLongError is an InvalidRequestError).
_ENGINE_ERROR_CODES: tuple[tuple[type[PagedServeError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Retrying elsewhere can succeed: the fault is this replica's, not the request's.
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError, grpc.StatusCode.INTERNAL),
)


# Details travel in a trailer, percent-encoded (up to 3 bytes for each byte of UTF-8), and gRPC
# clients refuse trailers over 8 KiB (at random) to 16 KiB (always): the call would end with the
# client's own RESOURCE_EXHAUSTED ("Stream removed") instead of this answer. A message quoting
# what the client sent (a model name, a parameter's value) is cut to this many UTF-8 bytes.
MAX_DETAILS_BYTES = 2048


def bounded_details(details: str) -> str:
    """``details`` cut to MAX_DETAILS_BYTES of UTF-8; the start, which names the field, stays."""
    encoded = details.encode("utf-8", "replace")
    if len(encoded) <= MAX_DETAILS_BYTES:
        return details
    kept = encoded[:MAX_DETAILS_BYTES].decode("utf-8", "ignore")
    return f"{kept}... ({len(details) - len(kept)} more characters)"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client should see for ``error``."""
    code, details = _status_for(error)
    return code, bounded_details(details)


def _status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RpcStatusError):
        return error.code, error.details
    for kind, code in _ENGINE_ERROR_CODES:
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
