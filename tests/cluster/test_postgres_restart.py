"""PostgreSQL crashes and restarts under load (``pg_ctl stop -m immediate``,
then a start on the same data): the roost nodes recover by themselves,
publishers whose confirms were in doubt publish again, and every confirmed
message is consumed, nothing acked coming back."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from roost.cluster.devdb import ThrowawayPostgres, find_bindir
from roost.testing import RoostProcess
from tests.cluster.traffic import Consumer, Ledger, Publisher, drain, wait_until

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 3  # --node-timeout


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    """A server of this test's own: it is crashed and restarted."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: postgresql)")
    with ThrowawayPostgres() as pg:
        yield pg


def start_nodes(url: str, names: list[str], *extra: str) -> list[RoostProcess]:
    nodes = []
    try:
        for name in names:
            proc = RoostProcess(
                None, "--cluster", url, "--node-name", name, "--node-timeout", str(TIMEOUT), *extra
            )
            nodes.append(proc.start())
    except BaseException:
        for n in nodes:
            n.close()
        raise
    return nodes


def close_nodes(nodes: list[RoostProcess]) -> None:
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            n.proc.send_signal(signal.SIGCONT)
        n.close()


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
