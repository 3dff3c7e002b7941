"""AMQP 0-9-1 wire constants: the protocol header, frame types, and the class
and method ids the code names by number.

Defined once here for the decoder, the encoder, the connection and the
tests. pamqp carries the full method catalogue; only what roost spells out
itself (hand-written fast paths, reply-code class/method ids) lives here.
"""

from __future__ import annotations

import struct
from typing import Final

MethodId = tuple[int, int]
"""(class id, method id), as a connection.close or channel.close names the
method that caused it."""

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
FRAME_END_BYTES: Final = bytes((FRAME_END,))
HEARTBEAT_FRAME: Final = bytes((FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END))

# The frame_max in force until tune-ok, and the least a client may negotiate.
FRAME_MIN_SIZE: Final = 4096

CONNECTION_CLASS: Final = 10
CHANNEL_CLASS: Final = 20
QUEUE_CLASS: Final = 50
BASIC_CLASS: Final = 60

CONNECTION_START_OK: Final[MethodId] = (CONNECTION_CLASS, 11)
CONNECTION_TUNE_OK: Final[MethodId] = (CONNECTION_CLASS, 31)
CONNECTION_OPEN: Final[MethodId] = (CONNECTION_CLASS, 40)
QUEUE_DECLARE_OK: Final[MethodId] = (QUEUE_CLASS, 11)
BASIC_PUBLISH: Final[MethodId] = (BASIC_CLASS, 40)
BASIC_RETURN: Final[MethodId] = (BASIC_CLASS, 50)
BASIC_DELIVER: Final[MethodId] = (BASIC_CLASS, 60)
BASIC_GET_OK: Final[MethodId] = (BASIC_CLASS, 71)
BASIC_GET_EMPTY: Final[MethodId] = (BASIC_CLASS, 72)
BASIC_ACK: Final[MethodId] = (BASIC_CLASS, 80)
BASIC_NACK: Final[MethodId] = (BASIC_CLASS, 120)

# RabbitMQ names no method (class and method 0) when a close is not the
# answer to one: a frame-level error, a forced close, a consumer timeout.
NO_METHOD: Final[MethodId] = (0, 0)


def method_index(ids: MethodId) -> int:
    """The 32-bit number a method frame starts with (pamqp's ``index``)."""
    return ids[0] << 16 | ids[1]


def method_ids(index: int) -> MethodId:
    """``index`` split back into (class id, method id)."""
    return index >> 16, index & 0xFFFF


def method_prefix(ids: MethodId) -> bytes:
    """The first four payload bytes of a method frame, for hand-written frames."""
    return struct.pack(">HH", *ids)


BASIC_PUBLISH_INDEX: Final = method_index(BASIC_PUBLISH)
