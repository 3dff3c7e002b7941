"""Figures for sizing PostgreSQL under a roost cluster (docs/cluster.md,
"Deployment and sizing"): PostgreSQL connections per node, WAL and table
bytes per persistent message published and consumed, and what listing
another node's connections costs the management API.

Starts a throwaway PostgreSQL and two ``roost serve --cluster`` nodes:

    python scripts/cluster_sizing.py --messages 20000 --body 100 --connections 200
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import time
import urllib.request
from typing import Any

import pika
import psycopg

from roost.cluster.devdb import ThrowawayPostgres
from roost.testing import RoostProcess


def _scalar(url: str, sql: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.encode()).fetchone()
        return row[0] if row else None


def _wal(url: str) -> int:
    return int(_scalar(url, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def _get(proc: RoostProcess, path: str) -> tuple[Any, float]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{proc.http_port}{path}",
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        data = json.loads(resp.read())
    return data, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--body", type=int, default=100, help="body bytes")
    ap.add_argument("--connections", type=int, default=200, help="idle connections on node b")
    args = ap.parse_args()

    with ThrowawayPostgres() as pg:
        url = pg.url
        nodes = [
            RoostProcess(None, "--cluster", url, "--node-name", name, "--node-timeout", "10")
            for name in ("a", "b")
        ]
        for n in nodes:
            n.start()
        a, b = nodes
        try:
            per_node = _scalar(
                url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            print(f"PostgreSQL connections, 2 idle nodes + this one: {per_node}")

            conn = pika.BlockingConnection(pika.ConnectionParameters(a.host, a.port))
            ch = conn.channel()
            ch.queue_declare("sizing", durable=True)
            ch.confirm_delivery()
            body = b"x" * args.body
            props = pika.BasicProperties(delivery_mode=2)
            wal0 = _wal(url)
            for _ in range(args.messages):
                ch.basic_publish("", "sizing", body, props)
            wal1 = _wal(url)
            size = _scalar(url, "SELECT pg_total_relation_size('roost_messages')")
            ch.basic_qos(prefetch_count=500)
            got = 0

            def on_message(c: Any, m: Any, p: Any, b: bytes) -> None:
                nonlocal got
                got += 1
                c.basic_ack(m.delivery_tag)

            ch.basic_consume("sizing", on_message)
            while got < args.messages:
                conn.process_data_events(0.5)
            time.sleep(1)  # the last acks' batch
            wal2 = _wal(url)
            conn.close()
            n = args.messages
            print(f"{n} persistent messages of {args.body} bytes, one queue:")
            print(f"  WAL publishing: {(wal1 - wal0) / n:.0f} bytes/message")
            print(f"  WAL consuming (claim + ack): {(wal2 - wal1) / n:.0f} bytes/message")
            print(f"  roost_messages with the backlog: {size / n:.0f} bytes/message (with indexes)")

            clients = [
                pika.BlockingConnection(pika.ConnectionParameters(b.host, b.port))
                for _ in range(args.connections)
            ]
            for c in clients:
                c.channel()
            deadline = time.monotonic() + 30
            while True:
                listed, _ = _get(a, "/api/connections")
                if len(listed) >= args.connections or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            view = _scalar(url, "SELECT pg_column_size(connections) FROM roost_node_views")
            times = []
            for _ in range(20):
                time.sleep(0.6)  # past the snapshot cache: a read from PostgreSQL each time
                _, took = _get(a, "/api/connections")
                times.append(took)
            times.sort()
            print(f"{len(listed)} connections on node b, listed by node a:")
            print(f"  b's published connections: {view} bytes (stored, compressed)")
            print(f"  GET /api/connections on a: median {times[len(times) // 2] * 1000:.1f} ms")
            for c in clients:
                c.close()
        finally:
            for n in nodes:
                if n.proc is not None:
                    n.proc.send_signal(signal.SIGTERM)
                    n.proc.wait(30)
                n.close()


if __name__ == "__main__":
    main()
