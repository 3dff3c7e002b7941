"""Delayed messages and deduplication through a two-node cluster.

    python scripts/cluster_delay_bench.py --messages 20000 --delay 3000

Starts a throwaway PostgreSQL and two ``roost serve --cluster`` nodes,
publishes persistent messages with confirms (``--inflight`` in flight) on
node a, and consumes them (acks, prefetch 500) on node b:

- ``delayed``: through an ``x-delayed-message`` exchange, every message
  with ``x-delay`` = ``--delay``: publish rate (held rows committed and
  confirmed), then how late the last one arrived after it was due, and
  the rate at which node b received them once due;
- ``dedup``: into a queue with ``x-message-deduplication``, every
  message-id unique, then each published again (all duplicates): publish
  rates, and that exactly ``--messages`` arrive;
- ``plain``: the same into a plain queue, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import aio_pika

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess


async def publish(url: str, exchange: str, key: str, n: int, inflight: int, **props: Any) -> float:
    conn = await aio_pika.connect(url)
    ch = await conn.channel(publisher_confirms=True)
    ex = await ch.get_exchange(exchange) if exchange else ch.default_exchange
    sem = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with sem:
            message = aio_pika.Message(
                b"x" * 64,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=f"m{i}",
                **props,
            )
            await ex.publish(message, key, mandatory=False)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.monotonic() - started
    await conn.close()
    return elapsed


async def consume(url: str, queue: str, n: int, timeout: float) -> list[float]:
    """Arrival times of ``n`` messages (or of what came before timeout)."""
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=500)
    q = await ch.get_queue(queue)
    times: list[float] = []
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        times.append(time.monotonic())
        await message.ack()
        if len(times) >= n:
            done.set()

    await q.consume(on_message)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout)
    await asyncio.sleep(0.5)  # anything beyond n would show
    await conn.close()
    return times


async def run(args: argparse.Namespace, a_url: str, b_url: str) -> None:
    conn = await aio_pika.connect(a_url)
    ch = await conn.channel()
    ex = await ch.declare_exchange(
        "delayed", "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"}
    )
    for name, arguments in (
        ("delayed-q", {}),
        ("dedup-q", {"x-message-deduplication": True, "x-cache-size": args.messages * 2}),
        ("plain-q", {}),
    ):
        await ch.declare_queue(name, durable=True, arguments=arguments)
    q = await ch.get_queue("delayed-q")
    await q.bind(ex, "k")
    await conn.close()
    n = args.messages

    consumer = asyncio.create_task(consume(b_url, "delayed-q", n, args.delay / 1000 + 120))
    await asyncio.sleep(0.5)
    elapsed = await publish(
        a_url, "delayed", "k", n, args.inflight, headers={"x-delay": args.delay}
    )
    last_due = time.monotonic() + args.delay / 1000  # the last was confirmed just now
    print(f"delayed: published {n} in {elapsed:.2f}s = {n / elapsed:,.0f} msg/s")
    times = await consumer
    if times:
        span = times[-1] - times[0]
        print(
            f"delayed: received {len(times)}; last {times[-1] - last_due:+.2f}s after its due"
            f" time; {len(times) / max(span, 1e-6):,.0f} msg/s routed and consumed"
        )

    for name in ("plain-q", "dedup-q"):
        elapsed = await publish(a_url, "", name, n, args.inflight)
        print(f"{name}: published {n} in {elapsed:.2f}s = {n / elapsed:,.0f} msg/s")
    elapsed = await publish(b_url, "", "dedup-q", n, args.inflight)
    print(
        f"dedup-q: the same {n} again on node b (all duplicates) in {elapsed:.2f}s"
        f" = {n / elapsed:,.0f} msg/s"
    )
    times = await consume(b_url, "dedup-q", n, 60)
    print(f"dedup-q: {len(times)} arrived (expected {n})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--delay", type=int, default=3000, help="x-delay, ms")
    ap.add_argument("--inflight", type=int, default=1000)
    args = ap.parse_args(argv)
    with ThrowawayPostgres() as pg:
        nodes = [
            RoostProcess(None, "--cluster", pg.url, "--node-name", name).start()
            for name in ("a", "b")
        ]
        try:
            a, b = (f"amqp://guest:guest@{p.host}:{p.port}/" for p in nodes)
            asyncio.run(run(args, a, b))
        finally:
            for p in nodes:
                p.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
