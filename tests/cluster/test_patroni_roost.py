"""roost nodes over a Patroni-managed PostgreSQL (two instances in
synchronous mode) whose primary is SIGKILLed under load: the nodes follow
the multi-host URL to the new primary by themselves, publishing resumes,
and every confirmed message is consumed afterwards, nothing acked coming
back. The failover takes longer than the node timeout: no node may fence
another for a silence that was the database's."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster.patroni_cluster import PatroniCluster, available
from tests.cluster.traffic import (
    Consumer,
    Ledger,
    Publisher,
    close_nodes,
    drain,
    start_nodes,
    wait_until,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def patroni() -> Iterator[PatroniCluster]:
    if not available() and not os.environ.get("ROOST_REQUIRE_PATRONI"):
        pytest.skip("patroni, etcd or PostgreSQL not installed")
    with PatroniCluster() as cluster:
        yield cluster


def test_roost_follows_a_patroni_failover_under_load(patroni: PatroniCluster) -> None:
    nodes = start_nodes(patroni.url, ["a", "b"])
    try:
        hosts = [(n.host, n.port) for n in nodes]
        ledger = Ledger()
        pubs = [Publisher(f"p{i}", hosts, i, "failover", ledger) for i in (0, 1)]
        cons = [Consumer(f"c{i}", hosts, 1 - i, "failover", ledger) for i in (0, 1)]
        for t in [*pubs, *cons]:
            t.start()
        wait_until(lambda: len(ledger.confirmed) >= 300, 60, "publishing to start")
        old = patroni.leader()
        assert old is not None
        before = len(ledger.confirmed)
        patroni.kill_member(old)
        patroni.wait_for_leader(other_than=old, timeout=90)
        wait_until(lambda: len(ledger.confirmed) >= before + 300, 120, "publishing to resume")
        for p in pubs:
            p.stop()
        drain(ledger, 120, url=patroni.url, nodes=nodes)
        for c in cons:
            c.stop()
        ledger.check()
        assert sum(p.reconnects + p.nacks for p in pubs), "the failover went unnoticed"
        for n in nodes:
            assert n.proc is not None and n.proc.poll() is None, "a node exited"
        fenced = [
            line for n in nodes for line in n.output if "declared dead by the cluster" in line
        ]
        assert not fenced, fenced
    finally:
        close_nodes(nodes)
