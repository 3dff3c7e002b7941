"""Flow control when PostgreSQL falls behind: with the database stopped
(SIGSTOP: it accepts nothing and answers nothing), a node blocks its
publishers once ``--cluster-max-pending`` bytes wait for a COMMIT, instead
of holding whatever they send; once PostgreSQL runs again they are
unblocked and everything published is consumed."""

from __future__ import annotations

import threading
import time

import pika
import pytest
from pika.exceptions import AMQPError

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess
from tests.cluster.traffic import (
    Consumer,
    Ledger,
    Publisher,
    close_nodes,
    drain,
    start_nodes,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

BODY = b"x" * 65536
LIMIT = 4 * 1024 * 1024


def rss(proc: RoostProcess) -> int:
    assert proc.proc is not None
    with open(f"/proc/{proc.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Flood(threading.Thread):
    """Publishes BODY as fast as the node reads it, without confirms (so
    nothing but the broker's flow control holds it back)."""

    def __init__(self, node: RoostProcess, queue: str) -> None:
        super().__init__(daemon=True)
        self.conn = pika.BlockingConnection(pika.ConnectionParameters(node.host, node.port))
        self.events: list[str] = []
        self.conn.add_on_connection_blocked_callback(lambda *_: self.events.append("blocked"))
        self.conn.add_on_connection_unblocked_callback(lambda *_: self.events.append("unblocked"))
        self.ch = self.conn.channel()
        self.ch.queue_declare(queue, durable=True)
        self.queue = queue
        self.sent = 0
        self.stopping = threading.Event()
        self.failed: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                body = f"flood:{self.sent}:".encode() + BODY
                self.ch.basic_publish("", self.queue, body, pika.BasicProperties(delivery_mode=2))
                self.sent += 1
                # pika dispatches connection.blocked and unblocked only here.
                self.conn.process_data_events(0)
            self.conn.close()
        except (AMQPError, OSError) as exc:
            self.failed = exc


def test_publishers_are_blocked_while_postgres_is_stopped(
    own_postgres: ThrowawayPostgres,
) -> None:
    pg = own_postgres
    (node,) = start_nodes(pg.url, ["a"], "--cluster-max-pending", str(LIMIT))
    try:
        hosts = [(node.host, node.port)]
        ledger = Ledger()
        confirmed = Publisher("p", hosts, 0, "flooded", ledger)
        confirmed.start()
        wait_until(lambda: len(ledger.confirmed) >= 50, 60, "publishing to start")
        flood = Flood(node, "flooded")
        baseline = rss(node)
        pg.pause()
        try:
            flood.start()
            wait_until(
                lambda: any("blocking publishers" in line for line in node.output),
                60,
                "the node to block its publishers",
            )
            time.sleep(3)  # the flood would go on here without flow control
            held = flood.sent
            time.sleep(2)
            # Not a byte more read from it (its last frames may still be in
            # the socket buffers), and the node's memory stays bounded.
            assert flood.sent - held <= 64
            grown = rss(node) - baseline
            assert grown < 64 * 1024 * 1024, grown
        finally:
            pg.resume()
        wait_until(lambda: "unblocked" in flood.events, 60, "connection.unblocked")
        flood.stopping.set()
        flood.join(60)
        assert flood.failed is None, flood.failed
        assert flood.events[:2] == ["blocked", "unblocked"]
        confirmed.stop()
        flooded = Consumer("c", hosts, 0, "flooded", ledger, prefetch=200)
        flooded.start()
        drain(ledger, 120, url=pg.url, nodes=[node])
        # The flood was not confirmed, but nothing failed: all of it is there.
        wait_until(
            lambda: (
                len({k for k in ledger.consumed_keys() if k.startswith("flood:")}) >= flood.sent
            ),
            120,
            "every flooded message to be consumed",
        )
        flooded.stop()
        ledger.check()
    finally:
        close_nodes([node])
