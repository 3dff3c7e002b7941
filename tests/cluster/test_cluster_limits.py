"""x-max-length and x-max-length-bytes with every overflow mode, exact
across the nodes of a cluster: publishers on two ``roost serve --cluster``
processes fill one limited queue at once, with confirms (aio-pika, many
publishes in flight, so batches hold many rows of the queue), and the
counts come out as RabbitMQ's quorum queues give them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import DeliveryError

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
        print("".join(proc.output[-40:]))  # shown when the test failed


def _url(proc: RoostProcess) -> str:
    return f"amqp://guest:guest@{proc.host}:{proc.port}/"


async def _declare(proc: RoostProcess, name: str, **arguments: Any) -> None:
    conn = await aio_pika.connect(_url(proc))
    async with conn:
        ch = await conn.channel()
        if arguments.get("x-dead-letter-exchange") == "":
            await ch.declare_queue(f"{name}.dlq", durable=True)
        await ch.declare_queue(name, durable=True, arguments=arguments)


async def _publish(
    proc: RoostProcess, queue: str, bodies: list[bytes], persistent: bool = True
) -> tuple[list[bytes], list[bytes]]:
    """Publish all of ``bodies`` at once with confirms; returns (acked, nacked)."""
    conn = await aio_pika.connect(_url(proc))
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        mode = aio_pika.DeliveryMode.PERSISTENT if persistent else None
        results = await asyncio.gather(
            *(
                ch.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=mode), queue, timeout=60
                )
                for body in bodies
            ),
            return_exceptions=True,
        )
    acked, nacked = [], []
    for body, result in zip(bodies, results, strict=True):
        if isinstance(result, DeliveryError):
            nacked.append(body)
        elif isinstance(result, BaseException):
            raise result
        else:
            acked.append(body)
    return acked, nacked


async def _both(
    a: RoostProcess, b: RoostProcess, queue: str, n: int, size: int = 0, **kw: Any
) -> tuple[list[bytes], list[bytes]]:
    """``n`` publishes from a node each, at the same time."""

    def bodies(prefix: str) -> list[bytes]:
        return [f"{prefix}{i:05}".encode().ljust(size, b".") for i in range(n)]

    (acked_a, nacked_a), (acked_b, nacked_b) = await asyncio.gather(
        _publish(a, queue, bodies("a"), **kw), _publish(b, queue, bodies("b"), **kw)
    )
    return acked_a + acked_b, nacked_a + nacked_b


async def _count(proc: RoostProcess, queue: str) -> int:
    conn = await aio_pika.connect(_url(proc))
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        n = q.declaration_result.message_count
        assert n is not None
        return n


async def _settles_at(proc: RoostProcess, queue: str, n: int) -> None:
    """The node's message count reaches ``n`` (a node learns of another's
    commits within a second) and stays there."""
    for _ in range(600):
        if await _count(proc, queue) == n:
            break
        await asyncio.sleep(0.05)
    assert await _count(proc, queue) == n


async def _take(
    proc: RoostProcess, queue: str, n: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """``n`` messages of the queue by basic.get, acked (a get may come up
    empty while a batch holds the head locked), and then no more."""
    conn = await aio_pika.connect(_url(proc))
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        for _ in range(600):
            if len(got) == n:
                break
            m = await q.get(fail=False, timeout=30)
            if m is None:
                await asyncio.sleep(0.05)
                continue
            await m.ack()
            got.append(m)
        assert len(got) == n
        assert await q.get(fail=False, timeout=30) is None
    return got


def _bodies(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[bytes]:
    return [m.body for m in messages]


async def test_reject_publish_accepts_exactly_the_limit_from_two_nodes(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    await _declare(a, "lim", **{"x-max-length": 50, "x-overflow": "reject-publish"})
    acked, nacked = await _both(a, b, "lim", 200)
    assert len(acked) == 50
    assert len(nacked) == 350
    await _settles_at(a, "lim", 50)
    await _settles_at(b, "lim", 50)
    assert sorted(_bodies(await _take(b, "lim", 50))) == sorted(acked)
    # Consumed: room again, for exactly as many.
    acked, nacked = await _both(a, b, "lim", 40)
    assert (len(acked), len(nacked)) == (50, 30)


async def test_reject_publish_dlx_nacks_and_dead_letters_what_is_refused(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    await _declare(
        a,
        "rdlx",
        **{
            "x-max-length": 30,
            "x-overflow": "reject-publish-dlx",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "rdlx.dlq",
        },
    )
    acked, nacked = await _both(a, b, "rdlx", 100)
    assert (len(acked), len(nacked)) == (30, 170)
    assert sorted(_bodies(await _take(a, "rdlx", 30))) == sorted(acked)
    dead = await _take(b, "rdlx.dlq", 170)
    assert sorted(_bodies(dead)) == sorted(nacked)
    deaths: Any = dead[0].headers["x-death"]
    death = deaths[0]
    assert death["reason"] == "maxlen" and death["queue"] == "rdlx"


async def test_drop_head_keeps_the_newest_and_dead_letters_the_rest(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    await _declare(
        a,
        "dh",
        **{
            "x-max-length": 40,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dh.dlq",
        },
    )
    acked, nacked = await _both(a, b, "dh", 150)
    assert (len(acked), len(nacked)) == (300, 0)  # drop-head refuses nothing
    await _settles_at(b, "dh", 40)
    kept = _bodies(await _take(b, "dh", 40))
    dead = _bodies(await _take(a, "dh.dlq", 260))
    assert sorted(kept + dead) == sorted(acked)  # each exactly once
    # Each node's publishes are kept in order: the newest of each survive.
    for prefix in (b"a", b"b"):
        mine = [k for k in kept if k.startswith(prefix)]
        assert mine == sorted(mine)
        if mine:
            assert mine[-1] == prefix + b"00149"


async def test_drop_head_without_dead_letter_exchange(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    await _declare(a, "dh0", **{"x-max-length": 25})
    acked, nacked = await _both(a, b, "dh0", 100, persistent=False)
    assert (len(acked), len(nacked)) == (200, 0)
    # Transient publishes are confirmed before their batch commits; a
    # persistent one from each node is confirmed after every earlier batch
    # of its node committed (each node's writer commits in order).
    for proc, fence in ((a, b"fence-a"), (b, b"fence-b")):
        assert (await _publish(proc, "dh0", [fence]))[0] == [fence]
    await _settles_at(a, "dh0", 25)
    kept = _bodies(await _take(b, "dh0", 25))
    assert b"fence-a" in kept and b"fence-b" in kept


async def test_max_length_bytes_reject_publish(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    await _declare(a, "bytes", **{"x-max-length-bytes": 10 * 100, "x-overflow": "reject-publish"})
    acked, nacked = await _both(a, b, "bytes", 50, size=100)
    assert (len(acked), len(nacked)) == (10, 90)
    await _settles_at(b, "bytes", 10)


async def test_max_length_bytes_drop_head(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    await _declare(
        a,
        "bdh",
        **{
            "x-max-length-bytes": 2000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "bdh.dlq",
        },
    )
    acked, _ = await _both(a, b, "bdh", 60, size=100)
    assert len(acked) == 120
    # A message larger than the limit can never fit: dead-lettered at once.
    big, _ = await _publish(a, "bdh", [b"x" * 3000])
    assert big == [b"x" * 3000]
    kept = _bodies(await _take(b, "bdh", 20))
    dead = _bodies(await _take(a, "bdh.dlq", len(acked) + 1 - 20))
    assert sorted(kept + dead) == sorted(acked + big)


async def test_consumers_on_another_node_make_room(node: Callable[[str], RoostProcess]) -> None:
    """Claims lower the count: a queue kept full by publishers on one node
    and drained by a consumer on another accepts everything it can hold."""
    a, b = node("a"), node("b")
    await _declare(a, "flow", **{"x-max-length": 20, "x-overflow": "reject-publish"})
    conn = await aio_pika.connect(_url(b))
    got: list[bytes] = []
    async with conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=10)
        q = await ch.declare_queue("flow", passive=True)

        async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(m.body)
            await m.ack()

        await q.consume(on_message)
        accepted: list[bytes] = []
        for round_ in range(10):
            acked, _ = await _publish(a, "flow", [f"r{round_}-{i}".encode() for i in range(20)])
            accepted += acked
            for _ in range(600):
                if len(got) == len(accepted):
                    break
                await asyncio.sleep(0.05)
        assert len(accepted) > 20  # the consumer made room, round after round
        assert sorted(got) == sorted(accepted)


async def _hold(proc: RoostProcess, queue: str, n: int) -> aio_pika.abc.AbstractConnection:
    """A consumer that takes ``n`` messages and acks none; returns its
    connection (close it to requeue them)."""
    conn = await aio_pika.connect(_url(proc))
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=n)
    q = await ch.declare_queue(queue, passive=True)
    got: list[bytes] = []

    async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        got.append(m.body)

    await q.consume(on_message)
    for _ in range(600):
        if len(got) == n:
            break
        await asyncio.sleep(0.05)
    assert len(got) == n
    return conn


async def test_requeued_released_and_purged_rows_are_counted(
    node: Callable[[str], RoostProcess],
) -> None:
    """Only ready messages count, as in RabbitMQ: delivered ones make room,
    and count again once they are back (requeued by a closed connection,
    released from a dead node), over the limit if need be; a purge empties."""
    a, b = node("a"), node("b")
    await _declare(a, "back", **{"x-max-length": 20, "x-overflow": "reject-publish"})
    acked, _ = await _publish(a, "back", [f"m{i}".encode() for i in range(20)])
    assert len(acked) == 20
    held = await _hold(b, "back", 10)
    acked, nacked = await _publish(a, "back", [f"n{i}".encode() for i in range(15)])
    assert (len(acked), len(nacked)) == (10, 5)
    await held.close()  # requeued: 30 ready, over the limit
    await _settles_at(a, "back", 30)
    acked, nacked = await _publish(a, "back", [b"x", b"y"])
    assert (len(acked), len(nacked)) == (0, 2)
    await _hold(b, "back", 12)
    await _settles_at(a, "back", 18)
    b.kill()  # released by the cluster after the node timeout
    await _settles_at(a, "back", 30)
    acked, nacked = await _publish(a, "back", [b"z"])
    assert (len(acked), len(nacked)) == (0, 1)
    conn = await aio_pika.connect(_url(a))
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue("back", passive=True)
        assert await q.purge() is not None
    await _settles_at(a, "back", 0)
    acked, nacked = await _publish(a, "back", [f"p{i}".encode() for i in range(25)])
    assert (len(acked), len(nacked)) == (20, 5)


async def test_a_duplicate_takes_no_room_in_a_limited_queue(
    node: Callable[[str], RoostProcess],
) -> None:
    """A publish the limit accepts and deduplication then drops (its key
    was seen, on another node) must not count: the next ones still fit."""
    a, b = node("a"), node("b")
    await _declare(
        a,
        "lim-dedup",
        **{"x-max-length": 3, "x-overflow": "reject-publish", "x-message-deduplication": True},
    )
    outcomes: list[bool] = []
    for proc, key in ((a, "k1"), (b, "k1"), (a, "k1"), (b, "k2"), (a, "k3"), (b, "k4")):
        conn = await aio_pika.connect(_url(proc))
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            message = aio_pika.Message(
                key.encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"x-deduplication-header": key},
            )
            try:
                await ch.default_exchange.publish(message, "lim-dedup", timeout=60)
                outcomes.append(True)
            except DeliveryError:
                outcomes.append(False)
    # Duplicates are confirmed (and dropped), as on a single node; k4 is
    # the fourth message and is refused.
    assert outcomes == [True, True, True, True, True, False]
    await _settles_at(b, "lim-dedup", 3)
    assert sorted(_bodies(await _take(b, "lim-dedup", 3))) == [b"k1", b"k2", b"k3"]
