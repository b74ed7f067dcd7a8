"""The service's errors, each a kind a gRPC status code stands for (`server.py` maps them in one
table). The worker's typed errors (RequestRefused, InvalidSampling, SessionBusy, SnapshotError, ...)
travel as they are; these are the ones only the coordinator can know."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the coordinator's own errors; the message says what was wrong and what to do."""


class NotFound(ServiceError):
    """An unknown session, request or replica."""


class AlreadyExists(ServiceError):
    """An id that is in use (a running request's, a session's)."""


class Busy(ServiceError):
    """A session busy with a request, or an operation its state does not allow now."""


class QueueFull(ServiceError):
    """Every replica's queue is full; retry after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(ServiceError):
    """No live replica can serve this."""


class NotServed(ServiceError):
    """An operation this server does not serve yet (UNIMPLEMENTED), with what to do instead."""


class InvalidRequest(ServiceError):
    """A request the API cannot take (bad field values the worker never sees)."""


class CannotListen(Exception):
    """A port the server was told to listen on is taken or not an address of this machine."""
