"""Consumers across ``roost serve --cluster`` nodes (roost.cluster.consumers):
single active consumer, auto-delete, x-expires, consumer counts and
priorities decided for the whole cluster, the cancel notification and
exclusive queues. Real processes, pika and aio-pika clients on different
nodes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import pika
import pytest
from pika.exceptions import AMQPError, ChannelClosedByBroker

from roost.testing import RoostProcess

TIMEOUT = 3  # --node-timeout of every node here


@pytest.fixture
def node(pg_url: str) -> Iterator[Callable[[str], RoostProcess]]:
    started: list[RoostProcess] = []

    def start(name: str) -> RoostProcess:
        proc = RoostProcess(
            None, "--cluster", pg_url, "--node-name", name, "--node-timeout", str(TIMEOUT)
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
        proc.close()


def _connect(proc: RoostProcess) -> Any:
    return pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port))


class Consumer:
    """A pika consumer on a connection of its own, recording (body,
    redelivered); acks as it goes unless told not to."""

    def __init__(
        self,
        proc: RoostProcess,
        queue: str,
        *,
        prefetch: int = 0,
        ack: bool = True,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.conn = _connect(proc)
        self.ch = self.conn.channel()
        if prefetch:
            self.ch.basic_qos(prefetch_count=prefetch)
        self.got: list[tuple[bytes, bool]] = []
        self.ack = ack
        self.cancelled = False
        self.ch.add_on_cancel_callback(self._on_cancel)
        self.tag = self.ch.basic_consume(queue, self._on_message, arguments=arguments)

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.got.append((body, bool(method.redelivered)))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    def _on_cancel(self, frame: Any) -> None:
        self.cancelled = True

    def pump(self, seconds: float = 0.05) -> None:
        self.conn.process_data_events(time_limit=seconds)

    def bodies(self) -> set[bytes]:
        return {body for body, _ in self.got}

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def _wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    pumping: list[Consumer] = (),  # type: ignore[assignment]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if pumping:
            for c in pumping:
                if c.conn.is_open:
                    c.pump()
        else:
            time.sleep(0.1)


def _pump(consumers: list[Consumer], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in consumers:
            c.pump()


def _consumer_count(proc: RoostProcess, queue: str) -> int:
    with _connect(proc) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)


def _exists(proc: RoostProcess, queue: str) -> bool:
    with _connect(proc) as conn:
        try:
            conn.channel().queue_declare(queue, passive=True)
        except ChannelClosedByBroker as exc:
            assert exc.reply_code == 404
            return False
    return True


def _publish(proc: RoostProcess, queue: str, bodies: list[bytes]) -> None:
    with _connect(proc) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))


SAC = {"x-single-active-consumer": True}


def test_consumer_counts_are_cluster_wide(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("counted", durable=True)
    first = Consumer(a, "counted")
    second = Consumer(b, "counted")
    try:
        for proc in (a, b):

            def two(proc: RoostProcess = proc) -> bool:
                return _consumer_count(proc, "counted") == 2

            _wait_for(two, 10, "two consumers")
        # An exclusive consumer is refused while another node consumes.
        with _connect(a) as ca, pytest.raises(ChannelClosedByBroker) as info:
            ca.channel().basic_consume("counted", lambda *args: None, exclusive=True)
        assert info.value.reply_code == 403
        # And delete if-unused is refused on a node with no consumer of its own.
        with _connect(a) as ca, pytest.raises(ChannelClosedByBroker) as info:
            ca.channel().queue_delete("counted", if_unused=True)
        assert info.value.reply_code == 406
        first.close()
        _wait_for(lambda: _consumer_count(b, "counted") == 1, 10, "one consumer left")
    finally:
        first.close()
        second.close()


def test_single_active_consumer_is_one_across_nodes_and_fails_over_on_close(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("sac", durable=True, arguments=SAC)
    active = Consumer(a, "sac", prefetch=100, ack=False)
    _wait_for(lambda: _consumer_count(b, "sac") == 1, 10, "the first consumer registered")
    standby = Consumer(b, "sac", prefetch=100)
    _wait_for(lambda: _consumer_count(a, "sac") == 2, 10, "the second consumer registered")
    try:
        sent = [f"m{i}".encode() for i in range(20)]
        _publish(b, "sac", sent[:10])
        _wait_for(lambda: len(active.got) == 10, 10, "deliveries to the active", [active])
        _pump([active, standby], 1.0)
        assert standby.got == []
        # The active one's connection closes with 10 unacked: the standby on
        # the other node takes over, the 10 come to it redelivered.
        active.close()
        _publish(a, "sac", sent[10:])
        _wait_for(lambda: len(standby.got) == 20, 15, "the standby taking over", [standby])
        assert standby.bodies() == set(sent)
        assert {body for body, again in standby.got if again} == set(sent[:10])
    finally:
        active.close()
        standby.close()


def test_single_active_consumer_fails_over_on_cancel_in_registration_order(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("sac-order", arguments=SAC)
    first = Consumer(b, "sac-order")
    _wait_for(lambda: _consumer_count(a, "sac-order") == 1, 10, "first registered")
    second = Consumer(a, "sac-order")
    _wait_for(lambda: _consumer_count(b, "sac-order") == 2, 10, "second registered")
    third = Consumer(b, "sac-order")
    _wait_for(lambda: _consumer_count(a, "sac-order") == 3, 10, "third registered")
    everyone = [first, second, third]
    try:
        _publish(a, "sac-order", [b"one"])
        _wait_for(lambda: len(first.got) == 1, 10, "delivery to the first", everyone)
        first.ch.basic_cancel(first.tag)
        # The next in registration order is on the other node.
        _publish(b, "sac-order", [b"two"])
        _wait_for(lambda: len(second.got) == 1, 10, "delivery to the second", everyone)
        _pump(everyone, 0.5)
        assert third.got == [] and first.got == [(b"one", False)]
        second.ch.basic_cancel(second.tag)
        _publish(a, "sac-order", [b"three"])
        _wait_for(lambda: len(third.got) == 1, 10, "delivery to the third", everyone)
        assert second.got == [(b"two", False)]
    finally:
        for c in everyone:
            c.close()


def test_single_active_consumer_fails_over_when_its_node_is_killed(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(b) as cb:
        cb.channel().queue_declare("sac-kill", durable=True, arguments=SAC)
    active = Consumer(a, "sac-kill", prefetch=50, ack=False)
    _wait_for(lambda: _consumer_count(b, "sac-kill") == 1, 10, "the first consumer registered")
    standby = Consumer(b, "sac-kill", prefetch=50)
    try:
        _wait_for(lambda: _consumer_count(b, "sac-kill") == 2, 10, "both registered")
        sent = [f"k{i}".encode() for i in range(10)]
        _publish(b, "sac-kill", sent[:5])
        _wait_for(lambda: len(active.got) == 5, 10, "deliveries on a", [active])
        assert a.proc is not None
        a.proc.kill()
        a.proc.wait()
        _publish(b, "sac-kill", sent[5:])
        # Nothing until the cluster declares a dead (the node timeout).
        _pump([standby], 1.0)
        assert standby.got == []
        _wait_for(lambda: len(standby.got) == 10, 30, "the standby taking over", [standby])
        assert standby.bodies() == set(sent)
        assert {body for body, again in standby.got if again} == set(sent[:5])
    finally:
        standby.close()


def test_single_active_consumer_fails_over_from_a_paused_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(b) as cb:
        cb.channel().queue_declare("sac-pause", durable=True, arguments=SAC)
    active = Consumer(a, "sac-pause", prefetch=50, ack=False)
    _wait_for(lambda: _consumer_count(b, "sac-pause") == 1, 10, "the first consumer registered")
    standby = Consumer(b, "sac-pause", prefetch=50)
    assert a.proc is not None
    try:
        _wait_for(lambda: _consumer_count(b, "sac-pause") == 2, 10, "both registered")
        sent = [f"p{i}".encode() for i in range(10)]
        _publish(b, "sac-pause", sent[:5])
        _wait_for(lambda: len(active.got) == 5, 10, "deliveries on a", [active])
        a.proc.send_signal(signal.SIGSTOP)
        _publish(b, "sac-pause", sent[5:])
        _wait_for(lambda: len(standby.got) == 10, 30, "the standby taking over", [standby])
        assert {body for body, again in standby.got if again} == set(sent[:5])
        # Woken, a was declared dead: it delivers nothing more.
        a.proc.send_signal(signal.SIGCONT)
        _publish(b, "sac-pause", [b"after"])
        _wait_for(lambda: len(standby.got) == 11, 15, "b still active", [standby])
        with contextlib.suppress(AMQPError):
            _pump([active], 1.0)
        assert len(active.got) == 5
    finally:
        a.proc.send_signal(signal.SIGCONT)
        active.close()
        standby.close()


def test_auto_delete_waits_for_the_last_consumer_in_the_cluster(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("ephemeral", auto_delete=True)
    on_a = Consumer(a, "ephemeral")
    on_b = Consumer(b, "ephemeral")
    try:
        _wait_for(lambda: _consumer_count(a, "ephemeral") == 2, 10, "two consumers")
        on_a.ch.basic_cancel(on_a.tag)
        _wait_for(lambda: _consumer_count(b, "ephemeral") == 1, 10, "one consumer left")
        _pump([on_b], 1.0)
        assert not on_b.cancelled
        assert _exists(a, "ephemeral") and _exists(b, "ephemeral")
        # b's consumer still gets messages published on a.
        _publish(a, "ephemeral", [b"still here"])
        _wait_for(lambda: len(on_b.got) == 1, 10, "a delivery on b", [on_b])
        on_b.ch.basic_cancel(on_b.tag)
        _wait_for(lambda: not _exists(a, "ephemeral"), 10, "the queue deleted on a")
        assert not _exists(b, "ephemeral")
    finally:
        on_a.close()
        on_b.close()


def test_auto_delete_when_the_last_consumers_on_two_nodes_go_at_once(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    for i in range(5):
        name = f"ephemeral-{i}"
        with _connect(a) as ca:
            ca.channel().queue_declare(name, auto_delete=True)
        on_a, on_b = Consumer(a, name), Consumer(b, name)

        def two(name: str = name) -> bool:
            return _consumer_count(a, name) == 2

        _wait_for(two, 10, "two consumers")
        # Both nodes' writes overlap: without taking the queue's locks in
        # turn, each would still see the other's consumer.
        on_a.close()
        on_b.close()

        def gone(name: str = name) -> bool:
            return not _exists(b, name)

        _wait_for(gone, 10, "the queue deleted")


def test_auto_delete_queue_goes_when_its_last_consumers_node_dies(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(b) as cb:
        cb.channel().queue_declare("ephemeral-kill", auto_delete=True)
    # Kept referenced: a collected consumer's connection closes, and the
    # queue would go with its last consumer before the kill.
    held = Consumer(a, "ephemeral-kill")
    _wait_for(lambda: _consumer_count(b, "ephemeral-kill") == 1, 10, "the consumer registered")
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    _wait_for(lambda: not _exists(b, "ephemeral-kill"), 30, "the queue deleted")
    del held


def test_x_expires_deletes_a_queue_unused_on_every_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("short-lived", arguments={"x-expires": 1000})
    assert _exists(b, "short-lived")
    _wait_for(lambda: not _exists(b, "short-lived"), 15, "the queue expired")
    assert not _exists(a, "short-lived")


def test_x_expires_counts_use_on_any_node(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("kept", arguments={"x-expires": 1500})
    # Read now and then on b: a's timer finds it unused there, not here.
    with _connect(b) as cb:
        ch = cb.channel()
        for _ in range(15):
            ch.basic_get("kept")
            time.sleep(0.25)
    assert _exists(a, "kept")
    # A consumer on b keeps it too, for longer than the period.
    on_b = Consumer(b, "kept")
    try:
        _pump([on_b], 3.0)
        assert not on_b.cancelled
        assert _exists(a, "kept")
        on_b.close()
        _wait_for(lambda: not _exists(a, "kept"), 15, "the queue expired once unused")
    finally:
        on_b.close()


def test_a_higher_priority_consumer_on_another_node_comes_first(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("ranked", durable=True)
    high = Consumer(a, "ranked", prefetch=5, ack=False, arguments={"x-priority": 10})
    low = Consumer(b, "ranked", prefetch=100)
    everyone = [high, low]
    try:
        _wait_for(lambda: _consumer_count(b, "ranked") == 2, 10, "both registered")
        # The high-priority consumer has room: it gets everything, though
        # the messages are published on the low one's node.
        _publish(b, "ranked", [f"h{i}".encode() for i in range(5)])
        _wait_for(lambda: len(high.got) == 5, 10, "deliveries to the high one", everyone)
        _pump(everyone, 0.5)
        assert low.got == []
        # Now it is full (prefetch 5, nothing acked): the low one gets the rest.
        rest = [f"l{i}".encode() for i in range(10)]
        _publish(b, "ranked", rest)
        _wait_for(lambda: len(low.got) == 10, 15, "deliveries to the low one", everyone)
        assert low.bodies() == set(rest) and len(high.got) == 5
    finally:
        high.close()
        low.close()


def test_a_queue_deleted_on_one_node_cancels_consumers_on_every_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    with _connect(a) as ca:
        ca.channel().queue_declare("doomed", durable=True)
    on_a, on_b = Consumer(a, "doomed"), Consumer(b, "doomed")
    try:
        _wait_for(lambda: _consumer_count(a, "doomed") == 2, 10, "both registered")
        with _connect(a) as ca:
            ca.channel().queue_delete("doomed")
        _wait_for(lambda: on_a.cancelled and on_b.cancelled, 10, "basic.cancel", [on_a, on_b])
    finally:
        on_a.close()
        on_b.close()


def test_an_exclusive_queue_takes_publishes_on_every_node(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")

    async def scenario() -> list[bytes]:
        conn = await aio_pika.connect(f"amqp://guest:guest@{b.host}:{b.port}/")
        async with conn:
            ch = await conn.channel()
            queue = await ch.declare_queue("", exclusive=True)
            # Published by a client of the other node (blocking pika, in a thread).
            await asyncio.to_thread(_publish, a, queue.name, [b"x", b"y", b"z"])
            got: list[bytes] = []
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)
                    if len(got) == 3:
                        break
            # Other nodes may route to it, but not consume from it.
            with _connect(a) as ca, pytest.raises(ChannelClosedByBroker) as info:
                ca.channel().basic_consume(queue.name, lambda *args: None)
            assert info.value.reply_code == 405
            return got

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [b"x", b"y", b"z"]
