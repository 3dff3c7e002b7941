"""asyncio glue for one AMQP connection.

Feeds the bytes read to the sans-IO decoder, moves the connection through
the states of ``state.py`` and carries out what each step means: the
handshake (its protocol logic in ``handshake.py``; logins are the
broker's), heartbeats, channel multiplexing, error-to-close-frame mapping,
and output batching (one ``transport.write`` per loop iteration).
Back-pressure is decided by ``flow_control.py`` and applied to the
transport here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pamqp import commands as C
from pamqp.base import Frame as MethodFrame

from roost.amqp import encoder
from roost.amqp.channel import Channel
from roost.amqp.decoder import (
    ContentTooLarge,
    Event,
    FrameDecoder,
    FrameError,
    HeartbeatReceived,
    MethodReceived,
    ProtocolHeaderReceived,
    PublishReceived,
)
from roost.amqp.flow_control import FlowControl
from roost.amqp.handshake import (
    UnknownMechanism,
    connection_start,
    sasl_credentials,
    tune_ok_refusal,
)
from roost.amqp.state import (
    HANDSHAKE,
    ConnectionState,
    Signal,
    Trigger,
    UnexpectedMethod,
    next_state,
)
from roost.amqp.wire import (
    BASIC_PUBLISH,
    CONNECTION_CLASS,
    CONNECTION_OPEN,
    CONNECTION_START_OK,
    CONNECTION_TUNE_OK,
    FRAME_MIN_SIZE,
    HEARTBEAT_FRAME,
    NO_METHOD,
    PROTOCOL_HEADER,
    MethodId,
    method_ids,
)
from roost.broker import access, errors
from roost.broker.broker import FORCED_CLOSE_TEXT
from roost.broker.errors import BrokerError
from roost.broker.read_models import ConnectionView
from roost.tls import peer_common_name

if TYPE_CHECKING:
    from roost.broker.broker import Broker
    from roost.broker.queue import Queue
    from roost.broker.vhost import VirtualHost

log = logging.getLogger("roost.connection")

CLOSE_TIMEOUT = 3.0

# The states checked per frame, looked up once: an Enum member read off its
# class costs ~70 ns on CPython 3.11, a module global a few.
_RUNNING = ConnectionState.RUNNING
_CLOSED = ConnectionState.CLOSED
_CLOSING = ConnectionState.CLOSING


@dataclass
class ConnectionSettings:
    channel_max: int = 2047
    frame_max: int = 131072
    heartbeat: int = 60
    handshake_timeout: float = 10.0
    consumer_timeout: int = 1800000  # ms an unacked delivery may take (0: no limit)
    # Body bytes of unfinished publishes one connection may hold (0: four
    # times the broker's max_message_size).
    max_unfinished_bytes: int = 0
    # Seconds a publish may take from its method frame to its last body
    # frame (0: no limit).
    unfinished_message_timeout: float = 60.0


class AMQPConnection(asyncio.Protocol):
    def __init__(
        self,
        broker: Broker,
        settings: ConnectionSettings,
        registry: set[AMQPConnection] | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.registry = registry
        self.decoder = FrameDecoder(
            FRAME_MIN_SIZE, broker.max_message_size, settings.max_unfinished_bytes
        )
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.state = ConnectionState.AWAITING_HEADER
        self.channels: dict[int, Channel] = {}
        self.channel_max = settings.channel_max
        self.frame_max = settings.frame_max
        self.heartbeat = 0
        self.username = ""
        self.vhost: VirtualHost | None = None
        self.client_properties: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.exclusive_queues: set[Queue] = set()
        self.peer = ""
        self.peer_host = ""  # the peer's IP address ("" for a Unix socket)
        # CN of the verified client certificate (TLS listeners with
        # verify_peer only); None when there is no certificate.
        self.cert_name: str | None = None
        self.flow = FlowControl()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._confirming: list[Channel] = []
        self._redispatch: set[Queue] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._unfinished_timer: asyncio.TimerHandle | None = None
        self._last_recv = 0.0
        self._last_send = 0.0
        # For the connection log lines (and ``roost ctl list connections``):
        # when the socket was accepted (loop time) and why it is closing.
        self.opened_at = 0.0
        self.close_reason = ""

    # -- transport callbacks -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_host = str(peer[0]) if isinstance(peer, tuple) else ""
        self.transport.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        if self.registry is not None:
            self.registry.add(self)
        self._last_recv = self.opened_at = self.loop.time()
        self._timer = self.loop.call_later(self.settings.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state is _CLOSED:
            return
        now = self._last_recv = self.loop.time()
        self.broker.received(len(data))
        while True:
            try:
                events = self.decoder.feed(data, now)
            except FrameError as exc:
                # The frames before the bad one still count.
                if not self._events(exc.events):
                    return
                self._connection_error(exc.code, exc.text, (exc.class_id, exc.method_id))
                if not (exc.in_sync and self.decoder.closing):
                    return
                # Still in step with the client: read the rest as a closing
                # connection (its close-ok may follow). A closing decoder
                # raises only out-of-sync errors: this happens once at most.
                data = b""
                continue
            if not self._events(events):
                return
            break
        if self.decoder.in_content:
            if self.broker.alarms:
                # A publish under way is blocked like a finished one: its
                # body is what the alarm is about.
                self.flow.blocked_publish()
            if self._unfinished_timer is None and self.settings.unfinished_message_timeout:
                self._unfinished_timer = self.loop.call_later(
                    self.settings.unfinished_message_timeout, self._check_unfinished
                )
        if (
            self.broker.alarms
            and self.state is _RUNNING
            and self.transport is not None
            and self.flow.pause_reading()
        ):
            self.transport.pause_reading()

    def _events(self, events: list[Event]) -> bool:
        """Handle decoded events; False once the connection is closed."""
        channels = self.channels
        for ev in events:
            if type(ev) is PublishReceived:
                ch = channels.get(ev.channel)
                if ch is None or ch.closing:
                    if ch is None:
                        # A no-op once closing: the events after it (close,
                        # close-ok) still count.
                        self._unopened_channel(ev.channel, BASIC_PUBLISH)
                    continue
                try:
                    ch.handle_publish(ev)
                except BrokerError as exc:
                    self._broker_error(ch, exc, BASIC_PUBLISH)
                if self.broker.alarms:
                    self.flow.blocked_publish()
            elif type(ev) is MethodReceived:
                self._method(ev.channel, ev.method)
            elif type(ev) is HeartbeatReceived:
                pass
            elif type(ev) is ContentTooLarge:
                ch = channels.get(ev.channel)
                if ch is not None and not ch.closing:
                    self._broker_error(
                        ch,
                        BrokerError(
                            errors.PRECONDITION_FAILED,
                            f"message size {ev.size} is larger than configured max size "
                            f"{self.broker.max_message_size}",
                        ),
                        BASIC_PUBLISH,
                    )
            elif type(ev) is ProtocolHeaderReceived:
                self._protocol_header(ev)
            if self.state is _CLOSED:
                return False
        return True

    def _check_unfinished(self) -> None:
        """Close a connection that holds a publish unfinished for longer than
        unfinished_message_timeout: its body is kept in memory meanwhile,
        and a client trickling one out must not hold it indefinitely."""
        self._unfinished_timer = None
        if self.state is _CLOSED or self.decoder.closing:
            return
        oldest = self.decoder.oldest_unfinished()
        if oldest is None:
            return
        timeout = self.settings.unfinished_message_timeout
        now = self.loop.time()
        if self.flow.reading_paused:
            # Not read during an alarm: not the client's delay.
            self.decoder.restart_clocks(now)
            oldest = now
        elif now - oldest >= timeout:
            self._connection_error(
                errors.RESOURCE_ERROR,
                f"a message was not completed within {timeout:g}s (unfinished_message_timeout)",
                BASIC_PUBLISH,
            )
            return
        self._unfinished_timer = self.loop.call_later(
            max(oldest + timeout - now, 0.01), self._check_unfinished
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._move(Signal.CONNECTION_LOST)
        if self._unfinished_timer is not None:
            self._unfinished_timer.cancel()
            self._unfinished_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        was_open = self.vhost is not None
        self._teardown()
        if self.registry is not None:
            self.registry.discard(self)
        self.broker.unwatch_alarms(self._alarm_changed)
        reason = self.close_reason or (
            f"connection lost: {exc}" if exc is not None else "client closed the socket"
        )
        fields = {
            "event": "connection.closed",
            "peer": self.peer,
            "user": self.username,
            "vhost": self.vhost.name if self.vhost is not None else "",
            "duration_s": round(self.loop.time() - self.opened_at, 3),
            "reason": reason,
        }
        # Connections that never opened (refused logins, port scans) were
        # logged where they failed; their close is only a debug line.
        log.log(
            logging.INFO if was_open else logging.DEBUG,
            "%s: connection closed (user '%s', vhost '%s', %.3fs): %s",
            self.peer,
            fields["user"],
            fields["vhost"],
            fields["duration_s"],
            reason,
            extra=fields,
        )

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        for ch in list(self.channels.values()):
            if not ch.closing:
                ch.resume()

    @property
    def writable(self) -> bool:
        """Whether the transport takes more output: consumers get credit only then."""
        return self.flow.writable

    # -- output ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def dispatch_soon(self, queue: Queue) -> None:
        if queue not in self._redispatch:
            self._redispatch.add(queue)
            self.loop.call_soon(self._dispatch_later, queue)

    def _dispatch_later(self, queue: Queue) -> None:
        self._redispatch.discard(queue)
        if not queue.deleted:
            queue.dispatch()

    def confirm_pending(self, channel: Channel) -> None:
        self._confirming.append(channel)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._confirming:
            confirming, self._confirming = self._confirming, []
            for ch in confirming:
                ch.flush_confirms()
        if self._out and self.transport is not None and not self.transport.is_closing():
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self._last_send = self.loop.time()
        else:
            self._out.clear()

    def send_method(self, channel: int, frame: MethodFrame) -> None:
        self.write(encoder.method(channel, frame))

    # -- handshake ------------------------------------------------------

    def _protocol_header(self, ev: ProtocolHeaderReceived) -> None:
        if not ev.ok:
            # Tell the client which protocol we speak, then hang up.
            assert self.transport is not None
            self.transport.write(PROTOCOL_HEADER)
            self._close_transport()
            return
        if not self._accept(Signal.HEADER):
            return
        # A certificate only on verify_peer TLS listeners.
        self.cert_name = peer_common_name(self.transport)
        self.send_method(0, connection_start(offer_external=self.cert_name is not None))

    def _start_ok(self, m: C.Connection.StartOk) -> None:
        self.client_properties = dict(m.client_properties or {})
        caps = self.client_properties.get("capabilities")
        self.capabilities = dict(caps) if isinstance(caps, dict) else {}
        mechanism = m.mechanism
        if self.broker.login_throttle.blocked(self.peer_host):
            # Too many recent failures from this address: refused without
            # looking at the credentials, answered like any failed login.
            # Not counted as a failure itself, so a client that keeps
            # retrying gets in once the back-off is over.
            self._auth_failed(
                mechanism, reason="too many failed logins from this address", counts=False
            )
            return
        try:
            credentials = sasl_credentials(mechanism, m.response, self.cert_name)
        except UnknownMechanism as exc:
            self._connection_error(errors.COMMAND_INVALID, str(exc), CONNECTION_START_OK)
            return
        if credentials is None:
            self._auth_failed(mechanism)
            return
        name, password = credentials
        if self.broker.login_throttle.blocked(self.peer_host, name):
            self._auth_failed(
                mechanism, name, reason="too many failed logins for this user", counts=False
            )
            return
        if password is None:
            # EXTERNAL: the certificate's CN names an existing user.
            accepted = bool(name) and name in self.broker.users.users
        else:
            accepted = self.broker.users.authenticate(name, password) is not None
        if not accepted:
            self._auth_failed(mechanism, name)
            return
        if not access.loopback_allowed(name, self.peer_host, self.broker.loopback_users):
            self._auth_failed(mechanism, name, f"user '{name}' can only connect via localhost")
            return
        self.broker.login_throttle.succeeded(self.peer_host, name)
        self.username = name
        s = self.settings
        self.send_method(
            0,
            C.Connection.Tune(
                channel_max=s.channel_max, frame_max=s.frame_max, heartbeat=s.heartbeat
            ),
        )

    def _auth_failed(
        self,
        mechanism: str,
        user: str = "",
        reason: str = "invalid credentials",
        counts: bool = True,
    ) -> None:
        # Logged with the user and the peer, never the password. The client
        # learns no more than RabbitMQ tells it: not which part was wrong.
        log.warning(
            "%s: %s login refused for user '%s': %s",
            self.peer,
            mechanism,
            user,
            reason,
            extra={"event": "login.refused", "peer": self.peer, "user": user},
        )
        blocked = self.broker.login_throttle.failed(self.peer_host, user) if counts else None
        if blocked is not None:
            log.warning(
                "%s: too many failed logins, refusing logins for %s for %gs",
                self.peer,
                blocked,
                self.broker.login_throttle.backoff,
            )
        if self.capabilities.get("authentication_failure_close"):
            self._connection_error(
                errors.ACCESS_REFUSED,
                f"Login was refused using authentication mechanism {mechanism}. "
                "For details see the broker logfile.",
            )
        else:
            self._close_transport()

    def _tune_ok(self, m: C.Connection.TuneOk) -> None:
        s = self.settings
        refusal = tune_ok_refusal(m.channel_max, m.frame_max, s.channel_max, s.frame_max)
        if refusal is not None:
            self._connection_error(errors.NOT_ALLOWED, refusal, CONNECTION_TUNE_OK)
            return
        self.channel_max = m.channel_max or s.channel_max
        self.frame_max = m.frame_max or s.frame_max
        self.heartbeat = m.heartbeat
        self.decoder.frame_max = self.frame_max

    def _open(self, m: C.Connection.Open) -> None:
        try:
            vhost = self.broker.connection_opening(self.username, m.virtual_host)
        except BrokerError as exc:
            self._connection_error(exc.code, exc.text, CONNECTION_OPEN)
            return
        self.vhost = vhost
        self.broker.connections.add(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.send_method(0, C.Connection.OpenOk())
        log.info(
            "%s: connection opened (user '%s', vhost '%s')",
            self.peer,
            self.username,
            vhost.name,
            extra={
                "event": "connection.opened",
                "peer": self.peer,
                "user": self.username,
                "vhost": vhost.name,
                "tls": self.transport is not None
                and self.transport.get_extra_info("ssl_object") is not None,
                "client": str(self.client_properties.get("product", "")),
            },
        )
        self.broker.watch_alarms(self._alarm_changed)
        if self.broker.blocked and self.capabilities.get("connection.blocked"):
            self.send_method(0, C.Connection.Blocked(reason=self.broker.blocked_reason))
        if self.heartbeat:
            self._timer = self.loop.call_later(self._tick_interval(), self._heartbeat_tick)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.state in HANDSHAKE:
            log.warning("%s: handshake timed out", self.peer, extra={"event": "error"})
            self.close_reason = "handshake timed out"
            self._close_transport()

    # -- heartbeats -----------------------------------------------------

    def _tick_interval(self) -> float:
        return max(self.heartbeat / 2.0, 0.05)

    def _heartbeat_tick(self) -> None:
        self._timer = None
        if self.state is _CLOSED or self.transport is None:
            return
        now = self.loop.time()
        if not self.flow.heartbeats_expected:
            # Blocked by an alarm we are not reading, so its heartbeats cannot
            # arrive: not the client's fault (RabbitMQ pauses the monitor too).
            self._last_recv = now
        elif now - self._last_recv > 2 * self.heartbeat:
            log.warning(
                "%s: missed heartbeats from client, timeout: %ss",
                self.peer,
                self.heartbeat,
                extra={"event": "error", "peer": self.peer, "user": self.username},
            )
            self.close_reason = f"missed heartbeats from client, timeout: {self.heartbeat}s"
            self._move(Signal.HANG_UP)
            self.transport.abort()
            return
        if now - self._last_send >= self.heartbeat / 2.0:
            self.transport.write(HEARTBEAT_FRAME)
            self._last_send = now
        self._timer = self.loop.call_later(self._tick_interval(), self._heartbeat_tick)

    # -- methods --------------------------------------------------------

    def _method(self, channel: int, method: MethodFrame) -> None:
        if channel == 0:
            self._connection_method(method)
            return
        # Only a running connection accepts channel methods (see the
        # table); checked here without the table, as this is per frame.
        if self.state is not _RUNNING and not self._accept(Signal.CHANNEL_METHOD):
            return
        ch = self.channels.get(channel)
        t = type(method)
        if t is C.Channel.Open:
            if ch is not None:
                self._connection_error(
                    errors.CHANNEL_ERROR, "second 'channel.open' seen", method_ids(method.index)
                )
                return
            # Like RabbitMQ, channel_max caps how many channels are open at
            # once, not the channel numbers a client may pick.
            if self.channel_max and len(self.channels) >= self.channel_max:
                self._connection_error(
                    errors.NOT_ALLOWED,
                    f"number of channels opened ({len(self.channels)}) has reached "
                    f"the negotiated channel_max ({self.channel_max})",
                )
                return
            self.channels[channel] = Channel(self, channel)
            self.send_method(channel, C.Channel.OpenOk())
            return
        if ch is None:
            self._unopened_channel(channel, method_ids(method.index))
            return
        if ch.closing:
            # After we sent channel.close only close/close-ok matter.
            if t is C.Channel.CloseOk:
                self._forget_channel(channel)
            elif t is C.Channel.Close:
                self.send_method(channel, C.Channel.CloseOk())
            return
        if t is C.Channel.Close:
            ch.teardown()
            self._forget_channel(channel)
            self.send_method(channel, C.Channel.CloseOk())
            return
        if t is C.Channel.CloseOk:
            return
        if method.index >> 16 == CONNECTION_CLASS:
            self._connection_error(
                errors.COMMAND_INVALID,
                f"connection method {method.name} on channel {channel}",
                method_ids(method.index),
            )
            return
        try:
            ch.handle_method(method)
        except BrokerError as exc:
            self._broker_error(ch, exc, method_ids(method.index))

    def _connection_method(self, m: MethodFrame) -> None:
        t = type(m)
        before = self.state
        if not self._accept(t):
            return
        if before is _CLOSING:
            if t is C.Connection.CloseOk:
                self._close_transport()
            elif t is C.Connection.Close:
                self.send_method(0, C.Connection.CloseOk())  # it crossed ours
            return
        if t is C.Connection.Close:
            m_close = cast(C.Connection.Close, m)
            self.close_reason = (
                f"client closed the connection: {m_close.reply_code} {m_close.reply_text}"
            )
            self._teardown()
            self.decoder.close()
            self.send_method(0, C.Connection.CloseOk())
            self._close_transport()
        elif t is C.Connection.StartOk:
            self._start_ok(cast(C.Connection.StartOk, m))
        elif t is C.Connection.TuneOk:
            self._tune_ok(cast(C.Connection.TuneOk, m))
        elif t is C.Connection.Open:
            self._open(cast(C.Connection.Open, m))
        elif t is C.Connection.UpdateSecret:
            self.send_method(0, C.Connection.UpdateSecretOk())
        # Otherwise connection.blocked/unblocked from the client: nothing to do.

    def _accept(self, trigger: Trigger) -> bool:
        """Move to the state the client's ``trigger`` leads to. False if the
        state ignores it, or refuses it: then the connection is closed."""
        try:
            after = next_state(self.state, trigger)
        except UnexpectedMethod as exc:
            self._connection_error(exc.code, exc.text, (exc.class_id, exc.method_id))
            return False
        if after is None:
            return False
        self.state = after
        return True

    def _move(self, signal: Signal) -> bool:
        """Move to the state a server-side ``signal`` leads to; False if the
        state ignores it (every state takes or ignores these)."""
        after = next_state(self.state, signal)
        if after is None:
            return False
        self.state = after
        return True

    def _unopened_channel(self, channel: int, ids: MethodId) -> None:
        self._connection_error(errors.CHANNEL_ERROR, "expected 'channel.open'", ids)

    def _forget_channel(self, number: int) -> None:
        # The decoder's content state is left alone: it reflects the frames
        # read so far, which may already include a publish sent after this
        # close (on the number reopened, or not).
        self.channels.pop(number, None)

    # -- errors ---------------------------------------------------------

    def channel_error(self, ch: Channel, exc: BrokerError) -> None:
        """Close ``ch`` for a reason not tied to a method (consumer timeout):
        RabbitMQ then sends class and method id 0."""
        if self.state is _RUNNING and not ch.closing:
            self._broker_error(ch, exc, NO_METHOD)

    def _broker_error(self, ch: Channel, exc: BrokerError, ids: MethodId) -> None:
        if exc.closes_connection:
            self._connection_error(exc.code, exc.text, ids)
            return
        log.warning(
            "%s: channel %d error: %s",
            self.peer,
            ch.number,
            exc.reply_text,
            extra={
                "event": "channel.error",
                "peer": self.peer,
                "user": self.username,
                "channel": ch.number,
                "code": exc.code,
            },
        )
        ch.teardown()
        # A publish under way on the channel is not abandoned: the client
        # sends the rest of it all the same (it is then ignored, as by
        # RabbitMQ), and those frames must not look like a protocol error.
        self.send_method(
            ch.number,
            C.Channel.Close(
                reply_code=exc.code,
                reply_text=_clip(exc.reply_text),
                class_id=ids[0],
                method_id=ids[1],
            ),
        )

    def _connection_error(self, code: int, text: str, ids: MethodId = NO_METHOD) -> None:
        if not self._move(Signal.SERVER_CLOSE):
            return  # closing already
        name = errors.REPLY_NAMES.get(code, str(code))
        self.close_reason = f"{name} - {text}"
        log.info(
            "%s: closing connection: %s - %s",
            self.peer,
            name,
            text,
            extra={
                "event": "connection.error",
                "peer": self.peer,
                "user": self.username,
                "code": code,
            },
        )
        self._teardown()
        self.decoder.close()
        self.send_method(
            0,
            C.Connection.Close(
                reply_code=code,
                reply_text=_clip(f"{name} - {text}"),
                class_id=ids[0],
                method_id=ids[1],
            ),
        )
        if self._timer is not None:
            self._timer.cancel()
        # Give the client a moment to answer close-ok, then drop it.
        self._timer = self.loop.call_later(CLOSE_TIMEOUT, self._close_transport)

    def close(self, code: int = errors.CONNECTION_FORCED, text: str = FORCED_CLOSE_TEXT) -> None:
        """Server-initiated close (shutdown, management)."""
        self._connection_error(code, text)

    def describe(self) -> ConnectionView:
        """``broker.ClientConnection.describe``: this connection for the
        management adapters."""
        local = ""
        tls = False
        if self.transport is not None:
            sock = self.transport.get_extra_info("sockname")
            if isinstance(sock, tuple):
                local = f"{sock[0]}:{sock[1]}"
            elif sock:
                local = str(sock)
            tls = self.transport.get_extra_info("ssl_object") is not None
        return ConnectionView(
            peer=self.peer,
            peer_host=self.peer_host,
            local=local,
            user=self.username,
            vhost=self.vhost.name if self.vhost is not None else None,
            state=self.state.value,  # RabbitMQ's names ("running", ...)
            channel_max=self.channel_max,
            frame_max=self.frame_max,
            heartbeat=self.heartbeat,
            client_properties=self.client_properties,
            tls=tls,
            auth_mechanism="EXTERNAL" if self.cert_name else "PLAIN",
            connected_for=self.loop.time() - self.opened_at,
            channels=tuple(ch.describe() for _, ch in sorted(self.channels.items())),
        )

    def _close_transport(self) -> None:
        self._move(Signal.HANG_UP)
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    def _teardown(self) -> None:
        self.broker.connections.discard(self)
        channels = list(self.channels.values())
        for ch in channels:
            # First all of them: a message one channel gives back must not be
            # delivered to another one about to go (counted as a delivery).
            ch.closing = True
        for ch in channels:
            ch.teardown()
        self.channels.clear()
        vhost = self.vhost
        if vhost is not None:
            for q in list(self.exclusive_queues):
                if not q.deleted:
                    vhost.remove_queue(q)
        self.exclusive_queues.clear()

    # -- resource alarms -----------------------------------------------

    def _alarm_changed(self, blocked: bool, reason: str) -> None:
        if self.state is not _RUNNING:
            return
        notify = bool(self.capabilities.get("connection.blocked"))
        if blocked:
            if notify:
                self.send_method(0, C.Connection.Blocked(reason=reason))
        else:
            if notify:
                self.send_method(0, C.Connection.Unblocked())
            if self.flow.unblocked() and self.transport is not None:
                # Heartbeats are due again from now on, and so are the
                # bodies of unfinished publishes.
                self._last_recv = self.loop.time()
                self.decoder.restart_clocks(self._last_recv)
                self.transport.resume_reading()


def _clip(text: str) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= 255:
        return text
    return raw[:255].decode("utf-8", "ignore")
