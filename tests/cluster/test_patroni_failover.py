"""The highly available PostgreSQL the cluster relies on: with Patroni in
synchronous mode, every transaction a client saw committed survives the
SIGKILL of the primary, and a client following the multi-host URL reaches
the new primary by itself. (roost's own failover test builds on this
harness.)"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.cluster.patroni_cluster import PatroniCluster, available

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def patroni() -> Iterator[PatroniCluster]:
    if not available() and not os.environ.get("ROOST_REQUIRE_PATRONI"):
        pytest.skip("patroni, etcd or PostgreSQL not installed")
    with PatroniCluster() as cluster:
        yield cluster


def test_commits_survive_the_loss_of_the_primary(patroni: PatroniCluster) -> None:
    with psycopg.connect(patroni.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE committed (id integer PRIMARY KEY)")
    acknowledged: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        conn: psycopg.Connection[object] | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(patroni.url, autocommit=True, connect_timeout=3)
                conn.execute("INSERT INTO committed VALUES (%s)", (n,))
                acknowledged.append(n)
                n += 1
            except psycopg.Error as exc:
                # Outcome unknown: this id may or may not be there.
                failures.append(type(exc).__name__)
                n += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        old = patroni.leader()
        assert old is not None
        before = len(acknowledged)
        patroni.kill_member(old)
        patroni.wait_for_leader(other_than=old)
        deadline = time.monotonic() + 60
        while len(acknowledged) < before + 200 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert len(acknowledged) >= before + 200, "writes did not resume on the new primary"
    assert failures, "the primary's loss went unnoticed: was it killed?"
    with psycopg.connect(patroni.url) as conn:
        stored = {r[0] for r in conn.execute("SELECT id FROM committed")}
    assert set(acknowledged) <= stored
