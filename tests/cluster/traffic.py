"""Traffic for the failure tests: confirmed publishers and acking consumers
(pika, each in a thread of its own, each following a host list to another
node when its connection is lost), the checker of what they saw, and the
``roost serve --cluster`` nodes they run against (:func:`start_nodes`).

Every publish *attempt* has a body of its own (``publisher:seq:attempt``):
a publish whose confirm did not come (a nack, a connection closed with 541
on an unknown COMMIT outcome, a node gone) is published again as the next
attempt of the same ``seq``, so a duplicate row is always told apart from a
message delivered twice. :meth:`Ledger.check` then asserts:

- every confirmed ``seq`` was delivered (and acked) at least once;
- a body delivered again after it was acked was acked *uncertainly*: on a
  connection that then died abnormally, within :data:`ACK_WINDOW` seconds
  of that connection's last delivery (the broker may not have read or
  written the ack before its node died or was paused: RabbitMQ loses such
  acks too, and requeues);
- every delivery of a body after its first is flagged redelivered.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import psycopg
from pika.exceptions import AMQPError

from roost.testing import RoostProcess

PERSISTENT = pika.BasicProperties(delivery_mode=2)

# An ack sent this long before its connection's last delivery, on a
# connection that then died, is taken as written: a node commits acks
# within milliseconds while it runs and reaches PostgreSQL.
ACK_WINDOW = 2.0

Address = tuple[str, int]

_serials = itertools.count(1)

TIMEOUT = 3  # --node-timeout of the nodes start_nodes() starts


def parameters(hosts: list[Address], first: int = 0) -> list[pika.ConnectionParameters]:
    """A pika host list starting at ``hosts[first]``: the client tries
    each in turn, as an application given several nodes would."""
    order = hosts[first:] + hosts[:first]
    return [
        pika.ConnectionParameters(
            host,
            port,
            # A paused node answers nothing: heartbeats and the handshake
            # timeout are what tells the client to move on.
            heartbeat=2,
            socket_timeout=3,
            stack_timeout=6,
            connection_attempts=1,
            blocked_connection_timeout=None,
        )
        for host, port in order
    ]


@dataclass
class _Conn:
    last_delivery: float = 0.0
    died: bool = False


@dataclass
class Ledger:
    """What the publishers and consumers saw (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    confirmed: dict[str, float] = field(default_factory=dict)  # "pub:seq" -> when
    # body -> [(time, connection, redelivered)]
    deliveries: dict[str, list[tuple[float, int, bool]]] = field(default_factory=dict)
    acks: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    conns: dict[int, _Conn] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ports: dict[int, int] = field(default_factory=dict)  # connection -> node's port
    # (port, from, to): a node woke from a pause past its timeout then.
    wakes: list[tuple[int, float, float]] = field(default_factory=list)

    def confirm(self, key: str) -> None:
        with self.lock:
            self.confirmed.setdefault(key, time.monotonic())

    def delivered(self, body: str, conn: int, redelivered: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.deliveries.setdefault(body, []).append((now, conn, redelivered))
            self.conns.setdefault(conn, _Conn()).last_delivery = now

    def acked(self, body: str, conn: int) -> None:
        with self.lock:
            self.acks.setdefault(body, []).append((time.monotonic(), conn))

    def connection_died(self, conn: int) -> None:
        with self.lock:
            self.conns.setdefault(conn, _Conn()).died = True

    def woke(self, port: int, seconds: float = 2.0) -> None:
        """The node on ``port`` was just resumed after a pause past its
        timeout. Deliveries it wrote just before it froze (decided under
        its lease, still in its output buffer) reach the client now, after
        another node may have redelivered and seen acked the same message;
        the node closes the connection (320) as soon as its heartbeat
        learns it was declared dead, and the client's ack is void. Those
        stale deliveries are not held against it."""
        now = time.monotonic()
        with self.lock:
            self.wakes.append((port, now - 0.5, now + seconds))

    def _stale(self, when: float, conn: int) -> bool:
        port = self.ports.get(conn)
        return any(p == port and start <= when <= end for p, start, end in self.wakes)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    def consumed_keys(self) -> set[str]:
        with self.lock:
            return {body.rsplit(":", 1)[0] for body in self.acks}

    def missing(self) -> set[str]:
        """Confirmed and not yet consumed."""
        consumed = self.consumed_keys()
        with self.lock:
            return set(self.confirmed) - consumed

    def _certain(self, when: float, conn: int) -> bool:
        c = self.conns.get(conn)
        return c is None or not c.died or when < c.last_delivery - ACK_WINDOW

    def violations(self) -> list[str]:
        found: list[str] = []
        with self.lock:
            for body, got in self.deliveries.items():
                if len(got) < 2:
                    continue
                acks = self.acks.get(body, [])
                for i, (when, conn, redelivered) in enumerate(got[1:], 1):
                    if self._stale(when, conn):
                        continue
                    if not redelivered:
                        found.append(f"{body}: delivered again without the redelivered flag")
                    for acked_at, ack_conn in acks:
                        if acked_at < got[i - 1][0]:
                            continue  # not an ack of an earlier delivery
                        if acked_at < when and self._certain(acked_at, ack_conn):
                            found.append(
                                f"{body}: acked, then delivered again ({self._story(body)})"
                            )
        return found

    def _story(self, body: str) -> str:
        """The deliveries and acks of ``body``: when, through which node."""
        events = [
            (t, f"delivered by :{self.ports.get(c)}{' redelivered' if r else ''}")
            for t, c, r in self.deliveries.get(body, [])
        ] + [(t, f"acked on :{self.ports.get(c)}") for t, c in self.acks.get(body, [])]
        return ", ".join(f"{t:.2f} {what}" for t, what in sorted(events))

    def check(self) -> None:
        missing = self.missing()
        assert not missing, (
            f"{len(missing)} confirmed messages never consumed: {sorted(missing)[:10]}"
        )
        bad = self.violations()
        assert not bad, f"{len(bad)} violations: {bad[:10]}"


class Publisher(threading.Thread):
    """Publishes persistent messages to ``queue`` with confirms, one in
    flight, as fast as they are confirmed; a publish not confirmed is
    published again (a new attempt) on a new connection."""

    def __init__(
        self, name: str, hosts: list[Address], first: int, queue: str, ledger: Ledger
    ) -> None:
        super().__init__(name=f"publisher-{name}", daemon=True)
        self.tag = name
        self.params = parameters(hosts, first)
        self.queue = queue
        self.ledger = ledger
        self.stopping = threading.Event()
        self.seq = 0
        self.reconnects = 0
        self.nacks = 0
        # (when it failed, when the next confirm came): how long publishing
        # stopped at each failure.
        self.gaps: list[tuple[float, float]] = []
        self._failed_at: float | None = None

    def run(self) -> None:
        attempt = 0
        conn: Any = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = pika.BlockingConnection(self.params)
                    ch = conn.channel()
                    ch.queue_declare(self.queue, durable=True)
                    ch.confirm_delivery()
                body = f"{self.tag}:{self.seq}:{attempt}"
                ch.basic_publish("", self.queue, body.encode(), PERSISTENT)
            except pika.exceptions.NackError:
                self.nacks += 1
                attempt += 1
                self._failed()
                continue
            except (AMQPError, OSError):
                attempt += 1
                self._failed()
                self.reconnects += 1
                if conn is not None:
                    _close(conn)
                    conn = None
                time.sleep(0.2)
                continue
            self.ledger.confirm(f"{self.tag}:{self.seq}")
            if self._failed_at is not None:
                self.gaps.append((self._failed_at, time.monotonic()))
                self._failed_at = None
            self.seq += 1
            attempt = 0
        if conn is not None:
            _close(conn)

    def _failed(self) -> None:
        if self._failed_at is None:
            self._failed_at = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


class Consumer(threading.Thread):
    """Consumes ``queue`` with manual acks, recording every delivery and
    ack in the ledger; reconnects through its host list."""

    def __init__(
        self,
        name: str,
        hosts: list[Address],
        first: int,
        queue: str,
        ledger: Ledger,
        prefetch: int = 50,
    ) -> None:
        super().__init__(name=f"consumer-{name}", daemon=True)
        self.params = parameters(hosts, first)
        self.queue = queue
        self.ledger = ledger
        self.prefetch = prefetch
        self.stopping = threading.Event()
        self.reconnects = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            serial = next(_serials)
            conn: Any = None
            try:
                conn = pika.BlockingConnection(self.params)
                with self.ledger.lock:
                    self.ledger.ports[serial] = conn._impl.params.port
                ch = conn.channel()
                ch.queue_declare(self.queue, durable=True)
                ch.basic_qos(prefetch_count=self.prefetch)
                ch.basic_consume(self.queue, self._handler(serial))
                while not self.stopping.is_set():
                    conn.process_data_events(time_limit=0.2)
            except (AMQPError, OSError):
                self.ledger.connection_died(serial)
                self.reconnects += 1
                time.sleep(0.2)
            finally:
                if conn is not None:
                    _close(conn)

    def _handler(self, serial: int) -> Callable[[Any, Any, Any, bytes], None]:
        ledger = self.ledger

        def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
            text = body.decode()
            ledger.delivered(text, serial, bool(method.redelivered))
            ch.basic_ack(method.delivery_tag)
            ledger.acked(text, serial)

        return on_message

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def _close(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # closing a connection already broken
        pass


def wait_until(ok: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def drain(
    ledger: Ledger, timeout: float, url: str = "", nodes: Sequence[RoostProcess] = ()
) -> None:
    """Wait until every confirmed message was consumed; on a timeout, say
    where the missing ones are (rows, owners, the nodes' warnings)."""
    try:
        wait_until(lambda: not ledger.missing(), timeout, "every confirmed message to be consumed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_diagnosis(ledger, url, nodes)}") from None


def _diagnosis(ledger: Ledger, url: str, nodes: Sequence[RoostProcess]) -> str:
    missing = sorted(ledger.missing())
    lines = [f"{len(missing)} confirmed and not consumed, such as {missing[:5]}"]
    if url:
        with psycopg.connect(url) as conn:
            lines.append(
                "rows by (owner, redelivered): "
                + repr(
                    conn.execute(
                        "SELECT owner, redelivered, count(*) FROM roost_messages GROUP BY 1, 2"
                    ).fetchall()
                )
            )
            lines.append(
                "nodes: "
                + repr(conn.execute("SELECT epoch, name, dead FROM roost_nodes").fetchall())
            )
    for node in nodes:
        noted = [line for line in node.output if " WARNING " in line or " ERROR " in line]
        lines.append(f"--- node on port {node.port}:\n" + "".join(noted[-30:]))
    return "\n".join(lines)


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
