"""Direct reply-to across the nodes of a cluster: the requester consumes
from ``amq.rabbitmq.reply-to`` on one ``roost serve --cluster`` process,
the server answering it is connected to another. Real processes, pika."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika
import psycopg
import pytest

from roost.testing import RoostProcess

TIMEOUT = 3  # --node-timeout of every node here
REPLY_TO = "amq.rabbitmq.reply-to"


@pytest.fixture
def node(pg_url: str) -> Iterator[Callable[[str], RoostProcess]]:
    started: list[RoostProcess] = []

    def start(name: str) -> RoostProcess:
        proc = RoostProcess(
            None, "--cluster", pg_url, "--node-name", name, "--node-timeout", str(TIMEOUT)
        )
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
        proc.close()
        print("".join(proc.output[-40:]))  # shown when the test failed


def _connect(proc: RoostProcess) -> Any:
    return pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port))


class Server:
    """Answers each request on ``queue`` with its body reversed, to its reply_to."""

    def __init__(self, proc: RoostProcess, queue: str, size: int = 0) -> None:
        self.conn = _connect(proc)
        self.ch = self.conn.channel()
        self.ch.queue_declare(queue)
        self.size = size
        self.answered = 0
        self.ch.basic_consume(queue, self._on_request)

    def _on_request(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        reply = body[::-1].ljust(self.size, b".")
        ch.basic_publish(
            "", props.reply_to, reply, pika.BasicProperties(correlation_id=props.correlation_id)
        )
        ch.basic_ack(method.delivery_tag)
        self.answered += 1


class Requester:
    def __init__(self, proc: RoostProcess) -> None:
        self.conn = _connect(proc)
        self.ch = self.conn.channel()
        self.replies: list[tuple[str, bytes]] = []
        self.ch.basic_consume(REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        assert method.exchange == "" and method.routing_key.startswith(REPLY_TO + ".")
        self.replies.append((props.correlation_id, body))

    def request(self, queue: str, body: bytes, correlation_id: str) -> None:
        self.ch.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(reply_to=REPLY_TO, correlation_id=correlation_id),
        )


def _pump(conns: list[Any], until: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for replies")
        for c in conns:
            c.process_data_events(time_limit=0.02)


@pytest.mark.parametrize("size", [0, 20_000], ids=["in-notify", "stored"])
def test_reply_reaches_a_requester_on_another_node(
    node: Callable[[str], RoostProcess], size: int
) -> None:
    a, b = node("a"), node("b")
    server = Server(b, "rpc", size)
    requester = Requester(a)
    for i in range(50):
        requester.request("rpc", f"req{i:03}".encode(), str(i))
    _pump([server.conn, requester.conn], lambda: len(requester.replies) == 50)
    # In order, each to its request.
    assert [cid for cid, _ in requester.replies] == [str(i) for i in range(50)]
    for i, (_, body) in enumerate(requester.replies):
        assert body.rstrip(b".") == f"req{i:03}".encode()[::-1]
        assert len(body) == max(size, 6)
    server.conn.close()
    requester.conn.close()


def test_requesters_on_both_nodes_and_servers_on_both(
    node: Callable[[str], RoostProcess],
) -> None:
    """The RPC pattern of a pool of workers: requests from each node are
    answered by whichever worker takes them, on either node."""
    a, b = node("a"), node("b")
    servers = [Server(a, "work"), Server(b, "work")]
    requesters = [Requester(a), Requester(b)]
    for n, r in enumerate(requesters):
        for i in range(40):
            r.request("work", f"{n}-{i}".encode(), f"{n}-{i}")
    conns = [s.conn for s in servers] + [r.conn for r in requesters]
    _pump(conns, lambda: all(len(r.replies) == 40 for r in requesters))
    for n, r in enumerate(requesters):
        assert sorted(cid for cid, _ in r.replies) == sorted(f"{n}-{i}" for i in range(40))
    # Whichever server took them, the replies to one of the requesters
    # crossed nodes (both servers need not take some: a node claims ahead
    # of its consumers, so a burst may go to one node; see docs/cluster.md).
    assert sum(bool(s.answered) for s in servers) >= 1
    for c in conns:
        c.close()


def test_reply_to_a_dead_nodes_requester_is_dropped(
    node: Callable[[str], RoostProcess], pg_url: str
) -> None:
    a, b = node("a"), node("b")
    conn = _connect(b)
    ch = conn.channel()
    ch.queue_declare("rpc")
    requester = Requester(a)
    requester.request("rpc", b"hello", "1")
    deadline = time.monotonic() + 30
    while (got := ch.basic_get("rpc"))[0] is None:
        assert time.monotonic() < deadline, "the request never came"
        time.sleep(0.05)
    method, props, _ = got
    a.kill()
    with psycopg.connect(pg_url, autocommit=True) as db:
        while db.execute("SELECT count(*) FROM roost_nodes WHERE NOT dead").fetchone() != (1,):
            assert time.monotonic() < deadline, "node a was never declared dead"
            time.sleep(0.2)
    ch.confirm_delivery()
    # Its node existed: routed and confirmed; then dropped, stored or not.
    ch.basic_publish("", props.reply_to, b"x" * 20_000, mandatory=True)
    ch.basic_publish("", props.reply_to, b"small", mandatory=True)
    ch.basic_ack(method.delivery_tag)
    conn.process_data_events(time_limit=0.5)
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM roost_replies").fetchone() == (0,)
    assert conn.is_open
    conn.close()


def test_reply_to_a_closed_channel_on_another_node_is_dropped(
    node: Callable[[str], RoostProcess],
) -> None:
    a, b = node("a"), node("b")
    decl = _connect(b)
    decl.channel().queue_declare("rpc")
    decl.close()
    requester = Requester(a)
    requester.request("rpc", b"late", "1")
    requester.conn.close()  # gone before the answer
    server = Server(b, "rpc")
    _pump([server.conn], lambda: server.answered == 1)
    # Another requester on the same node is not sent what was not its own.
    other = Requester(a)
    other.request("rpc", b"mine", "2")
    _pump([server.conn, other.conn], lambda: len(other.replies) == 1)
    other.conn.process_data_events(time_limit=0.3)
    assert other.replies == [("2", b"enim")]
    other.conn.close()
    server.conn.close()
