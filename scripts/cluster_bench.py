"""Throughput of the cluster message path against a real PostgreSQL.

    python scripts/cluster_bench.py                 # a throwaway server
    python scripts/cluster_bench.py --url postgresql://...   # an existing, empty database

Measurements:

- **publish**: ``--submitters`` concurrent publishers, each keeping
  ``--window`` rows in flight (a confirm-mode client with that many
  unconfirmed publishes), through one node's group-commit writer.
  Reports rows/s and rows per transaction.
- **consume**: ``--consumers`` concurrent consumers on the same queue, each
  claiming ``--claim`` rows at a time and settling (acking) them through
  the writer, until the queue is empty. Reports rows/s.
- **queue path** (``--queue-path``): the broker's own path minus AMQP:
  ``VirtualHost.publish`` into a queue backed by ``PgBackingQueue``,
  confirms through the Journal gate, a consumer on the same node with
  ``--prefetch`` acking everything.

PostgreSQL runs with its defaults (fsync on, synchronous_commit on), so a
confirmed row is on disk. Figures drift on shared machines: compare runs
made in the same sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator

import psycopg

from roost.broker.consumer import Consumer
from roost.broker.message import Message, QueueEntry
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.cluster import schema
from roost.cluster.claims import Claimer
from roost.cluster.devdb import ThrowawayPostgres
from roost.cluster.message_writer import MessageRow, MessageWriter
from roost.cluster.node_messages import NodeMessages
from roost.cluster.pg_backing import attach

PROPS = b"\x10\x00\x02"  # delivery-mode 2


def prepare(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        schema.migrate(conn)
        conn.execute("INSERT INTO roost_vhosts (name) VALUES ('/') ON CONFLICT DO NOTHING")
        node = conn.execute("INSERT INTO roost_nodes (name) VALUES ('bench') RETURNING epoch")
        epoch = node.fetchone()
        queue = conn.execute(
            "INSERT INTO roost_queues (vhost, name, durable, auto_delete)"
            " VALUES ('/', 'bench-' || md5(random()::text), true, false) RETURNING id"
        ).fetchone()
        assert epoch is not None and queue is not None
        return int(epoch[0]), int(queue[0])


async def publish(url: str, queue_id: int, args: argparse.Namespace) -> int:
    writer = MessageWriter(url, connections=args.writer_connections)
    await writer.start()
    body = b"x" * args.body_size
    done = 0
    stop = time.monotonic() + args.seconds

    async def submitter() -> None:
        nonlocal done
        while time.monotonic() < stop:
            futures = [
                writer.submit([MessageRow(queue_id, "", "bench", PROPS, body)])
                for _ in range(args.window)
            ]
            await asyncio.gather(*futures)
            done += args.window

    await writer.submit([MessageRow(queue_id, "", "warm-up", PROPS, body)])
    tx0 = writer.transactions
    t0 = time.monotonic()
    await asyncio.gather(*(submitter() for _ in range(args.submitters)))
    elapsed = time.monotonic() - t0
    tx = writer.transactions - tx0
    await writer.close()
    print(
        f"publish: {args.submitters} submitters x window {args.window},"
        f" {args.body_size} B bodies, {args.writer_connections} writer connection(s):"
        f" {done / elapsed:,.0f} rows/s confirmed, {tx / elapsed:,.0f} commits/s,"
        f" {done / max(tx, 1):,.1f} rows/commit"
    )
    return done


async def consume(url: str, queue_id: int, epoch: int, args: argparse.Namespace) -> None:
    writer = MessageWriter(url)
    claimer = Claimer(url, max_connections=args.consumers, synchronous_commit=not args.async_claims)
    await writer.start()
    await claimer.open()
    taken = 0
    claims = 0

    async def consumer() -> None:
        nonlocal taken, claims
        pending: asyncio.Future[None] | None = None
        while True:
            rows = await claimer.claim(queue_id, args.claim, epoch)
            claims += 1
            if not rows:
                break
            taken += len(rows)
            # Acks are not waited for one by one (a channel does not either);
            # the previous batch's settle must be done before the next.
            if pending is not None:
                await pending
            pending = writer.settle([r.id for r in rows], epoch)
        if pending is not None:
            await pending

    t0 = time.monotonic()
    await asyncio.gather(*(consumer() for _ in range(args.consumers)))
    elapsed = time.monotonic() - t0
    await claimer.close()
    await writer.close()
    print(
        f"consume: {args.consumers} consumers claiming {args.claim} at a time"
        f" ({'async' if args.async_claims else 'sync'} claim commits):"
        f" {taken / elapsed:,.0f} rows/s claimed and settled ({claims} claims)"
    )


class _AckingSink:
    """A consumer's owner that acks every delivery on the next loop step
    (a client acking at once, without the wire)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.consumed = 0
        self.redelivered = 0

    def credit(self) -> int:
        return 1 << 30

    def deliver(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        if not entries:
            return  # (dispatch may hand over nothing when the buffer ran dry)
        self.consumed += len(entries)
        asyncio.get_running_loop().call_soon(self._ack, consumer, entries)

    def _ack(self, consumer: Consumer, entries: list[QueueEntry]) -> None:
        consumer.unacked -= len(entries)
        self.queue.settle(entries)
        self.queue.dispatch()

    def dispatch_soon(self, queue: Queue) -> None:
        asyncio.get_running_loop().call_soon(queue.dispatch)

    def cancelled_by_server(self, consumer: Consumer) -> None:
        pass


async def queue_path(url: str, queue_id: int, epoch: int, args: argparse.Namespace) -> None:
    """Publish through VirtualHost.publish into a PgBackingQueue (confirms
    through the Journal gate) while a consumer on the same node with
    prefetch ``--prefetch`` acks everything: the broker's own path, minus
    AMQP."""
    node = NodeMessages(
        url, epoch, writer_connections=args.writer_connections, handoff=not args.no_handoff
    )
    await node.start()
    vhost = VirtualHost("/", journal=node.journal)
    vhost.scheduler = asyncio.get_running_loop().call_later
    queue = vhost.declare_queue("bench", owner=None, durable=True)
    attach(queue, node.backing_queue(queue_id, True))
    sink = _AckingSink(queue)
    queue.add_consumer(Consumer("c", queue, sink, prefetch=args.prefetch))
    body = b"x" * args.body_size
    published = 0
    stop = time.monotonic() + args.seconds

    async def publisher() -> None:
        nonlocal published
        while time.monotonic() < stop:
            batch = 0
            for _ in range(args.window):
                message = Message("", "bench", PROPS, body, True)
                batch = vhost.publish(vhost.default_exchange, message)[2]
            done = asyncio.Event()
            node.journal.wait_durable(batch, done.set)
            await done.wait()
            assert node.journal.failure(batch) is None
            published += args.window

    t0 = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(args.submitters)))
    elapsed = time.monotonic() - t0
    consumed_meanwhile = sink.consumed
    while sink.consumed < published:
        await asyncio.sleep(0.01)
    drained = time.monotonic() - t0
    await node.close()
    print(
        f"queue path: {args.submitters} publishers x window {args.window},"
        f" consumer prefetch {args.prefetch}: {published / elapsed:,.0f} msg/s published"
        f" and confirmed, {consumed_meanwhile / elapsed:,.0f} msg/s consumed meanwhile,"
        f" {published / drained:,.0f} msg/s end to end (all {published:,} consumed and acked)"
    )


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with ThrowawayPostgres() as pg:
        yield pg.url


async def main(args: argparse.Namespace) -> None:
    with database(args.url) as url:
        epoch, queue_id = await asyncio.to_thread(prepare, url)
        if args.queue_path:
            await queue_path(url, queue_id, epoch, args)
            return
        await publish(url, queue_id, args)
        if not args.no_consume:
            await consume(url, queue_id, epoch, args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an existing database (default: a throwaway server)")
    p.add_argument("--submitters", type=int, default=64)
    p.add_argument("--window", type=int, default=16, help="rows in flight per submitter")
    p.add_argument("--body-size", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writer-connections", type=int, default=1)
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--claim", type=int, default=100, help="rows per claim")
    p.add_argument("--async-claims", action="store_true", help="synchronous_commit=off")
    p.add_argument("--no-consume", action="store_true")
    p.add_argument(
        "--queue-path",
        action="store_true",
        help="publish and consume through VirtualHost, Queue and PgBackingQueue instead",
    )
    p.add_argument("--prefetch", type=int, default=100, help="--queue-path consumer's")
    p.add_argument("--no-handoff", action="store_true", help="--queue-path: claim everything")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(p.parse_args()))
