"""Crash safety: a real ``roost serve`` killed with SIGKILL at random
moments must keep every confirmed (or committed) persistent message,
exactly once and in order, and nothing that was not published."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from roost.testing import RoostProcess
from tests.store.helpers import ConfirmingPublisher, connect, drain

SEGMENT = "65536"


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    # A small queue memory limit so long queues page messages to the log.
    p = RoostProcess(
        tmp_path / "data", "--segment-size", SEGMENT, "--queue-memory-limit", "1000000"
    )
    try:
        yield p.start()
    finally:
        p.close()
        print("".join(p.output))  # shown when a test fails


def _declare(port: int, queues: list[str], fanout: str | None = None) -> None:
    conn = connect(port)
    try:
        ch = conn.channel()
        if fanout:
            ch.exchange_declare(fanout, "fanout", durable=True)
        for q in queues:
            ch.queue_declare(q, durable=True)
            if fanout:
                ch.queue_bind(q, fanout)
    finally:
        conn.close()


def _publish_and_kill(
    proc: RoostProcess, targets: list[tuple[str, str]], prefix: str, delay: float
) -> ConfirmingPublisher:
    pub = ConfirmingPublisher(proc.port)
    timer = threading.Timer(delay, proc.kill)
    timer.start()
    try:
        pub.run(targets, prefix, count=20000, deadline=10.0)
    finally:
        timer.join()
        pub.close()
    proc.kill()  # in case publishing finished before the timer fired
    return pub


def _check(pub: ConfirmingPublisher, got: list[tuple[str, bool]], expect: list[str]) -> None:
    ids = [body for body, _ in got]
    assert len(ids) == len(set(ids)), "a message came back twice"
    missing = pub.confirmed.intersection(expect) - set(ids)
    assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:3]}"
    assert set(ids) <= set(expect), f"unknown messages: {sorted(set(ids) - set(expect))[:3]}"
    # Publish order survives too.
    order = {mid: i for i, mid in enumerate(expect)}
    assert ids == sorted(ids, key=order.__getitem__)
    assert not any(redelivered for _, redelivered in got)


def test_confirmed_messages_survive_sigkill_single_queue(proc: RoostProcess) -> None:
    rng = random.Random(1234)
    total_confirmed = 0
    for cycle in range(4):
        queue = f"crash-q{cycle}"
        _declare(proc.port, [queue])
        pub = _publish_and_kill(proc, [("", queue)], f"c{cycle}", rng.uniform(0.02, 0.2))
        proc.start()
        got = drain(proc.port, queue)
        _check(pub, got, pub.sent)
        total_confirmed += len(pub.confirmed)
    # The kills must have hit while publishing was going on, with some
    # confirms back, or the test proves nothing.
    assert total_confirmed > 0


def test_confirmed_messages_survive_sigkill_fanout(proc: RoostProcess) -> None:
    rng = random.Random(99)
    for cycle in range(3):
        queues = [f"fan{cycle}-a", f"fan{cycle}-b"]
        _declare(proc.port, queues, fanout=f"fx{cycle}")
        pub = _publish_and_kill(proc, [(f"fx{cycle}", "")], f"f{cycle}", rng.uniform(0.02, 0.2))
        proc.start()
        for q in queues:
            _check(pub, drain(proc.port, q), pub.sent)


def test_confirmed_messages_survive_sigkill_mixed_routes(proc: RoostProcess) -> None:
    """Messages alternate between a direct route to one queue and a fanout
    to two; each queue holds exactly its confirmed share."""
    rng = random.Random(7)
    for cycle in range(2):
        qa, qb, qc = f"mix{cycle}-a", f"mix{cycle}-b", f"mix{cycle}-c"
        _declare(proc.port, [qb, qc], fanout=f"mfx{cycle}")
        _declare(proc.port, [qa])
        targets = [("", qa), (f"mfx{cycle}", "")]
        pub = _publish_and_kill(proc, targets, f"m{cycle}", rng.uniform(0.05, 0.3))
        proc.start()
        to_a = pub.sent[0::2]
        to_fan = pub.sent[1::2]
        _check(pub, drain(proc.port, qa), to_a)
        _check(pub, drain(proc.port, qb), to_fan)
        _check(pub, drain(proc.port, qc), to_fan)


def _confirmed_publish(
    ch: pika.adapters.blocking_connection.BlockingChannel, q: str, body: str
) -> None:
    ch.basic_publish("", q, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)


def test_acks_and_deliveries_survive_sigkill(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("acks", durable=True)
    ch.queue_declare("barrier", durable=True)
    ch.confirm_delivery()
    for i in range(30):
        _confirmed_publish(ch, "acks", f"m{i}")
    # Take 20 with basic.get, ack the even ones among them.
    tags = []
    for i in range(20):
        method, _, body = ch.basic_get("acks", auto_ack=False)
        assert method is not None and body == f"m{i}".encode()
        tags.append(method.delivery_tag)
    for i in range(0, 20, 2):
        ch.basic_ack(tags[i])
    # A confirmed persistent publish after the acks: the store commits in
    # order, so once it is confirmed the acks and deliveries are on disk.
    _confirmed_publish(ch, "barrier", "barrier")
    proc.kill()
    proc.start()
    got = drain(proc.port, "acks")
    expected = [(f"m{i}", True) for i in range(1, 20, 2)] + [
        (f"m{i}", False) for i in range(20, 30)
    ]
    assert got == expected
    assert drain(proc.port, "barrier") == [("barrier", False)]


def test_consumer_acks_in_transaction_survive_sigkill(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("txacks", durable=True)
    ch.confirm_delivery()
    for i in range(20):
        _confirmed_publish(ch, "txacks", f"m{i}")
    cch = conn.channel()
    cch.tx_select()
    cch.basic_qos(prefetch_count=8)
    received: list[tuple[int, bytes]] = []
    for method, _, body in cch.consume("txacks", inactivity_timeout=5):
        assert method is not None
        received.append((method.delivery_tag, body))
        if len(received) == 8:
            break
    assert [b for _, b in received] == [f"m{i}".encode() for i in range(8)]
    cch.basic_ack(received[4][0], multiple=True)  # m0..m4
    cch.tx_commit()  # commit-ok comes once the acks are on disk
    proc.kill()
    proc.start()
    got = drain(proc.port, "txacks")
    # m5..m7 were delivered and not acked; acking m0..m4 freed credit, so
    # m8..m12 may have gone out before the kill too; m13.. never did.
    assert [body for body, _ in got] == [f"m{i}" for i in range(5, 20)]
    assert all(redelivered for _, redelivered in got[:3])
    assert not any(redelivered for _, redelivered in got[8:])


def test_transient_and_non_durable_things_are_gone_after_sigkill(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("dq", durable=True)
    ch.queue_declare("tq", durable=False)
    ch.exchange_declare("tex", "fanout", durable=False)
    ch.exchange_declare("dex", "fanout", durable=True)
    ch.queue_bind("tq", "dex")  # durable exchange, non-durable queue
    ch.queue_bind("dq", "tex")
    persistent = pika.BasicProperties(delivery_mode=2)
    transient = pika.BasicProperties(delivery_mode=1)
    # More than a queue keeps in memory (--queue-memory-limit), so transient
    # messages get paged to the log too; they must not come back either.
    for i in range(9000):
        props = persistent if i % 1000 == 0 else transient
        ch.basic_publish("", "dq", f"d{i}".encode(), props)
    ch.basic_publish("", "tq", b"tq-persistent", persistent)
    ch.basic_publish("dex", "", b"via-dex", persistent)
    ch.confirm_delivery()
    _confirmed_publish(ch, "dq", "last")
    proc.kill()
    proc.start()
    got = drain(proc.port, "dq")
    assert got == [(f"d{i}", False) for i in range(0, 9000, 1000)] + [("last", False)]
    conn = connect(proc.port)
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.queue_declare("tq", passive=True)
        assert exc.value.reply_code == 404
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.exchange_declare("tex", passive=True)
        assert exc.value.reply_code == 404
        ch = conn.channel()
        ch.exchange_declare("dex", passive=True)
        # dq's binding to the gone exchange is gone too; dex has no queue.
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("dex", "", b"x", mandatory=True)
    finally:
        conn.close()


def test_committed_transaction_survives_sigkill(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("txq", durable=True)
    ch.tx_select()
    persistent = pika.BasicProperties(delivery_mode=2)
    for i in range(200):
        ch.basic_publish("", "txq", f"t{i}".encode(), persistent)
    ch.tx_commit()
    # Uncommitted publishes were never routed: a crash discards them.
    for i in range(200, 220):
        ch.basic_publish("", "txq", f"t{i}".encode(), persistent)
    conn.channel()  # a round trip, so the uncommitted publishes reached the broker
    proc.kill()
    proc.start()
    assert drain(proc.port, "txq") == [(f"t{i}", False) for i in range(200)]


def test_order_preserved_across_segments_after_sigkill(proc: RoostProcess) -> None:
    """3000 messages span several 64 KiB segments; with every third of the
    first 600 acked, the rest comes back in publish order."""
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("ordered", durable=True)
    ch.queue_declare("other", durable=True)
    pub = ConfirmingPublisher(proc.port)
    try:
        pub.run([("", "ordered"), ("", "other")], "o", count=6000)
    finally:
        pub.close()
    assert len(pub.confirmed) == 6000
    segments = list((proc.data_dir / "messages").glob("*.seg"))
    assert len(segments) > 3
    tags = []
    for _ in range(600):
        method, _, _ = ch.basic_get("ordered", auto_ack=False)
        assert method is not None
        tags.append(method.delivery_tag)
    for tag in tags[::3]:
        ch.basic_ack(tag)
    ch.confirm_delivery()
    _confirmed_publish(ch, "other", "barrier")
    proc.kill()
    proc.start()
    ordered = [f"o-{i}" for i in range(0, 6000, 2)]
    acked = set(ordered[:600:3])
    expected = [(m, i < 600) for i, m in enumerate(ordered) if m not in acked]
    assert drain(proc.port, "ordered") == expected
    assert drain(proc.port, "other") == [(f"o-{i}", False) for i in range(1, 6000, 2)] + [
        ("barrier", False)
    ]
