"""ScoreResponse bytes straight from a score row, without building a protobuf map.

A version's srcids, name and number are fixed, so the serialized `scores` map of a full row is a
template in which only the 4 bytes of each float change: one numpy scatter per answer instead of a
Python dict and a protobuf map of N entries. A `srcids` subset goes through protobuf (it is rare and
small). The bytes parse to exactly the message protobuf would build (tests/test_responses.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scoring.v1 import scoring_pb2


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 on the wire: a negative number is its two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value) if value else b""


class ResponseEncoder:
    """Serializes the ScoreResponse of one loaded version."""

    def __init__(self, model: str, version: int, srcids: Sequence[int]) -> None:
        self.model = model
        self.version = version
        self.srcids = list(srcids)
        template = bytearray()
        float_at = []
        for srcid in self.srcids:
            entry = b"\x08" + varint(srcid) + b"\x15"  # key (field 1, varint), value tag (field 2, fixed32)
            template += b"\x0a" + varint(len(entry) + 4) + entry  # ScoreResponse.scores is field 1
            float_at.append(len(template))
            template += b"\0\0\0\0"
        self._template = np.frombuffer(bytes(template), np.uint8)
        self._float_at = (np.array(float_at, np.intp)[:, None] + np.arange(4)).ravel()
        self._tail = field_bytes(2, model.encode()) + field_varint(3, version)

    def full(self, row: np.ndarray) -> bytes:
        """Every head's score, `row` in the order of `srcids`."""
        out = self._template.copy()
        out[self._float_at] = np.ascontiguousarray(row, "<f4").view(np.uint8)
        return out.tobytes() + self._tail

    def encode(self, row: np.ndarray, srcids: Sequence[int], index: Mapping[int, int]) -> bytes:
        """The scores of `srcids` (all heads when empty)."""
        if not srcids:
            return self.full(row)
        scores = {s: float(row[index[s]]) for s in srcids}
        response = scoring_pb2.ScoreResponse(scores=scores, model=self.model, version=self.version)
        return bytes(response.SerializeToString())


def batch_response(results: Sequence[bytes]) -> bytes:
    """ScoreBatchResponse from serialized ScoreResponses (`results` is field 1)."""
    return b"".join(field_bytes(1, r) for r in results)


def stream_answer(request_id: str, code: int = 0, message: str = "", result: bytes | None = None) -> bytes:
    """ScoreStreamResponse: request_id 1, code 2, message 3, result 4."""
    out = field_bytes(1, request_id.encode()) if request_id else b""
    out += field_varint(2, code)
    if message:
        out += field_bytes(3, message.encode())
    if result is not None:
        out += field_bytes(4, result)
    return out
