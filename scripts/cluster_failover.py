"""Failover benchmark: SIGKILL the node a confirmed publisher is connected
to, mid-stream, and report what it cost.

    python scripts/cluster_failover.py                  # 3 nodes, --node-timeout 10
    python scripts/cluster_failover.py --rounds 5 --node-timeout 3

A throwaway PostgreSQL and ``--nodes`` roost nodes (``roost serve
--cluster``) are started; ``--publishers`` pika publishers with confirms
(persistent messages, one in flight each, given every node as a host
list, the first being node A) publish to one durable queue. After
``--warmup`` seconds node A is SIGKILLed; the publishers reconnect to
another node and publish again what was not confirmed. Each round then
restarts A. At the end a consumer on another node drains the queue, and
the script reports, per round, the seconds from the kill to the first
confirm on another node, and overall the confirmed messages lost (never
consumed: must be 0) and the duplicates (publishes whose confirm was lost
with the node, published again: allowed).

Run from the repository root (it uses the publishers and consumers of
tests/cluster/traffic.py). Needs Debian's ``postgresql`` server package.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess
from tests.cluster.traffic import Consumer, Ledger, Publisher, drain, wait_until


def _resumed(ledger: Ledger, since: float) -> dict[str, float]:
    """Each publisher's first confirm after ``since``."""
    first: dict[str, float] = {}
    with ledger.lock:
        for key, t in ledger.confirmed.items():
            if t > since:
                pub = key.split(":", 1)[0]
                first[pub] = min(t, first.get(pub, t))
    return first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--node-timeout", type=int, default=10)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of publishing before a kill")
    args = ap.parse_args(argv)
    if args.nodes < 2:
        ap.error("--nodes: at least 2 (one to kill, one to fail over to)")

    with ThrowawayPostgres() as pg:
        nodes = [
            RoostProcess(
                None,
                "--cluster",
                pg.url,
                "--node-name",
                f"node{i + 1}",
                "--node-timeout",
                str(args.node_timeout),
            )
            for i in range(args.nodes)
        ]
        try:
            for n in nodes:
                n.start(timeout=60)
            return _run(args, pg, nodes)
        finally:
            for n in nodes:
                n.close()


def _run(args: argparse.Namespace, pg: ThrowawayPostgres, nodes: list[RoostProcess]) -> int:
    hosts = [(n.host, n.port) for n in nodes]
    ledger = Ledger()
    pubs = [Publisher(f"p{i}", hosts, 0, "failover", ledger) for i in range(args.publishers)]
    for p in pubs:
        p.start()
    started = time.monotonic()
    resumed: list[float] = []
    for r in range(args.rounds):
        time.sleep(args.warmup)
        # pika tries its host list from the start on every reconnection:
        # after A is killed the publishers are on B; once A is back, B's
        # kill sends them to A, and so on.
        victim = nodes[r % 2]
        killed_at = time.monotonic()
        victim.kill()
        wait_until(
            lambda killed_at=killed_at: len(_resumed(ledger, killed_at)) == len(pubs),  # type: ignore[misc]
            120,
            "every publisher to resume",
        )
        # The slowest publisher's first confirm after the kill (including
        # its 0.2 s pause before reconnecting).
        resumed.append(max(_resumed(ledger, killed_at).values()) - killed_at)
        print(
            f"round {r + 1}: killed node{r % 2 + 1}; publishing resumed {resumed[-1]:.2f}s later",
            flush=True,
        )
        victim.start(timeout=60)
    published = time.monotonic() - started
    for p in pubs:
        p.stop()
    consumer = Consumer("c", hosts, 2 % len(hosts), "failover", ledger, prefetch=500)
    consumer.start()
    try:
        drain(ledger, 120 + 4 * args.node_timeout, url=pg.url, nodes=nodes)
    except AssertionError as exc:
        print(exc, file=sys.stderr)
    consumer.stop()
    lost = ledger.missing()
    delivered = sum(len(d) for d in ledger.deliveries.values())
    confirmed = len(ledger.confirmed)
    violations = ledger.violations()
    print(
        f"confirmed: {confirmed} messages in {published:.0f}s ({confirmed / published:.0f}/s); "
        f"lost: {len(lost)}; delivered: {delivered} "
        f"({delivered - confirmed} re-published duplicates or redeliveries); "
        f"checker violations: {len(violations)}"
    )
    print(
        f"every publisher confirming again after the kill: min {min(resumed):.2f}s, "
        f"median {statistics.median(resumed):.2f}s, max {max(resumed):.2f}s "
        f"(node timeout {args.node_timeout}s)"
    )
    return 1 if lost or violations else 0


if __name__ == "__main__":
    sys.exit(main())
