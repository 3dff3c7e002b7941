"""Direct reply-to across the nodes of a cluster.

A requester consumes from ``amq.rabbitmq.reply-to`` on node A; the server
answering it may be connected to node B. The reply-to name a node hands
out starts with its epoch (``amq.rabbitmq.reply-to.<epoch>.<random>``), so
B knows where the requester is, and sends the reply there:

- a reply that fits a NOTIFY payload (PostgreSQL refuses 8000 bytes or
  more; base64 adds a third) is the payload, on A's own channel
  ``roost_reply_<epoch>``: one statement, nothing stored;
- a larger one is a row of the unlogged ``roost_replies``, inserted only
  while A's epoch is alive, and the payload names it; A deletes it as it
  reads it.

A hands the reply to the requesting channel if it is still there, and
drops it otherwise, as RabbitMQ drops a reply to a channel that is gone;
a reply to a dead node's requester is dropped too (no one listens on its
channel, its rows are deleted with its cleanup). Like RabbitMQ's direct
reply-to it is at most once: a node that dies with replies on the way
loses them, and a requester on a node that lost its listening connection
for a moment may miss the replies sent meanwhile (the rows it finds when
it listens again are delivered). Replies from one node to one requester
keep their order: each node sends them in order, from one connection, and
PostgreSQL delivers notifications in commit order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import psycopg

from roost.broker.message import Message
from roost.broker.vhost import REPLY_TO_PREFIX

if TYPE_CHECKING:
    from roost.broker.broker import Broker

log = logging.getLogger(__name__)

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
PAYLOAD_MAX = 7900
RECONNECT_DELAY = 1.0
_SEND, _TAKE = 0, 1  # connection slots
# Replies held for sending while PostgreSQL is out of reach (then dropped:
# at most once, and a requester waits for a timeout anyway).
MAX_PENDING = 10_000


def channel_of(epoch: int) -> str:
    return f"roost_reply_{epoch}"


def epoch_of(key: str) -> int | None:
    """The node epoch a reply-to key made by :meth:`ReplyRelay.key_prefix` names."""
    head, dot, _ = key.partition(".")
    if not dot or not head.isdigit():
        return None
    return int(head)


class ReplyRelay:
    """One node's end of direct reply-to across nodes (see the module
    docstring); a :class:`~roost.broker.vhost.ReplyRelay`."""

    def __init__(self, conninfo: str, epoch: int, broker: Broker) -> None:
        self.conninfo = conninfo
        self.epoch = epoch
        self.broker = broker
        self._pending: list[tuple[int, str, str, Message]] = []
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        # One to send, one to take stored replies (the sender's is in
        # pipeline mode across awaits).
        self._conns: list[psycopg.AsyncConnection[Any] | None] = [None, None]
        self.relayed = 0  # sent on to other nodes (stats, tests)
        self.delivered = 0  # received from other nodes and delivered here

    async def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name="roost-reply-sender")
        self._listener = asyncio.create_task(self._listen(), name="roost-reply-listener")
        await self._listening.wait()

    async def close(self) -> None:
        for task in (self._sender, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sender = self._listener = None
        for slot in range(len(self._conns)):
            await self._drop(slot)

    def set_epoch(self, epoch: int) -> None:
        """Registered again after fencing (every AMQP connection, so every
        requester of the old epoch, was closed): listen on the new channel."""
        self.epoch = epoch
        if self._listener is not None:
            self._listener.cancel()
            self._listening = asyncio.Event()
            self._listener = asyncio.create_task(self._listen(), name="roost-reply-listener")

    # -- the broker's side --------------------------------------------------

    def key_prefix(self) -> str:
        return f"{self.epoch}."

    def relay(self, vhost: str, key: str, message: Message) -> bool:
        epoch = epoch_of(key)
        if epoch is None or epoch == self.epoch or len(self._pending) >= MAX_PENDING:
            return False  # ours and gone (or no node's): nowhere to go
        self._pending.append((epoch, vhost, key, message))
        self._wake.set()
        return True

    # -- sending ------------------------------------------------------------

    async def _connection(self, slot: int) -> psycopg.AsyncConnection[Any]:
        conn = self._conns[slot]
        if conn is None or conn.closed or conn.broken:
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, application_name="roost-replies"
            )
            self._conns[slot] = conn
        return conn

    async def _drop(self, slot: int) -> None:
        conn, self._conns[slot] = self._conns[slot], None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                conn = await self._connection(_SEND)
                async with conn.pipeline():
                    for epoch, vhost, key, message in batch:
                        await _send(conn, epoch, vhost, key, message)
                self.relayed += len(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # At most once, as RabbitMQ's: the requester times out.
                log.warning("direct reply-to: %d replies to other nodes lost: %s", len(batch), exc)
                await self._drop(_SEND)
                await asyncio.sleep(RECONNECT_DELAY)

    # -- receiving ----------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            epoch = self.epoch
            try:
                conn: psycopg.AsyncConnection[Any] = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, application_name="roost-reply-listener"
                )
                async with conn:
                    await conn.execute(f"LISTEN {channel_of(epoch)}".encode())
                    self._listening.set()
                    # Rows sent while this node was not listening.
                    await self._take_rows(epoch, None)
                    async for note in conn.notifies():
                        await self._received(epoch, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._drop(_TAKE)
                log.warning("direct reply-to: LISTEN %s: %s; reconnecting", channel_of(epoch), exc)
                self._listening.set()  # start() must not hang on an outage
                await asyncio.sleep(RECONNECT_DELAY)

    async def _received(self, epoch: int, payload: str) -> None:
        if payload.startswith("r"):
            await self._take_rows(epoch, int(payload[1:]))
            return
        vhost, key, props, body = json.loads(payload)
        self._deliver(vhost, key, base64.b64decode(props), base64.b64decode(body))

    async def _take_rows(self, epoch: int, row_id: int | None) -> None:
        conn = await self._connection(_TAKE)
        if row_id is None:
            cur = await conn.execute(_TAKE_ALL, (epoch,))
        else:
            cur = await conn.execute(_TAKE_ONE, (row_id,))
        for vhost, key, props, body in await cur.fetchall():
            self._deliver(vhost, key, props, body)

    def _deliver(self, vhost: str, key: str, props: bytes, body: bytes) -> None:
        vh = self.broker.vhosts.get(vhost)
        target = vh.reply_targets.get(key) if vh is not None else None
        if target is None:
            return  # the requester's channel is gone: dropped, as in RabbitMQ
        self.delivered += 1
        target(Message("", REPLY_TO_PREFIX + key, props, body))


async def _send(
    conn: psycopg.AsyncConnection[Any], epoch: int, vhost: str, key: str, message: Message
) -> None:
    props, body = message.properties, message.body
    # base64: 4 bytes per 3; the rest is small.
    if (len(props) + len(body)) * 4 // 3 + len(vhost) + len(key) + 32 < PAYLOAD_MAX:
        payload = json.dumps(
            [vhost, key, base64.b64encode(props).decode(), base64.b64encode(body).decode()]
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (channel_of(epoch), payload))
    else:
        await conn.execute(
            _STORE,
            {
                "epoch": epoch,
                "vhost": vhost,
                "key": key,
                "p": props,
                "b": body,
                "channel": channel_of(epoch),
            },
        )


async def forget_dead(conn: psycopg.AsyncConnection[Any], epoch: int) -> None:
    """A dead node's undelivered replies go with it (its cleanup hook)."""
    await conn.execute("DELETE FROM roost_replies WHERE epoch = %s", (epoch,))


# Only for a live requester node: a dead one would never delete it.
_STORE = (
    "WITH r AS (INSERT INTO roost_replies (epoch, vhost, key, properties, body)"
    " SELECT %(epoch)s, %(vhost)s, %(key)s, %(p)s, %(b)s WHERE EXISTS"
    " (SELECT 1 FROM roost_nodes WHERE epoch = %(epoch)s AND NOT dead) RETURNING id)"
    " SELECT pg_notify(%(channel)s, 'r' || id) FROM r"
)
_TAKE_ONE = "DELETE FROM roost_replies WHERE id = %s RETURNING vhost, key, properties, body"
_TAKE_ALL = (
    "WITH d AS (DELETE FROM roost_replies WHERE epoch = %s"
    " RETURNING id, vhost, key, properties, body)"
    " SELECT vhost, key, properties, body FROM d ORDER BY id"
)
