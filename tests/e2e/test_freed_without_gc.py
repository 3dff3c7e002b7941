"""A closed connection's objects are freed by reference counting alone.

``roost serve`` raises the cyclic collector's thresholds (cli.py), so any
reference cycle through a connection keeps it and everything it holds in
memory until a rare collection: the soak benchmark found exactly that (a
per-channel table of bound methods), RSS climbing ~15 KiB per connection.
These tests run with the collector disabled and exercise the features that
hold state per connection, then close the connection in each way a client
can, and require every connection, channel and consumer object to be gone.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from roost.amqp.connection import AMQPConnection
from roost.testing import RoostBroker

QUEUE = "freed-q"


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def server_side(broker: RoostBroker) -> list[weakref.ref[object]]:
    """Weak references to every open connection, its decoder and channels."""
    assert broker.server is not None

    def collect() -> list[weakref.ref[object]]:
        refs: list[weakref.ref[object]] = []
        assert broker.server is not None
        for conn in broker.server.broker.connections:
            if not isinstance(conn, AMQPConnection):
                continue
            refs.append(weakref.ref(conn))
            refs.append(weakref.ref(conn.decoder))
            refs.extend(weakref.ref(ch) for ch in conn.channels.values())
        return refs

    return broker.call(collect)


def busy_connection(url: str) -> pika.BlockingConnection:
    """A connection that has used confirms, transactions, prefetch, an
    exclusive queue, direct reply-to, basic.get, nack and a channel error."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(QUEUE)
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", QUEUE, b"m", pika.BasicProperties(delivery_mode=2, headers={"i": i}))
    tx = conn.channel()
    tx.tx_select()
    tx.basic_publish("", QUEUE, b"t")
    tx.tx_commit()
    ch.queue_declare("", exclusive=True)
    ch.exchange_declare("freed-x", "topic", auto_delete=True)
    ch.queue_bind(QUEUE, "freed-x", "a.#")
    ch.basic_publish("freed-x", "a.b", b"routed")
    cons = conn.channel()
    cons.basic_qos(prefetch_count=3)
    tags: list[int] = []
    cons.basic_consume(QUEUE, lambda _c, m, _p, _b: tags.append(m.delivery_tag))
    cons.basic_consume("amq.rabbitmq.reply-to", lambda *_: None, auto_ack=True)
    cons.basic_publish("", QUEUE, b"r", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    deadline = time.monotonic() + 5
    while len(tags) < 3 and time.monotonic() < deadline:
        conn.process_data_events(0.05)
    assert len(tags) == 3
    cons.basic_ack(tags[0])
    cons.basic_nack(tags[1], requeue=True)
    assert ch.basic_get(QUEUE)[0] is not None
    doomed = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        doomed.queue_declare("no-such-queue", passive=True)
    return conn


def wait_all_dead(refs: list[weakref.ref[object]], timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [type(o).__name__ for r in refs if (o := r()) is not None]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["close", "vanish", "server-close"])
def test_closed_connection_freed_without_cycle_collector(
    roost_broker: RoostBroker, no_gc: None, how: str
) -> None:
    conn = busy_connection(roost_broker.url)
    refs = server_side(roost_broker)
    # The connection, its decoder and at least the three channels still open.
    assert len(refs) >= 5
    if how == "close":
        conn.close()
    elif how == "vanish":
        conn._impl._transport._sock.close()  # no connection.close
    else:
        assert roost_broker.server is not None
        server = roost_broker.server

        def close_all() -> None:
            for c in list(server.broker.connections):
                c.close()

        roost_broker.call(close_all)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
            while True:
                conn.process_data_events(0.05)
    assert wait_all_dead(refs) == []
