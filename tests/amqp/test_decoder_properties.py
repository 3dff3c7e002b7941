"""Property-based tests: the frame decoder under arbitrary input and chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat
from pamqp.common import FieldTable

from roost.amqp.decoder import (
    FrameDecoder,
    FrameError,
    HeartbeatReceived,
    MethodReceived,
    PublishReceived,
)
from roost.amqp.wire import PROTOCOL_HEADER

FRAME_MAX = 131072


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def summary(events: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for ev in events:
        if isinstance(ev, MethodReceived):
            m = ev.method
            out.append(("method", ev.channel, m.name, bytes(pframe.marshal(m, ev.channel))))
        elif isinstance(ev, PublishReceived):
            out.append(
                (
                    "publish",
                    ev.channel,
                    ev.exchange,
                    ev.routing_key,
                    ev.mandatory,
                    ev.properties,
                    bytes(ev.body),
                )
            )
        elif isinstance(ev, HeartbeatReceived):
            out.append(("heartbeat",))
        else:
            out.append((type(ev).__name__,))
    return out


def decode_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for c in chunks:
        events.extend(decoder.feed(c))
    return events


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=2000),
    st.lists(st.integers(min_value=0), max_size=20),
    st.sampled_from([0, 4096, FRAME_MAX]),
)
def test_arbitrary_bytes_raise_only_frame_error(data: bytes, cuts: list[int], fm: int) -> None:
    decoder = FrameDecoder(frame_max=fm)
    decoder.feed(PROTOCOL_HEADER)
    try:
        for c in chunked(data, cuts):
            decoder.feed(c)
    except FrameError as exc:
        assert 500 <= exc.code < 600


names = st.from_regex(r"[a-zA-Z0-9_.:-]{0,20}", fullmatch=True)
tables: st.SearchStrategy[FieldTable] = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=8),
    st.one_of(st.integers(-(2**31), 2**31 - 1), st.booleans(), st.text(max_size=20)),
    max_size=5,
)
methods = st.one_of(
    st.builds(C.Queue.Declare, queue=names, durable=st.booleans(), arguments=tables),
    st.builds(C.Exchange.Declare, exchange=names, exchange_type=st.just("topic")),
    st.builds(C.Basic.Ack, delivery_tag=st.integers(0, 2**63 - 1), multiple=st.booleans()),
    st.builds(C.Basic.Qos, prefetch_count=st.integers(0, 65535)),
    st.builds(C.Queue.Bind, queue=names, exchange=names, routing_key=names, arguments=tables),
)


@st.composite
def frame_sequences(draw: st.DrawFn) -> tuple[bytes, list[tuple[object, ...]]]:
    """Valid frames plus the events they must decode to."""
    # Content is only assembled on channels opened after connection.open.
    opening = C.Connection.Open(virtual_host="/")
    wire = bytes(pframe.marshal(opening, 0))
    expected: list[tuple[object, ...]] = [("method", 0, opening.name, wire)]
    for _ in range(draw(st.integers(1, 8))):
        ch = draw(st.integers(1, 65535))
        kind = draw(st.sampled_from(["method", "publish", "heartbeat"]))
        if kind == "heartbeat":
            wire += pframe.marshal(pheartbeat.Heartbeat(), 0)
            expected.append(("heartbeat",))
        elif kind == "method":
            m = draw(methods)
            raw = pframe.marshal(m, ch)
            wire += raw
            expected.append(("method", ch, m.name, bytes(raw)))
        else:
            open_ch = pframe.marshal(C.Channel.Open(), ch)
            wire += open_ch
            expected.append(("method", ch, "Channel.Open", bytes(open_ch)))
            exchange, key = draw(names), draw(names)
            mandatory = draw(st.booleans())
            body = draw(st.binary(max_size=3000))
            props = C.Basic.Properties(
                content_type=draw(st.none() | st.just("text/plain")),
                headers=draw(st.none() | tables),
                delivery_mode=draw(st.none() | st.sampled_from([1, 2])),
            )
            wire += pframe.marshal(
                C.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory), ch
            )
            wire += pframe.marshal(pheader.ContentHeader(0, len(body), props), ch)
            piece = draw(st.integers(1, 1000))
            for i in range(0, len(body), piece):
                wire += pframe.marshal(pbody.ContentBody(body[i : i + piece]), ch)
            raw_props = bytes(pframe.marshal(pheader.ContentHeader(0, len(body), props), ch))[19:-1]
            expected.append(("publish", ch, exchange, key, mandatory, raw_props, body))
    return wire, expected


@settings(max_examples=100, deadline=None)
@given(frame_sequences(), st.lists(st.integers(min_value=0), max_size=30))
def test_valid_frames_decode_the_same_however_split(
    seq: tuple[bytes, list[tuple[object, ...]]], cuts: list[int]
) -> None:
    wire, expected = seq
    whole = summary(decode_all(FrameDecoder(frame_max=FRAME_MAX), [PROTOCOL_HEADER + wire]))
    assert whole[1:] == expected
    split = summary(
        decode_all(FrameDecoder(frame_max=FRAME_MAX), chunked(PROTOCOL_HEADER + wire, cuts))
    )
    assert split == whole
    bytewise = (
        summary(
            decode_all(
                FrameDecoder(frame_max=FRAME_MAX), [bytes((b,)) for b in PROTOCOL_HEADER + wire]
            )
        )
        if len(wire) < 4000
        else whole
    )
    assert bytewise == whole
