"""Errors the servers turn into answers: transfer failures (one type with a bounded set of
reasons, the metric labels), requests a model cannot take, an engine that cannot serve."""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Why a transfer failed. Bounded: each value is a `reason` label of
    `deepstack_transfer_failures_total`."""

    TIMEOUT = "timeout"
    PEER_LOST = "peer_lost"
    CONNECT_FAILED = "connect_failed"
    UNKNOWN_ROOM = "unknown_room"
    DUPLICATE_ROOM = "duplicate_room"
    BAD_REQUEST = "bad_request"
    LAYOUT_MISMATCH = "layout_mismatch"
    OVERSIZE = "oversize"
    POOL_EXHAUSTED = "pool_exhausted"
    TOO_MANY_ROUNDS = "too_many_rounds"
    TRANSFER_ERROR = "transfer_error"
    ABORTED = "aborted"


class TransferError(Exception):
    """A transfer that did not complete. Its blocks have been freed when this is raised."""

    def __init__(self, reason: FailureReason, message: str, *, from_peer: bool = False) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        # Reported by the other side, which says so only once it has stopped writing.
        self.from_peer = from_peer


class InputError(ValueError):
    """A request the model cannot take (the servers answer 4xx with this message)."""


class EngineFailure(RuntimeError):
    """The language engine cannot serve (it stopped, or refused the request for a reason
    of its own); the language server answers 503 with this message."""
