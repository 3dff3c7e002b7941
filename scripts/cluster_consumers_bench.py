"""How long the cluster takes to learn of another node's consumers: a
throwaway PostgreSQL and two ``roost serve --cluster`` nodes, pika clients.

    python scripts/cluster_consumers_bench.py [--rounds 20]

Prints the median and the worst of:

- *registration*: from ``basic.consume-ok`` on node a until a passive
  declare on node b counts the consumer;
- *SAC hand-over*: single active consumer on a, a standby on b; from the
  active one's ``basic.cancel`` (a message is already waiting) until the
  standby has that message;
- *auto-delete*: from the last consumer's cancel on a until the queue is
  gone on b.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess


def _connect(proc: RoostProcess) -> Any:
    return pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port))


def _until(check: Callable[[], bool], timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("condition not reached")
    return time.perf_counter() - start


def _registration(a: RoostProcess, b: RoostProcess, rounds: int) -> list[float]:
    took = []
    with _connect(a) as ca, _connect(b) as cb:
        cha, chb = ca.channel(), cb.channel()
        for i in range(rounds):
            q = f"reg-{i}"
            cha.queue_declare(q)
            tag = cha.basic_consume(q, lambda *args: None)
            took.append(
                _until(lambda q=q: chb.queue_declare(q, passive=True).method.consumer_count == 1)
            )
            cha.basic_cancel(tag)
    return took


def _handover(a: RoostProcess, b: RoostProcess, rounds: int) -> list[float]:
    took = []
    with _connect(a) as ca, _connect(b) as cb:
        cha, chb = ca.channel(), cb.channel()
        for i in range(rounds):
            q = f"sac-{i}"
            cha.queue_declare(q, arguments={"x-single-active-consumer": True})
            tag = cha.basic_consume(q, lambda *args: None, auto_ack=True)
            _until(lambda q=q: chb.queue_declare(q, passive=True).method.consumer_count == 1)
            got: list[bytes] = []
            chb.basic_consume(q, lambda ch, m, p, body, got=got: got.append(body), auto_ack=True)
            _until(lambda q=q: cha.queue_declare(q, passive=True).method.consumer_count == 2)
            # The standby must not have it: the active one is registered first.
            cb.process_data_events(0.2)
            assert not got
            cha.basic_cancel(tag)
            chb.basic_publish("", q, b"x")
            took.append(_until(lambda got=got: bool(cb.process_data_events(0) or got)))
            chb.queue_delete(q)
    return took


def _auto_delete(a: RoostProcess, b: RoostProcess, rounds: int) -> list[float]:
    took = []
    with _connect(a) as ca, _connect(b) as cb:
        cha = ca.channel()
        for i in range(rounds):
            q = f"auto-{i}"
            cha.queue_declare(q, auto_delete=True)
            tag = cha.basic_consume(q, lambda *args: None)
            _until(lambda q=q: _count(cb, q) == 1)
            cha.basic_cancel(tag)
            took.append(_until(lambda q=q: _count(cb, q) < 0))
    return took


def _count(conn: Any, queue: str) -> int:
    """The consumer count on ``conn``'s node, -1 when the queue is gone."""
    ch = conn.channel()
    try:
        n = int(ch.queue_declare(queue, passive=True).method.consumer_count)
    except ChannelClosedByBroker:
        return -1
    ch.close()
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    with ThrowawayPostgres() as pg:
        nodes = [
            RoostProcess(None, "--cluster", pg.url, "--node-name", name, "--node-timeout", "5")
            for name in ("a", "b")
        ]
        try:
            a, b = (n.start() for n in nodes)
            for what, run in (
                ("registration", _registration),
                ("SAC hand-over", _handover),
                ("auto-delete", _auto_delete),
            ):
                took = run(a, b, args.rounds)
                print(
                    f"{what:>14}: median {statistics.median(took) * 1000:6.1f} ms,"
                    f" worst {max(took) * 1000:6.1f} ms ({len(took)} rounds)",
                    flush=True,
                )
        finally:
            for n in nodes:
                n.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
