"""Binding, unbinding, deleting and routing cost milliseconds however many
bindings an exchange or queue has (issue 12, item 4), over real sockets.

Bindings go out pipelined (``nowait``) and one synchronous method after
them marks when the broker has handled them all, so the time measured is
the broker's. The bounds are generous, an order of magnitude above what
the indexed bindings take on a slow shared machine (see
scripts/hostile_ops.py and docs/security.md for the measured figures);
before the indexes each of these took from 14 s to minutes."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from pamqp import commands as C
from pamqp import frame as pframe

from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.basic_helpers import connect, publish

pytestmark = pytest.mark.timeout(300)


def send_all(client: RawClient, methods: Iterable[object]) -> None:
    batch: list[bytes] = []
    for m in methods:
        batch.append(pframe.marshal(m, 1))  # type: ignore[arg-type]
        if len(batch) == 1000:
            client.send(b"".join(batch))
            batch.clear()
    client.send(b"".join(batch))


def synced(client: RawClient, queue: str) -> float:
    """Wait until the broker has handled everything sent before; returns
    when that was (time.monotonic)."""
    client.send_frame(C.Queue.Declare(queue=queue, passive=True), 1)
    client.expect(C.Queue.DeclareOk)
    return time.monotonic()


def bind_all(client: RawClient, queue: str, exchange: str, keys: Iterable[str]) -> float:
    """Seconds the broker takes to add the bindings."""
    start = time.monotonic()
    send_all(
        client,
        (C.Queue.Bind(queue=queue, exchange=exchange, routing_key=k, nowait=True) for k in keys),
    )
    return synced(client, queue) - start


def raw_client(broker: RoostBroker) -> RawClient:
    client = connect(broker.port)
    client.sock.settimeout(240)
    return client


def test_deleting_a_queue_with_20000_bindings_is_quick(roost_broker: RoostBroker) -> None:
    client = raw_client(roost_broker)
    client.send_frame(C.Queue.Declare(queue="many-bindings"), 1)
    client.expect(C.Queue.DeclareOk)
    bind_all(client, "many-bindings", "amq.direct", (f"key.{i}" for i in range(20_000)))
    start = time.monotonic()
    client.send_frame(C.Queue.Delete(queue="many-bindings"), 1)
    client.expect(C.Queue.DeleteOk)
    assert time.monotonic() - start < 2.0


def test_adding_and_removing_10000_topic_bindings_is_quick(roost_broker: RoostBroker) -> None:
    client = raw_client(roost_broker)
    client.send_frame(C.Queue.Declare(queue="topics"), 1)
    client.expect(C.Queue.DeclareOk)
    keys = [f"region.{i % 50}.*.#.item{i}" for i in range(10_000)]
    assert bind_all(client, "topics", "amq.topic", keys) < 10.0
    start = time.monotonic()
    send_all(
        client,
        (C.Queue.Unbind(queue="topics", exchange="amq.topic", routing_key=k) for k in keys),
    )
    for _ in keys:
        client.expect(C.Queue.UnbindOk)
    assert time.monotonic() - start < 10.0
    # Routing still right after all that churn: nothing bound any more.
    client.send_frame(C.Queue.Bind(queue="topics", exchange="amq.topic", routing_key="a.#"), 1)
    client.expect(C.Queue.BindOk)
    publish(client, "amq.topic", "region.1.x.y.item1", b"gone")
    publish(client, "amq.topic", "a.b", b"kept")
    client.send_frame(C.Queue.Purge(queue="topics"), 1)
    ok = client.expect(C.Queue.PurgeOk)
    assert isinstance(ok, C.Queue.PurgeOk) and ok.message_count == 1


def test_routing_through_1500_crafted_topic_patterns_is_quick(roost_broker: RoostBroker) -> None:
    # '#' followed by many words: a backtracking matcher retries the '#'
    # at every word of a long key that almost matches, for every pattern.
    client = raw_client(roost_broker)
    client.send_frame(C.Exchange.Declare(exchange="crafted", exchange_type="topic"), 1)
    client.expect(C.Exchange.DeclareOk)
    client.send_frame(C.Queue.Declare(queue="crafted-q"), 1)
    client.expect(C.Queue.DeclareOk)
    patterns = ["#." + "a." * 60 + f"b{i}" for i in range(1500)]
    bind_all(client, "crafted-q", "crafted", patterns)
    start = time.monotonic()
    for j in range(100):
        # A new key each time: no help from the exchange's route cache.
        publish(client, "crafted", "a." * 120 + f"b{j}x", b"")
    publish(client, "crafted", "a." * 120 + "b7", b"hit")
    assert synced(client, "crafted-q") - start < 5.0
    client.send_frame(C.Queue.Declare(queue="crafted-q", passive=True), 1)
    ok = client.expect(C.Queue.DeclareOk)
    assert isinstance(ok, C.Queue.DeclareOk) and ok.message_count == 1
