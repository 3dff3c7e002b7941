"""A node killed with SIGKILL: nothing it confirmed is lost, and what it
had delivered unacked comes back redelivered once it is declared dead."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from roost.cluster.claims import Claimer
from tests.cluster import fixtures

ROOT = Path(__file__).resolve().parents[2]


async def test_sigkilled_node_loses_nothing_confirmed(pg_url: str) -> None:
    epoch, (q,) = fixtures.prepare(pg_url)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.crash_node", pg_url, str(epoch), str(q)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    confirmed: set[int] = set()
    delivered: set[int] = set()
    assert child.stdout is not None
    try:
        while len(confirmed) < 2000 or len(delivered) < 20:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, "the node exited"
            what, n = line.split()
            (confirmed if what == "confirmed" else delivered).add(int(n))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    # Whatever the pipe still held was confirmed too.
    for line in child.stdout:
        what, n = line.split()
        (confirmed if what == "confirmed" else delivered).add(int(n))
    child.stdout.close()

    bodies = fixtures.scalar(
        pg_url, "SELECT array_agg(convert_from(body, 'UTF8')::int) FROM roost_messages"
    )
    assert isinstance(bodies, list)
    stored = set(bodies)
    assert confirmed <= stored, sorted(confirmed - stored)[:10]
    assert len(bodies) == len(stored)  # nothing twice
    held = fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages WHERE owner = %s", epoch)
    # Delivered, plus claimed ahead into its buffer (claim_ahead).
    assert isinstance(held, int) and held >= len(delivered)

    # The registry declares it dead after --node-timeout; its rows come back.
    fixtures.mark_dead(pg_url, epoch)
    claimer = Claimer(pg_url)
    await claimer.open()
    try:
        assert await claimer.release_dead(epoch) == held
        back = fixtures.scalar(
            pg_url,
            "SELECT array_agg(convert_from(body, 'UTF8')::int) FROM roost_messages"
            " WHERE redelivered AND owner IS NULL",
        )
        # Buffered ones too: "redelivered" means "may have been delivered".
        assert isinstance(back, list) and len(back) == held and delivered <= set(back)
        assert (
            fixtures.scalar(pg_url, "SELECT count(*) FROM roost_messages WHERE owner IS NOT NULL")
            == 0
        )
    finally:
        await claimer.close()
