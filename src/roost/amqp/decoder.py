"""Sans-IO AMQP 0-9-1 frame decoder.

Bytes go in, events come out; nothing here touches a socket. Publishes are
assembled (method + content header + body frames) into one
:class:`PublishReceived` event with the property bytes kept raw, and
``basic.publish`` is parsed by hand because it is the hottest frame; every
other method is unmarshalled by pamqp.
"""

from __future__ import annotations

import contextlib
import struct
from typing import cast

from pamqp import commands, exceptions
from pamqp.base import Frame as MethodFrame

from roost.amqp.wire import (
    BASIC_CLASS,
    BASIC_PUBLISH,
    BASIC_PUBLISH_INDEX,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    PROTOCOL_HEADER,
    method_ids,
)
from roost.broker import errors

_frame_head = struct.Struct(">BHI").unpack_from
# basic.publish's arguments at their largest: ticket, two short strings, bits.
_PUBLISH_ARGS_MAX = 2 + 256 + 256 + 1
_u32 = struct.Struct(">I").unpack_from
_u64 = struct.Struct(">Q").unpack_from
_u16 = struct.Struct(">H").unpack_from


class FrameError(Exception):
    """A connection-level protocol violation: close the connection with ``code``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.class_id = 0
        self.method_id = 0
        # Events decoded from the same input before the bad frame: they
        # still count, as RabbitMQ handles every frame before it.
        self.events: list[Event] = []
        # False when the bad frame could not be delimited (too large, bad
        # end byte): nothing after it can be read. Otherwise the frames after
        # it can, as RabbitMQ reads them (a closing connection's close-ok).
        self.in_sync = True


class ProtocolHeaderReceived:
    __slots__ = ("ok", "raw")

    def __init__(self, raw: bytes, ok: bool) -> None:
        self.raw = raw
        self.ok = ok


class MethodReceived:
    __slots__ = ("channel", "method")

    def __init__(self, channel: int, method: MethodFrame) -> None:
        self.channel = channel
        self.method = method


class PublishReceived:
    """A publish: created at its basic.publish frame and filled in by the
    content frames after it; emitted as an event once its body is complete."""

    __slots__ = (
        "body",
        "body_size",
        "channel",
        "chunks",
        "discard",
        "exchange",
        "immediate",
        "mandatory",
        "properties",
        "received",
        "routing_key",
        "started",
    )

    def __init__(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        immediate: bool,
        started: float = 0.0,
    ) -> None:
        self.channel = channel
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.immediate = immediate
        self.properties: bytes | None = None  # None until the content header arrives
        self.body = b""
        self.body_size = 0
        self.received = 0
        self.chunks: list[bytes] | None = None
        self.discard = False
        self.started = started  # when its basic.publish frame was read (the caller's clock)


class ContentTooLarge:
    """A publish whose declared body size exceeds the limit; its body is skipped."""

    __slots__ = ("channel", "size")

    def __init__(self, channel: int, size: int) -> None:
        self.channel = channel
        self.size = size


class HeartbeatReceived:
    __slots__ = ()


Event = (
    ProtocolHeaderReceived | MethodReceived | PublishReceived | ContentTooLarge | HeartbeatReceived
)
HEARTBEAT = HeartbeatReceived()


class FrameDecoder:
    """Turns the client's byte stream into events.

    ``frame_max`` bounds every incoming frame (RabbitMQ's minimum,
    ``FRAME_MIN_SIZE``, applies until tune-ok says otherwise);
    ``max_message_size`` bounds a publish's declared body size;
    ``max_unfinished`` bounds the bytes (properties and body frames) held
    for publishes not yet complete, all channels together (0: four times
    ``max_message_size``).

    Content is only assembled on a channel the client opened after
    ``connection.open``: the decoder follows channel.open and close itself,
    because it reads a whole buffer ahead of the connection acting on the
    methods in it. Anything else is refused at its ``basic.publish`` frame,
    before a byte of it is kept.
    """

    def __init__(
        self,
        frame_max: int = FRAME_MIN_SIZE,
        max_message_size: int = 16 * 1024 * 1024,
        max_unfinished: int = 0,
    ) -> None:
        self.frame_max = frame_max
        self.max_message_size = max_message_size
        self.max_unfinished = max_unfinished or 4 * max_message_size
        # Bytes kept for publishes still missing body frames.
        self.unfinished = 0
        self._connection_opened = False
        self._open_channels: set[int] = set()
        self._buf = bytearray()  # an incomplete frame carried to the next feed()
        self._need = 0  # bytes that incomplete frame needs before it can parse
        self._got_header = False
        self._content: dict[int, PublishReceived] = {}
        self.closing = False  # see close()
        # basic.publish arguments repeat: decode each distinct frame once.
        self._publish_cache: dict[bytes, tuple[str, str, bool, bool]] = {}

    def feed(self, data: bytes, now: float = 0.0) -> list[Event]:
        """Decode as much as possible; raises :class:`FrameError` on bad input.
        ``now`` stamps the publishes begun in ``data`` (see :meth:`oldest_unfinished`)."""
        events: list[Event] = []
        pending = self._buf
        if pending:
            pending += data
            if len(pending) < self._need:
                return events  # still inside one large frame: don't re-copy yet
            buf = bytes(pending)
            pending.clear()
        else:
            # Parse straight from the bytes received: slices of bytes are
            # one copy, where slicing a bytearray and converting takes two.
            buf = data if type(data) is bytes else bytes(data)
        pos = 0
        n = len(buf)
        self._need = 0
        if not self._got_header:
            if n < 8:
                if buf[: min(n, 4)] != PROTOCOL_HEADER[: min(n, 4)]:
                    return [ProtocolHeaderReceived(buf, False)]
                pending += buf
                return events
            raw = buf[:8]
            self._got_header = True
            pos = 8
            events.append(ProtocolHeaderReceived(raw, raw == PROTOCOL_HEADER))
            if raw != PROTOCOL_HEADER:
                return events
        content = self._content
        # RabbitMQ tolerates a payload of up to frame_max bytes (its
        # FRAME_SIZE_FUDGE covers clients that forget the 8 framing bytes),
        # although frame_max is meant to include them; accept what it accepts.
        limit = self.frame_max if self.frame_max else 0xFFFFFFFF
        closing = self.closing
        open_channels = self._open_channels
        # Bytes held for unfinished publishes, kept in a local on the hot
        # path and written back however the loop ends.
        unfinished = self.unfinished
        max_unfinished = self.max_unfinished
        try:
            while n - pos >= 7:
                ftype, ch, size = _frame_head(buf, pos)
                if size > limit:
                    raise _out_of_sync(
                        FrameError(
                            errors.FRAME_ERROR,
                            f"frame payload size {size} larger than negotiated maximum {limit}",
                        )
                    )
                start = pos + 7
                end = start + size
                if end >= n:
                    self._need = end + 1 - pos
                    break
                if buf[end] != FRAME_END:
                    raise _out_of_sync(
                        FrameError(
                            errors.FRAME_ERROR, f"frame end byte 0x{buf[end]:02x} is not 0xce"
                        )
                    )
                pos = end + 1
                if closing:
                    # Only channel 0's methods matter now; a malformed one
                    # is skipped (the connection is closing anyway).
                    if ch == 0 and ftype == FRAME_METHOD and size >= 4:
                        with contextlib.suppress(FrameError):
                            events.append(MethodReceived(0, self._parse_method(buf, start, end)))
                    continue
                if ftype == FRAME_METHOD:
                    if ch in content:
                        raise self._unexpected(content[ch])
                    if size < 4:
                        raise FrameError(errors.FRAME_ERROR, "method frame too short")
                    # On channel 0 basic.publish is just a method the
                    # connection refuses at once, as RabbitMQ does.
                    if ch and _u32(buf, start)[0] == BASIC_PUBLISH_INDEX:
                        if ch not in open_channels:
                            raise self._not_open(ch)
                        raw_args = buf[start + 4 : end]
                        args = self._publish_cache.get(raw_args)
                        if args is None:
                            args = self._parse_publish(raw_args)
                            # Only well-sized frames: one padded up to
                            # frame_max would make the cache hold 256 of them.
                            if len(raw_args) <= _PUBLISH_ARGS_MAX:
                                if len(self._publish_cache) >= 256:
                                    self._publish_cache.clear()
                                self._publish_cache[raw_args] = args
                        content[ch] = PublishReceived(ch, *args, now)
                    else:
                        method = self._parse_method(buf, start, end)
                        self._track(ch, method)
                        events.append(MethodReceived(ch, method))
                elif ftype == FRAME_HEADER:
                    c = content.get(ch)
                    if c is None:
                        raise FrameError(
                            errors.UNEXPECTED_FRAME,
                            "expected method frame, got non method frame instead",
                        )
                    if c.properties is not None:
                        raise self._unexpected(c)
                    if size < 14:
                        raise FrameError(errors.FRAME_ERROR, "content header too short")
                    class_id = _u16(buf, start)[0]
                    if class_id != BASIC_CLASS:
                        # RabbitMQ: 505, blamed on the basic.publish awaiting it.
                        raise _in_publish(
                            FrameError(
                                errors.UNEXPECTED_FRAME,
                                f"expected content header for class {BASIC_CLASS}, "
                                f"got one for class {class_id} instead",
                            )
                        )
                    c.body_size = _u64(buf, start + 4)[0]
                    c.properties = buf[start + 12 : end]
                    if c.body_size > self.max_message_size:
                        c.discard = True
                        events.append(ContentTooLarge(ch, c.body_size))
                    if c.body_size == 0:
                        del content[ch]
                        if not c.discard:
                            events.append(c)
                    else:
                        # Held until the body is complete: the properties
                        # and the body frames before the last one.
                        unfinished += end - start - 12
                        if unfinished > max_unfinished:
                            raise self._too_much(unfinished)
                elif ftype == FRAME_BODY:
                    c = content.get(ch)
                    if c is None:
                        raise FrameError(
                            errors.UNEXPECTED_FRAME,
                            "expected method frame, got non method frame instead",
                        )
                    if c.properties is None:
                        raise self._unexpected(c)
                    c.received += size
                    if c.received > c.body_size:
                        raise FrameError(
                            errors.FRAME_ERROR, "content body larger than declared in its header"
                        )
                    if c.discard:
                        if c.received == c.body_size:
                            del content[ch]
                            unfinished -= len(c.properties)
                        continue
                    if c.received == c.body_size:
                        del content[ch]
                        unfinished -= len(c.properties) + c.received - size
                        if c.chunks is not None:
                            c.chunks.append(buf[start:end])
                            c.body = b"".join(c.chunks)
                            c.chunks = None
                        else:
                            c.body = buf[start:end]
                        events.append(c)
                    else:
                        unfinished += size
                        if unfinished > max_unfinished:
                            raise self._too_much(unfinished)
                        if c.chunks is None:
                            c.chunks = [buf[start:end]]
                        else:
                            c.chunks.append(buf[start:end])
                elif ftype == FRAME_HEARTBEAT:
                    if ch != 0:
                        # RabbitMQ answers 505, not 501, for this.
                        raise FrameError(
                            errors.UNEXPECTED_FRAME, f"heartbeat frame on channel {ch}"
                        )
                    events.append(HEARTBEAT)
                else:
                    raise FrameError(errors.FRAME_ERROR, f"unknown frame type {ftype}")
        except FrameError as exc:
            exc.events = events
            raise
        finally:
            self.unfinished = unfinished
            if pos < n:
                pending += buf[pos:]
        return events

    def _too_much(self, unfinished: int) -> FrameError:
        return FrameError(
            errors.RESOURCE_ERROR,
            f"unfinished messages hold {unfinished} bytes, "
            f"more than the limit of {self.max_unfinished} per connection",
        )

    def _track(self, ch: int, method: MethodFrame) -> None:
        """Follow which channels are open, as far as the client's own
        methods tell (the connection refuses whatever is out of order)."""
        t = type(method)
        if ch == 0:
            if t is commands.Connection.Open:
                self._connection_opened = True
        elif t is commands.Channel.Open:
            if self._connection_opened:
                self._open_channels.add(ch)
        elif t is commands.Channel.Close:
            # Not on close-ok: one on an open channel is ignored. After the
            # close-ok to a server's close the number stays known here, and
            # a publish on it is refused once assembled (within the limits).
            self._open_channels.discard(ch)

    def _not_open(self, ch: int) -> FrameError:
        # The texts and codes the connection gives any other method in
        # these cases (state.refusal, AMQPConnection._unopened_channel).
        if not self._connection_opened:
            err = FrameError(errors.COMMAND_INVALID, "channel method before connection.open")
        else:
            err = _in_publish(FrameError(errors.CHANNEL_ERROR, "expected 'channel.open'"))
        return err

    def oldest_unfinished(self) -> float | None:
        """When the oldest publish still missing frames began (``feed``'s
        ``now``), or None if there is none."""
        return min((c.started for c in self._content.values()), default=None)

    @property
    def in_content(self) -> bool:
        """Whether some publish is still missing frames."""
        return bool(self._content)

    def restart_clocks(self, now: float) -> None:
        """Count the unfinished publishes' time from ``now`` (the client
        could not send while the connection was not read)."""
        for c in self._content.values():
            c.started = now

    @staticmethod
    def _unexpected(c: PublishReceived) -> FrameError:
        if c.properties is None:
            return _in_publish(
                FrameError(
                    errors.UNEXPECTED_FRAME,
                    f"expected content header for class {BASIC_CLASS}, "
                    "got non content header frame instead",
                )
            )
        return _in_publish(
            FrameError(
                errors.UNEXPECTED_FRAME,
                "expected content body, got non content body frame instead",
            )
        )

    @staticmethod
    def _parse_publish(buf: bytes) -> tuple[str, str, bool, bool]:
        end = len(buf)
        pos = 2  # reserved ticket
        try:
            ln = buf[pos]
            exchange = buf[pos + 1 : pos + 1 + ln].decode("utf-8")
            pos += 1 + ln
            ln = buf[pos]
            routing_key = buf[pos + 1 : pos + 1 + ln].decode("utf-8")
            pos += 1 + ln
            bits = buf[pos]
        except (IndexError, UnicodeDecodeError) as exc:
            raise _in_publish(
                FrameError(errors.FRAME_ERROR, "malformed basic.publish frame")
            ) from exc
        if pos >= end:
            raise _in_publish(FrameError(errors.FRAME_ERROR, "malformed basic.publish frame"))
        return exchange, routing_key, bool(bits & 1), bool(bits & 2)

    @staticmethod
    def _parse_method(buf: bytes, start: int, end: int) -> MethodFrame:
        index = _u32(buf, start)[0]
        cls = commands.INDEX_MAPPING.get(index)
        if cls is None:
            class_id, method_id = method_ids(index)
            raise FrameError(
                errors.COMMAND_INVALID, f"unknown method (class {class_id}, method {method_id})"
            )
        method = cls()
        try:
            method.unmarshal(buf[start + 4 : end])
        except RecursionError as exc:
            # pamqp decodes nested tables/arrays recursively: one nested a
            # few hundred levels deep exhausts the stack. RabbitMQ accepts
            # any depth; refusing it as malformed beats crashing the handler.
            err = FrameError(
                errors.FRAME_ERROR, f"malformed method frame {index:#x}: tables nested too deeply"
            )
            err.class_id, err.method_id = method_ids(index)
            raise err from exc
        except (struct.error, ValueError, IndexError, TypeError, exceptions.PAMQPException) as exc:
            err = FrameError(errors.FRAME_ERROR, f"malformed method frame {index:#x}: {exc}")
            err.class_id, err.method_id = method_ids(index)  # as RabbitMQ reports
            raise err from exc
        return cast(MethodFrame, method)

    def close(self) -> None:
        """The connection is closing: read only channel 0's methods from now
        on (close, close-ok), as RabbitMQ ignores every other frame then.
        Only a frame that cannot be delimited raises after this."""
        self.closing = True
        self._content.clear()
        self.unfinished = 0

    def abandon_content(self, channel: int) -> None:
        """Forget a half-received publish (its channel was closed)."""
        c = self._content.get(channel)
        # A publish refused as too large still has body frames on the wire
        # (the channel is closed because of it): keep skipping them, as
        # RabbitMQ reads the whole content before closing the channel.
        if c is not None and not c.discard:
            del self._content[channel]
            self.unfinished -= len(c.properties or b"") + c.received


def _out_of_sync(err: FrameError) -> FrameError:
    err.in_sync = False
    return err


def _in_publish(err: FrameError) -> FrameError:
    """RabbitMQ names basic.publish as the failing method of a broken content sequence."""
    err.class_id, err.method_id = BASIC_PUBLISH
    return err


__all__ = [
    "ContentTooLarge",
    "Event",
    "FrameDecoder",
    "FrameError",
    "HeartbeatReceived",
    "MethodReceived",
    "ProtocolHeaderReceived",
    "PublishReceived",
]
