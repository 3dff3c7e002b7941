"""Dead-lettering: reasons, the x-death header, cycles, durability.

Header shapes are RabbitMQ 3.10's (checked against a real broker); roost
also writes x-last-death-* as RabbitMQ 3.13+ does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aio_pika
import pika
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker, RoostProcess
from tests.e2e.queue_features.helpers import count, dlq_setup, drain, get, unique, wait_until


def test_reject_without_requeue_dead_letters(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("src")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"bad", pika.BasicProperties(headers={"keep": "me"}, priority=3))
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    dm, p, body = get(ch, dlq)
    assert body == b"bad"
    assert (dm.exchange, dm.routing_key, dm.redelivered) == (dlx, q, False)
    assert p.priority == 3
    assert p.headers["keep"] == "me"
    (death,) = p.headers["x-death"]
    assert {k: death[k] for k in ("count", "reason", "queue", "exchange", "routing-keys")} == {
        "count": 1,
        "reason": "rejected",
        "queue": q,
        "exchange": "",
        "routing-keys": [q],
    }
    assert p.headers["x-first-death-reason"] == "rejected"
    assert p.headers["x-first-death-queue"] == q
    assert p.headers["x-first-death-exchange"] == ""
    # roost writes these as RabbitMQ 3.13+ does (3.10 does not).
    assert p.headers["x-last-death-reason"] == "rejected"
    assert p.headers["x-last-death-queue"] == q
    assert count(ch, q) == 0


def test_nack_multiple_without_requeue_dead_letters_all(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("src")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    for i in range(3):
        ch.basic_publish("", q, b"%d" % i)
    tags = [get(ch, q, auto_ack=False)[0].delivery_tag for _ in range(3)]
    ch.basic_nack(tags[-1], multiple=True, requeue=False)
    assert wait_until(lambda: count(ch, dlq) == 3)
    assert drain(ch, dlq) == [b"0", b"1", b"2"]


def test_reject_with_requeue_does_not_dead_letter(ch: BlockingChannel) -> None:
    dlx, dlq = dlq_setup(ch)
    q = unique("src")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"again")
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=True)
    m2, _, body = get(ch, q)
    assert (body, m2.redelivered) == (b"again", True)
    assert count(ch, dlq) == 0


def test_dead_letter_routing_key_replaces_the_key(ch: BlockingChannel) -> None:
    dlx = unique("dlx")
    ch.exchange_declare(dlx, "direct", auto_delete=True)
    dlq = ch.queue_declare(unique("dlq"), exclusive=True).method.queue
    ch.queue_bind(dlq, dlx, "parking")
    q = unique("src")
    ch.queue_declare(
        q,
        exclusive=True,
        arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "parking"},
    )
    ch.basic_publish("", q, b"p", pika.BasicProperties(headers={"CC": ["other"]}))
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_nack(m.delivery_tag, requeue=False)
    dm, p, body = get(ch, dlq)
    assert (body, dm.routing_key) == (b"p", "parking")
    # x-death still records the original routing keys, CC included.
    assert p.headers["x-death"][0]["routing-keys"] == [q, "other"]


def test_cc_keys_route_the_dead_letter(ch: BlockingChannel) -> None:
    dlx = unique("dlx")
    ch.exchange_declare(dlx, "direct", auto_delete=True)
    dlq = ch.queue_declare(unique("dlq"), exclusive=True).method.queue
    ch.queue_bind(dlq, dlx, "cc-key")
    q = unique("src")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", q, b"c", pika.BasicProperties(headers={"CC": ["cc-key"]}))
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    dm, p, body = get(ch, dlq)
    assert body == b"c"
    assert dm.routing_key == q
    assert p.headers["x-death"][0]["routing-keys"] == [q, "cc-key"]
    assert p.headers["CC"] == ["cc-key"]


def test_missing_dlx_drops_the_message(conn: pika.BlockingConnection, ch: BlockingChannel) -> None:
    q = unique("src")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": unique("nowhere")})
    ch.basic_publish("", q, b"lost")
    m, _, _ = get(ch, q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    assert count(ch, q) == 0
    assert conn.is_open and ch.is_open


def test_rejection_cycle_keeps_going_and_counts(ch: BlockingChannel) -> None:
    ex = unique("ex")
    ch.exchange_declare(ex, "direct", auto_delete=True)
    q = unique("self")
    ch.queue_declare(q, exclusive=True, arguments={"x-dead-letter-exchange": ex})
    ch.queue_bind(q, ex, q)
    ch.basic_publish("", q, b"r")
    seen: list[tuple[str, Any]] = []
    for _ in range(3):
        m, p, _ = get(ch, q, auto_ack=False)
        seen.append((m.exchange, (p.headers or {}).get("x-death")))
        ch.basic_reject(m.delivery_tag, requeue=False)
    assert seen[0] == ("", None)
    for n, (exchange, deaths) in enumerate(seen[1:], start=1):
        assert exchange == ex
        (death,) = deaths  # the same queue and reason: one entry, counted
        assert (death["count"], death["reason"], death["queue"]) == (n, "rejected", q)
        # The entry keeps the first death's exchange and routing keys.
        assert (death["exchange"], death["routing-keys"]) == ("", [q])
    assert wait_until(lambda: count(ch, q) == 1)


def test_ttl_cycle_is_dropped(ch: BlockingChannel) -> None:
    ex = unique("ex")
    ch.exchange_declare(ex, "direct", auto_delete=True)
    q = unique("loop")
    ch.queue_declare(
        q, exclusive=True, arguments={"x-message-ttl": 20, "x-dead-letter-exchange": ex}
    )
    ch.queue_bind(q, ex, q)
    watcher = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(watcher, ex, q)  # sees what the DLX routes
    ch.basic_publish("", q, b"t")
    # Dead-lettered once: the watcher gets it, the queue itself does not
    # (it is already in x-death with no rejection since: a cycle).
    _, p, body = get(ch, watcher)
    assert body == b"t"
    assert p.headers["x-death"][0]["reason"] == "expired"
    time.sleep(0.2)  # let any (wrong) second round happen
    assert count(ch, q) == 0
    assert count(ch, watcher) == 0


def test_cycle_through_a_rejection_keeps_going(ch: BlockingChannel) -> None:
    ex = unique("ex")
    ch.exchange_declare(ex, "direct", auto_delete=True)
    ttl_q, reject_q = unique("ttlq"), unique("rejq")
    ch.queue_declare(
        ttl_q,
        exclusive=True,
        arguments={
            "x-message-ttl": 20,
            "x-dead-letter-exchange": ex,
            "x-dead-letter-routing-key": reject_q,
        },
    )
    ch.queue_declare(
        reject_q,
        exclusive=True,
        arguments={"x-dead-letter-exchange": ex, "x-dead-letter-routing-key": ttl_q},
    )
    ch.queue_bind(ttl_q, ex, ttl_q)
    ch.queue_bind(reject_q, ex, reject_q)
    ch.basic_publish("", ttl_q, b"c")
    m, p, _ = get(ch, reject_q, auto_ack=False)
    assert [(d["queue"], d["reason"], d["count"]) for d in p.headers["x-death"]] == [
        (ttl_q, "expired", 1)
    ]
    ch.basic_reject(m.delivery_tag, requeue=False)
    m, p, _ = get(ch, reject_q, auto_ack=False)
    # Most recent first, as RabbitMQ orders them.
    assert [(d["queue"], d["reason"], d["count"]) for d in p.headers["x-death"]] == [
        (ttl_q, "expired", 2),
        (reject_q, "rejected", 1),
    ]
    assert p.headers["x-first-death-queue"] == ttl_q
    assert p.headers["x-first-death-reason"] == "expired"
    assert p.headers["x-last-death-queue"] == ttl_q
    ch.basic_ack(m.delivery_tag)


async def test_reject_dead_letters_aio_pika(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel()
        dlq = await ch.declare_queue(exclusive=True)
        q = await ch.declare_queue(
            exclusive=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq.name},
        )
        await ch.default_exchange.publish(aio_pika.Message(b"aio"), routing_key=q.name)
        msg = await q.get()
        await msg.reject(requeue=False)
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            got = await dlq.get(no_ack=True, fail=False)
        assert got is not None and got.body == b"aio"
        assert got.routing_key == dlq.name
        deaths = got.headers["x-death"]
        assert isinstance(deaths, list)
        assert isinstance(deaths[0], dict)
        assert deaths[0]["reason"] == "rejected"


def test_dead_lettered_persistent_message_survives_sigkill(tmp_path: Path) -> None:
    proc = RoostProcess(tmp_path / "data")
    try:
        proc.start()
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        ch.exchange_declare("dlx", "fanout", durable=True)
        ch.queue_declare("dlq", durable=True)
        ch.queue_bind("dlq", "dlx")
        ch.queue_declare("work", durable=True, arguments={"x-dead-letter-exchange": "dlx"})
        ch.confirm_delivery()
        ch.basic_publish("", "work", b"poison", pika.BasicProperties(delivery_mode=2))
        ch.basic_publish("", "work", b"fine", pika.BasicProperties(delivery_mode=2))
        m, _, _ = get(ch, "work", auto_ack=False)
        ch.basic_reject(m.delivery_tag, requeue=False)
        assert wait_until(lambda: count(ch, "dlq") == 1)
        # A confirmed publish after the reject: its fsync covers the
        # dead-lettered copy and the settlement written before it.
        ch.basic_publish("", "work", b"later", pika.BasicProperties(delivery_mode=2))
        c.close()
        proc.kill()
        proc.start()
        c = pika.BlockingConnection(pika.URLParameters(proc.url))
        ch = c.channel()
        assert drain(ch, "work") == [b"fine", b"later"]  # "poison" does not come back
        _dm, p, body = get(ch, "dlq")
        assert body == b"poison"
        assert p.delivery_mode == 2
        assert p.headers["x-death"][0]["reason"] == "rejected"
        c.close()
    finally:
        proc.close()
