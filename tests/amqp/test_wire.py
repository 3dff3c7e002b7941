"""The wire constants against pamqp's, the reference codec."""

from __future__ import annotations

import pytest
from pamqp import commands as C
from pamqp import constants, header
from pamqp import heartbeat as pheartbeat
from pamqp.base import Frame

from roost.amqp import wire


def test_protocol_header() -> None:
    assert bytes(header.ProtocolHeader().marshal()) == wire.PROTOCOL_HEADER


def test_frame_constants() -> None:
    assert wire.FRAME_METHOD == constants.FRAME_METHOD
    assert wire.FRAME_HEADER == constants.FRAME_HEADER
    assert wire.FRAME_BODY == constants.FRAME_BODY
    assert wire.FRAME_HEARTBEAT == constants.FRAME_HEARTBEAT
    assert wire.FRAME_END == constants.FRAME_END
    assert wire.FRAME_END_BYTES == constants.FRAME_END_CHAR
    assert wire.FRAME_MIN_SIZE == constants.FRAME_MIN_SIZE
    assert bytes(pheartbeat.Heartbeat.marshal()) == wire.HEARTBEAT_FRAME


@pytest.mark.parametrize(
    ("ids", "method"),
    [
        (wire.CONNECTION_START_OK, C.Connection.StartOk),
        (wire.CONNECTION_TUNE_OK, C.Connection.TuneOk),
        (wire.CONNECTION_OPEN, C.Connection.Open),
        (wire.QUEUE_DECLARE_OK, C.Queue.DeclareOk),
        (wire.BASIC_PUBLISH, C.Basic.Publish),
        (wire.BASIC_RETURN, C.Basic.Return),
        (wire.BASIC_DELIVER, C.Basic.Deliver),
        (wire.BASIC_GET_OK, C.Basic.GetOk),
        (wire.BASIC_GET_EMPTY, C.Basic.GetEmpty),
        (wire.BASIC_ACK, C.Basic.Ack),
        (wire.BASIC_NACK, C.Basic.Nack),
    ],
)
def test_method_ids(ids: wire.MethodId, method: type[Frame]) -> None:
    assert wire.method_index(ids) == method.index
    assert wire.method_ids(method.index) == ids
    assert wire.method_prefix(ids) == method.index.to_bytes(4, "big")


def test_class_ids() -> None:
    assert wire.method_ids(C.Connection.Open.index)[0] == wire.CONNECTION_CLASS
    assert wire.method_ids(C.Channel.Open.index)[0] == wire.CHANNEL_CLASS
    assert wire.method_ids(C.Queue.Declare.index)[0] == wire.QUEUE_CLASS
    assert wire.method_ids(C.Basic.Qos.index)[0] == wire.BASIC_CLASS
    assert C.Basic.Publish.index == wire.BASIC_PUBLISH_INDEX
