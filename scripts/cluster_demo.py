"""A local demo cluster in one command: a throwaway PostgreSQL and three
roost nodes sharing it.

    python scripts/cluster_demo.py                 # AMQP 5672-5674, HTTP 15672-15674
    python scripts/cluster_demo.py --base-port 5700 --nodes 3

Needs Debian's ``postgresql`` server package (the binaries; no service is
started). Everything lives in a temporary directory removed on Ctrl-C.
Point clients at any node (pika: a list of ``URLParameters``; kombu/Celery:
``amqp://guest:guest@127.0.0.1:5672;amqp://guest:guest@127.0.0.1:5673``).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roost.cluster.devdb import ThrowawayPostgres


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--base-port", type=int, default=5672, help="AMQP port of the first node")
    ap.add_argument("--http-base-port", type=int, default=15672)
    ap.add_argument("--node-timeout", type=int, default=10)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="roost-demo-"))
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        with ThrowawayPostgres() as pg:
            try:
                return _run(args, pg, base, nodes)
            finally:
                # Inside the with: the nodes go before their database does
                # (a node whose PostgreSQL vanished first would only log
                # connection errors until its SIGTERM timed out).
                _stop(nodes)
    except KeyboardInterrupt:
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    pg: ThrowawayPostgres,
    base: Path,
    nodes: list[subprocess.Popen[bytes]],
) -> int:
    print(f"PostgreSQL: {pg.url}", flush=True)
    for i in range(args.nodes):
        port, http = args.base_port + i, args.http_base_port + i
        data = base / f"node{i + 1}"
        data.mkdir(mode=0o700)
        cmd = [
            sys.executable,
            "-m",
            "roost",
            "serve",
            "--cluster",
            pg.url,
            "--node-name",
            f"node{i + 1}",
            "--node-timeout",
            str(args.node_timeout),
            "--port",
            str(port),
            "--http-port",
            str(http),
            "--data-dir",
            str(data),
        ]
        nodes.append(subprocess.Popen(cmd))
        print(
            f"node{i + 1}: amqp://guest:guest@127.0.0.1:{port}/  http://127.0.0.1:{http}/",
            flush=True,
        )
    print("Ctrl-C stops the cluster and removes its files.", flush=True)
    while all(n.poll() is None for n in nodes):
        time.sleep(0.5)
    print("a node exited; stopping the cluster", file=sys.stderr)
    return 1


def _stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for n in nodes:
        if n.poll() is None:
            n.send_signal(signal.SIGTERM)
    for n in nodes:
        try:
            n.wait(15)
        except subprocess.TimeoutExpired:
            n.kill()
            n.wait(15)


if __name__ == "__main__":
    sys.exit(main())
