"""How a call or a stream item ends without scores: its lost reason, its gRPC status and a message.

One table for the unary calls and ScoreStream, so that the same failure is the same status in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from server.admission import QueueFull
from server.batcher import BatcherClosed, DeadlineExpired, EngineFailed
from server.metrics import LostReason

STATUS = {
    LostReason.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    LostReason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    LostReason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    LostReason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    LostReason.CANCELLED: grpc.StatusCode.CANCELLED,
    LostReason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    LostReason.INTERNAL: grpc.StatusCode.INTERNAL,
}


@dataclass
class Rejection(Exception):
    code: grpc.StatusCode
    reason: LostReason
    message: str

    def at_item(self, index: int) -> Rejection:
        return Rejection(self.code, self.reason, f"items[{index}]: {self.message}")


def reject(reason: LostReason, message: str) -> Rejection:
    return Rejection(STATUS[reason], reason, message)


def queueing_rejection(exc: QueueFull | BatcherClosed) -> Rejection:
    """Admission refused the items (nothing of them was queued)."""
    if isinstance(exc, QueueFull):
        return reject(LostReason.QUEUE_FULL, f"server overloaded: {exc}")
    return reject(LostReason.UNAVAILABLE, f"{exc}; retry")


# What a queued item's future may fail with; anything else is a bug.
ITEM_FAILURES = (DeadlineExpired, EngineFailed, QueueFull, BatcherClosed)


def result_rejection(exc: BaseException) -> Rejection:
    """What a queued item's failed future means for its caller."""
    if isinstance(exc, DeadlineExpired):
        return reject(LostReason.DEADLINE, "deadline passed while queued; not computed")
    if isinstance(exc, EngineFailed):
        return reject(LostReason.INTERNAL, str(exc))
    if isinstance(exc, QueueFull | BatcherClosed):  # a coalesced item queued again after its leader expired
        return queueing_rejection(exc)
    return reject(LostReason.INTERNAL, "internal error")
