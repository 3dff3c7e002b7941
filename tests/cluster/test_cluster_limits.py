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


async def _take_all(proc: RoostProcess, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message of the queue, by basic.get, acked."""
    conn = await aio_pika.connect(_url(proc))
    got = []
    async with conn:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        while (m := await q.get(fail=False, timeout=30)) is not None:
            await m.ack()
            got.append(m)
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
    assert await _count(a, "lim") == 50
    assert await _count(b, "lim") == 50
    assert sorted(_bodies(await _take_all(b, "lim"))) == sorted(acked)
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
    assert sorted(_bodies(await _take_all(a, "rdlx"))) == sorted(acked)
    dead = await _take_all(b, "rdlx.dlq")
    assert sorted(_bodies(dead)) == sorted(nacked)
    death = dead[0].headers["x-death"][0]  # type: ignore[index]
    assert death["reason"] == "maxlen" and death["queue"] == "rdlx"  # type: ignore[index]


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
    assert await _count(b, "dh") == 40
    kept = _bodies(await _take_all(b, "dh"))
    dead = _bodies(await _take_all(a, "dh.dlq"))
    assert len(kept) == 40 and len(dead) == 260
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
    # Transient messages are confirmed before their batch commits.
    for _ in range(600):
        if await _count(a, "dh0") == 25:
            break
        await asyncio.sleep(0.05)
    assert len(await _take_all(b, "dh0")) == 25


async def test_max_length_bytes_reject_publish(node: Callable[[str], RoostProcess]) -> None:
    a, b = node("a"), node("b")
    await _declare(a, "bytes", **{"x-max-length-bytes": 10 * 100, "x-overflow": "reject-publish"})
    acked, nacked = await _both(a, b, "bytes", 50, size=100)
    assert (len(acked), len(nacked)) == (10, 90)
    assert await _count(b, "bytes") == 10


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
    kept = await _take_all(b, "bdh")
    dead = await _take_all(a, "bdh.dlq")
    assert len(kept) == 20
    assert sorted(_bodies(kept) + _bodies(dead)) == sorted(acked + big)


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
