"""Bounds on the management API's connections: how many may be open, how
long a client may take to send a request's headers and its body.

aiohttp's own parser bounds header sizes (8190 bytes a line, 128 headers)
and ``client_max_size`` bounds bodies, but it waits for a request's bytes
for as long as the client likes: a client sending a header a byte at a
time (slowloris) holds its connection, and its memory, indefinitely. Each
connection's protocol is therefore wrapped in a ``ConnectionGuard`` that
owns two timers, armed by the listener and by the ``bounded`` middleware
(which runs as soon as a request's headers are parsed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class HTTPLimits:
    max_connections: int = 256  # 0: no limit
    header_timeout: float = 30.0
    body_timeout: float = 60.0


def _reply(status: str, error: str, reason: str) -> bytes:
    """A whole HTTP/1.1 response in RabbitMQ's JSON error shape, written
    straight to a transport when no request handler can answer."""
    body = json.dumps({"error": error, "reason": reason}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# Seconds a hung-up connection may keep sending before it is reset.
_GRACE = 2.0
_BUSY = _reply("503 Service Unavailable", "service_unavailable", "Too many HTTP connections")
_TIMEOUT = _reply("408 Request Timeout", "request_timeout", "Request not received in time")


class ConnectionGuard(asyncio.Protocol):
    """Stands between the transport and aiohttp's request handler of one
    connection, forwarding everything, and closes the connection when the
    client is too slow or there are too many connections."""

    def __init__(
        self, inner: RequestHandler, limits: HTTPLimits, open_: set[ConnectionGuard]
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._open = open_
        self._transport: asyncio.Transport | None = None
        self._refused = False
        self._hanging_up = False  # our final reply is written; input is discarded
        self._idle = False  # between a response and the next request's first byte
        self._responding = False  # the handler has returned: a response is on its way
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        cap = self._limits.max_connections
        if cap and len(self._open) >= cap:
            # Refused before aiohttp sees it: costs one small write.
            self._refused = True
            self._hang_up(_BUSY)
            return
        self._open.add(self)
        self._inner.connection_made(transport)
        self._arm(self._limits.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._refused or self._hanging_up:
            return
        if self._idle:
            self._idle = False
            self._arm(self._limits.header_timeout, self._headers_late)
        self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._refused or self._hanging_up:
            assert self._transport is not None
            self._transport.close()
        else:
            self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._open.discard(self)
        if not self._refused:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()

    # -- called by the middleware ------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        """Headers are in: the body now has ``body_timeout`` to arrive."""
        self._responding = False
        self._idle = False  # a pipelined request's body must not re-arm the header timer
        content = request.content

        def body_late() -> None:
            if not content.is_eof():
                self._expire()

        self._arm(self._limits.body_timeout, body_late)

    def request_finished(self) -> None:
        """The handler returned. The body timer stays armed (a body the
        handler never read is still drained by aiohttp); the next request's
        header timer starts at its first byte."""
        self._responding = True
        self._idle = True

    # -- timers --------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._expire()

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._responding:
            transport.close()
        else:
            # No response has begun, so a 408 cannot interleave with one.
            self._hang_up(_TIMEOUT)

    def _hang_up(self, reply: bytes) -> None:
        """Write a last reply and close without resetting the connection:
        closing at once while the client is still sending would make the
        kernel send a reset, which can destroy the reply before the client
        reads it. So: half-close, discard what still comes, and close at
        the client's end of file or after a short grace."""
        transport = self._transport
        assert transport is not None
        self._hanging_up = True
        transport.write(reply)
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        transport.write_eof()
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(_GRACE, transport.abort)


def guarded_factory(
    server: web.Server, limits: HTTPLimits, open_: set[ConnectionGuard]
) -> Callable[[], ConnectionGuard]:
    """A protocol factory for ``loop.create_server``: aiohttp's own request
    handler for each connection, inside a guard."""
    return lambda: ConnectionGuard(server(), limits, open_)


@web.middleware
async def bounded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's guard when a request's headers are in and when
    its handler is done. Outermost, so that it runs before anything else."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, ConnectionGuard):
        return await handler(request)  # served without a guard (tests' test_client)
    guard.request_started(request)
    try:
        return await handler(request)
    finally:
        guard.request_finished()


class _DropUnparsableRequests(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback;
    the client already got its 400, and anyone able to connect could fill
    the log with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_QUIET = _DropUnparsableRequests()


def quiet_unparsable_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(_QUIET)  # a no-op the second time
