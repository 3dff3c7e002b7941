"""Nodes SIGKILLed, paused past their timeout (SIGSTOP, then SIGCONT) and
restarted at random while confirmed publishers and acking consumers on
every node keep going, following their host lists to another node when
theirs goes: every confirmed message is consumed, and nothing acked comes
back (see tests/cluster/traffic.py for the checker).

The schedule is random but seeded (``ROOST_CHAOS_SEED``, printed when the
test fails); ``ROOST_CHAOS_SECONDS`` makes it longer than the default (a
soak: ``ROOST_CHAOS_SECONDS=600 pytest tests/cluster/test_node_chaos.py``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from roost.testing import RoostProcess
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

CHAOS_SECONDS = float(os.environ.get("ROOST_CHAOS_SECONDS", "25"))

pytestmark = pytest.mark.timeout(240 + 2 * CHAOS_SECONDS)


def kill_and_restart(node: RoostProcess, rng: random.Random) -> str:
    node.kill()
    time.sleep(rng.uniform(0.5, TIMEOUT * 1.5))
    node.start(timeout=60)
    return "killed, restarted"


def pause_past_timeout(node: RoostProcess, rng: random.Random) -> str:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    time.sleep(TIMEOUT + rng.uniform(1.0, 3.0))
    node.proc.send_signal(signal.SIGCONT)
    return "paused past its timeout"


def pause_briefly(node: RoostProcess, rng: random.Random) -> str:
    # Within the lease: the node goes on as if nothing happened.
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    time.sleep(rng.uniform(0.2, 1.0))
    node.proc.send_signal(signal.SIGCONT)
    return "paused briefly"


def restart(node: RoostProcess, rng: random.Random) -> str:
    node.kill()
    node.start(timeout=60)
    return "restarted at once"


ACTIONS: list[Callable[[RoostProcess, random.Random], str]] = [
    kill_and_restart,
    pause_past_timeout,
    pause_briefly,
    restart,
]


def test_random_kills_and_pauses_lose_nothing_confirmed(pg_url: str) -> None:
    seed = int(os.environ.get("ROOST_CHAOS_SEED", str(random.randrange(1 << 32))))
    rng = random.Random(seed)
    nodes = start_nodes(pg_url, ["a", "b", "c"])
    done: list[str] = []
    try:
        hosts = [(n.host, n.port) for n in nodes]
        ledger = Ledger()
        pubs = [Publisher(f"p{i}", hosts, i, "chaos", ledger) for i in range(3)]
        cons = [Consumer(f"c{i}", hosts, (i + 1) % 3, "chaos", ledger) for i in range(3)]
        for t in [*pubs, *cons]:
            t.start()
        wait_until(lambda: len(ledger.confirmed) >= 200, 60, "publishing to start")
        end = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < end:
            i = rng.randrange(3)
            action = rng.choice(ACTIONS)
            started = time.monotonic()
            wall = time.strftime("%H:%M:%S")
            done.append(f"{started:.2f} ({wall}) {'abc'[i]}: {action(nodes[i], rng)}")
            if action is pause_past_timeout:
                ledger.woke(nodes[i].port)
            # Publishing goes on somewhere between two blows.
            before = len(ledger.confirmed)
            wait_until(
                lambda before=before: len(ledger.confirmed) > before + 20,  # type: ignore[misc]
                60,
                "publishing to resume",
            )
        # A node that woke from the last pause learns it was declared dead at
        # its next heartbeat and closes its connections: let that happen
        # while the consumers run, or one would close its connection cleanly
        # first and its lost acks would count as certain.
        time.sleep(TIMEOUT + 2)
        for p in pubs:
            p.stop()
        drain(ledger, 120, url=pg_url, nodes=nodes)
        for c in cons:
            c.stop()
        ledger.check()
        assert done
    except AssertionError as exc:
        ports = {name: n.port for name, n in zip("abc", nodes, strict=True)}
        logs = "".join(
            f"--- {name}:\n"
            + "".join(x for x in n.output if " WARNING " in x or " ERROR " in x)[-4000:]
            for name, n in zip("abc", nodes, strict=True)
        )
        raise AssertionError(
            f"ROOST_CHAOS_SEED={seed}, nodes {ports}, schedule {done}: {exc}\n{logs}"
        ) from None
    finally:
        close_nodes(nodes)
