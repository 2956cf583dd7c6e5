"""Typed errors raised by the engine; the server maps each to a gRPC status code."""

from __future__ import annotations


class PagedServeError(Exception):
    """Base class for errors pagedserve raises on purpose."""


class InvalidRequestError(PagedServeError, ValueError):
    """A request field is invalid. ``field`` names it, so the caller can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from both arguments: the engine process sends these errors to the server's.
        return type(self), (self.field, self.message)


class RequestTooLongError(InvalidRequestError):
    """The request can never fit: beyond the model's context or the whole KV cache."""


class QueueFullError(PagedServeError):
    """The waiting queue is at max_queued_requests."""


class ModelLoadError(PagedServeError):
    """The model path or files cannot be loaded."""


class EngineDeadError(PagedServeError):
    """The engine loop has stopped; no request can complete."""


class RequestFailedError(PagedServeError):
    """One request failed inside the engine (say, in detokenization); the others go on."""
