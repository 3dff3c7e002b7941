"""PostgreSQL crashes and restarts under load (``pg_ctl stop -m immediate``,
then a start on the same data): the roost nodes recover by themselves,
publishers whose confirms were in doubt publish again, and every confirmed
message is consumed, nothing acked coming back."""

from __future__ import annotations

import time

import pytest

from roost.cluster.devdb import ThrowawayPostgres
from tests.cluster.traffic import (
    TIMEOUT,
    Consumer,
    Ledger,
    Publisher,
    close_nodes,
    drain,
    start_nodes,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


def test_nodes_recover_from_postgres_restarts_under_load(own_postgres: ThrowawayPostgres) -> None:
    pg = own_postgres
    nodes = start_nodes(pg.url, ["a", "b", "c"])
    try:
        hosts = [(n.host, n.port) for n in nodes]
        ledger = Ledger()
        # Publishers on a and b, consumers on b and c.
        pubs = [Publisher(f"p{i}", hosts, i, "restarted", ledger) for i in (0, 1)]
        cons = [Consumer(f"c{i}", hosts, i, "restarted", ledger) for i in (1, 2)]
        for t in [*pubs, *cons]:
            t.start()
        wait_until(lambda: len(ledger.confirmed) >= 300, 60, "publishing to start")
        # A short outage (under the node timeout), then one longer than it:
        # no node may fence another for a silence that was the database's.
        for down in (0.5, TIMEOUT * 2.0):
            before = len(ledger.confirmed)
            pg.stop_immediate()
            time.sleep(down)
            pg.start()
            wait_until(
                lambda before=before: len(ledger.confirmed) >= before + 300,  # type: ignore[misc]
                90,
                "publishing to resume after the restart",
            )
        for p in pubs:
            p.stop()
        drain(ledger, 120, url=pg.url, nodes=nodes)
        for c in cons:
            c.stop()
        ledger.check()
        assert sum(p.reconnects + p.nacks for p in pubs), "the restarts went unnoticed"
        for n in nodes:
            assert n.proc is not None and n.proc.poll() is None, "a node exited"
        fenced = [
            line for n in nodes for line in n.output if "declared dead by the cluster" in line
        ]
        assert not fenced, fenced
    finally:
        close_nodes(nodes)
