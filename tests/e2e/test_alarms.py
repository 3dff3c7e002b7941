"""Resource alarms (issue 7): the memory high watermark blocks publishers
and pages queues out so the broker's memory stays bounded under load; the
disk free-space check; how the two disk alarm sources combine."""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import threading
import time
from pathlib import Path

import pika
import pytest
from pamqp import commands as C
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from roost.amqp.wire import PROTOCOL_HEADER
from roost.broker.broker import ALARM_QUEUE_MEMORY_LIMIT, INGRESS_CHECK_BYTES, Broker
from roost.config import ConfigError, load_config
from roost.resources import (
    DISK_ALARM,
    DISK_FREE_SOURCE,
    MEMORY_ALARM,
    ResourceMonitor,
    parse_memory_watermark,
    parse_size,
)
from roost.testing import RoostBroker, RoostProcess
from tests.conftest import RawClient

MB = 1024 * 1024


# -- parsing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.4", 400),
        ("1", 1000),
        ("0.05", 50),
        ("256MB", 256_000_000),
        ("1GiB", 1024**3),
        ("512 MiB", 512 * MB),
        ("2000000", 2_000_000),
        ("1.5GB", 1_500_000_000),
    ],
)
def test_memory_watermark_parsing(text: str, expected: int) -> None:
    assert parse_memory_watermark(text, 1000) == expected


@pytest.mark.parametrize("text", ["0", "-0.5", "", "2x", "MB", "0MB", "nan", "1.2.3"])
def test_memory_watermark_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory_watermark(text, 1000)


def test_size_parsing() -> None:
    assert parse_size("50MB") == 50_000_000
    assert parse_size("0") == 0
    assert parse_size("10kib") == 10240
    assert parse_size("3G") == 3_000_000_000
    with pytest.raises(ValueError):
        parse_size("-1MB")
    with pytest.raises(ValueError):
        parse_size("50 parsecs")


def test_config_validates_alarm_options() -> None:
    cfg = load_config(env={}, overrides={"memory_high_watermark": "1GiB", "disk_free_limit": "1GB"})
    assert (cfg.memory_high_watermark, cfg.disk_free_limit) == ("1GiB", "1GB")
    assert load_config(env={}).memory_high_watermark == "0.4"
    assert load_config(env={}).disk_free_limit == "50MB"
    with pytest.raises(ConfigError, match=r"memory_high_watermark: .*'lots'"):
        load_config(env={"ROOST_MEMORY_HIGH_WATERMARK": "lots"})
    with pytest.raises(ConfigError, match=r"disk_free_limit: .*'5 apples'"):
        load_config(env={}, overrides={"disk_free_limit": "5 apples"})


def test_bad_watermark_is_a_plain_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    SERVE = [sys.executable, "-m", "roost", "serve"]
    out = subprocess.run(
        [*SERVE, "--data-dir", str(tmp_path), "--port", "0", "--memory-high-watermark", "0.4x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "memory_high_watermark" in out.stderr
    assert "Traceback" not in out.stderr


# -- the monitor, with injected readings -------------------------------------


def test_disk_free_check_sets_and_clears(tmp_path: Path) -> None:
    broker = Broker()
    seen: list[tuple[bool, str]] = []
    broker.watch_alarms(lambda blocked, reason: seen.append((blocked, reason)))
    free = [100 * MB]
    mon = ResourceMonitor(
        broker,
        memory_limit=0,
        disk_free_limit=50_000_000,
        data_dir=tmp_path,
        disk_free=lambda path: free[0] if path == tmp_path else 0,
    )
    mon.check()
    assert broker.alarms == set()
    free[0] = 49_999_999
    mon.check()
    assert broker.alarms == {DISK_ALARM}
    mon.check()
    assert seen == [(True, "low on disk")]
    free[0] = 50_000_000
    mon.check()
    assert broker.alarms == set()
    assert seen == [(True, "low on disk"), (False, "")]


def test_disk_free_check_on_a_real_filesystem(tmp_path: Path) -> None:
    """The default reader (shutil.disk_usage) on the data directory: a limit
    beyond any disk sets the alarm, 0 turns the check off."""
    broker = Broker()
    ResourceMonitor(broker, memory_limit=0, disk_free_limit=10**18, data_dir=tmp_path).check()
    assert broker.alarms == {DISK_ALARM}
    other = Broker()
    ResourceMonitor(other, memory_limit=0, disk_free_limit=0, data_dir=tmp_path).check()
    assert other.alarms == set()


def test_disk_alarm_sources_combine(tmp_path: Path) -> None:
    """Free space and failing writes both raise "disk": it clears only when
    neither holds it any more, in either order."""
    broker = Broker()
    free = [0]
    mon = ResourceMonitor(
        broker, memory_limit=0, disk_free_limit=1000, data_dir=tmp_path, disk_free=lambda p: free[0]
    )
    mon.check()
    broker.set_alarm(DISK_ALARM)  # as the store does when writes fail
    free[0] = 10**6
    mon.check()
    assert broker.alarms == {DISK_ALARM}  # writes still failing
    broker.clear_alarm(DISK_ALARM)
    assert broker.alarms == set()
    broker.set_alarm(DISK_ALARM)
    free[0] = 0
    mon.check()
    broker.clear_alarm(DISK_ALARM)  # writes work again, but the disk is full
    assert broker.alarms == {DISK_ALARM}
    assert broker.has_alarm(DISK_ALARM, DISK_FREE_SOURCE)
    free[0] = 10**6
    mon.check()
    assert broker.alarms == set()


def test_memory_check_hysteresis_and_queue_limit(tmp_path: Path) -> None:
    broker = Broker(queue_memory_limit=64 * MB)
    used = [90 * MB]
    mon = ResourceMonitor(
        broker,
        memory_limit=100 * MB,
        disk_free_limit=0,
        data_dir=tmp_path,
        rss=lambda: used[0],
    )
    mon.check()
    assert broker.alarms == set()
    assert broker.vhosts["/"].queue_memory_limit == 64 * MB
    used[0] = 101 * MB
    mon.check()
    assert broker.alarms == {MEMORY_ALARM}
    # Queues page new messages out meanwhile, in vhosts added later too.
    assert broker.vhosts["/"].queue_memory_limit == ALARM_QUEUE_MEMORY_LIMIT
    assert broker.add_vhost("later").queue_memory_limit == ALARM_QUEUE_MEMORY_LIMIT
    used[0] = 99 * MB  # just under the watermark: not yet
    mon.check()
    assert broker.alarms == {MEMORY_ALARM}
    used[0] = 80 * MB
    mon.check()
    assert broker.alarms == set()
    assert broker.vhosts["/"].queue_memory_limit == 64 * MB
    assert broker.vhosts["later"].queue_memory_limit == 64 * MB


def test_memory_alarm_pages_out_what_queues_hold() -> None:
    """When the memory alarm goes off, queues page their in-memory tail out
    to the message log (transient and persistent messages alike) down to
    ~ALARM_QUEUE_MEMORY_LIMIT; entries already delivered once stay in
    memory. Order, bodies and redelivered flags survive. (Priority queues:
    tests/e2e/queue_features/test_priority_paging.py.)"""
    body_size = 10 * 1024
    n = 300
    with RoostBroker(http_port=-1) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.queue_declare("tail")
        ch.queue_declare("dtail", durable=True)
        for i in range(n):
            body = str(i).encode().ljust(body_size, b".")
            ch.basic_publish("", "tail", body)
            ch.basic_publish("", "dtail", body, pika.BasicProperties(delivery_mode=2))
        # Five deliveries requeued: they go back to the head, redelivered.
        tags = []
        for _ in range(5):
            method, _props, _body = ch.basic_get("tail")
            assert method is not None
            tags.append(method.delivery_tag)
        ch.basic_nack(tags[-1], multiple=True, requeue=True)
        vh = b.server.broker.vhosts["/"]  # type: ignore[union-attr]

        def state(name: str) -> tuple[int, int, int]:
            q = vh.queues[name]
            in_memory = q.backing.in_memory()
            return in_memory, len(q.backing) - in_memory, q.memory_estimate()

        assert b.call(lambda: state("tail"))[1] == 0  # all in memory so far
        b.call(lambda: b.server.broker.set_alarm(MEMORY_ALARM))  # type: ignore[union-attr]
        for name in ("tail", "dtail"):
            ready, paged, memory = b.call(functools.partial(state, name))
            assert ready + paged == n
            assert paged > n // 2, (name, ready, paged)
            assert memory <= ALARM_QUEUE_MEMORY_LIMIT + n * 24, (name, memory)
        b.call(lambda: b.server.broker.clear_alarm(MEMORY_ALARM))  # type: ignore[union-attr]

        for name in ("tail", "dtail"):
            got: list[tuple[int, bool]] = []
            for _ in range(n):
                method, _props, body = ch.basic_get(name, auto_ack=True)
                assert method is not None and len(body) == body_size
                got.append((int(body.rstrip(b".")), bool(method.redelivered)))
            assert [i for i, _ in got] == list(range(n))
            assert [i for i, redelivered in got if redelivered] == (
                [0, 1, 2, 3, 4] if name == "tail" else []
            )
        conn.close()


def test_blocked_reason_names_every_alarm() -> None:
    broker = Broker()
    seen: list[tuple[bool, str]] = []
    broker.watch_alarms(lambda blocked, reason: seen.append((blocked, reason)))
    broker.set_alarm(MEMORY_ALARM)
    broker.set_alarm(DISK_ALARM)  # already blocked: no second notification
    # What a connection opening now is told (RabbitMQ's wording).
    assert broker.blocked_reason == "low on disk & memory"
    broker.clear_alarm(MEMORY_ALARM)
    broker.clear_alarm(DISK_ALARM)
    assert seen == [(True, "low on memory"), (False, "")]


def test_memory_is_checked_between_ticks_as_clients_send(tmp_path: Path) -> None:
    """A publisher can send hundreds of MB a second: besides its periodic
    tick the memory check runs after every INGRESS_CHECK_BYTES read."""
    broker = Broker()
    used = [200 * MB]
    mon = ResourceMonitor(
        broker, memory_limit=100 * MB, disk_free_limit=0, data_dir=tmp_path, rss=lambda: used[0]
    )
    used[0] = 10 * MB
    mon.start(lambda _delay, _fn: None)  # the periodic tick never comes
    assert broker.alarms == set()
    used[0] = 200 * MB
    broker.received(INGRESS_CHECK_BYTES // 2)
    assert broker.alarms == set()
    broker.received(INGRESS_CHECK_BYTES // 2 + 1)
    assert broker.alarms == {MEMORY_ALARM}
    mon.stop()
    used[0] = 10 * MB
    broker.received(2 * INGRESS_CHECK_BYTES)  # stopped: nothing checks
    assert broker.alarms == {MEMORY_ALARM}


def test_blocked_publisher_is_not_dropped_for_missed_heartbeats() -> None:
    """While a publisher is blocked the broker does not read its socket, so
    its heartbeats cannot arrive: like RabbitMQ, roost stops watching them
    then, instead of dropping the connection after two intervals."""
    with RoostBroker(http_port=-1) as b:
        client = RawClient(b.port)
        client.handshake(heartbeat=1)
        client.open_channel(1)
        client.send_frame(C.Confirm.Select(), 1)
        client.expect(C.Confirm.SelectOk)
        b.call(lambda: b.server.broker.set_alarm(MEMORY_ALARM))  # type: ignore[union-attr]
        blocked = client.expect(C.Connection.Blocked)
        assert isinstance(blocked, C.Connection.Blocked)
        publish = (
            pframe.marshal(C.Basic.Publish(exchange="", routing_key="hb"), 1)
            + pframe.marshal(ContentHeader(0, 2, C.Basic.Properties()), 1)
            + pframe.marshal(ContentBody(b"hi"), 1)
        )
        client.send(publish)  # read (and confirmed), then reading pauses
        first = client.expect(C.Basic.Ack)
        assert isinstance(first, C.Basic.Ack) and first.delivery_tag == 1
        deadline = time.monotonic() + 3.5  # over 3 heartbeat intervals
        while time.monotonic() < deadline:
            client.send(pframe.marshal(Heartbeat(), 0))  # not read: blocked
            client.expect(Heartbeat, skip_heartbeats=False)  # the broker's own
        b.call(lambda: b.server.broker.clear_alarm(MEMORY_ALARM))  # type: ignore[union-attr]
        client.expect(C.Connection.Unblocked)
        client.send(publish)
        ack = client.expect(C.Basic.Ack)
        assert isinstance(ack, C.Basic.Ack) and ack.delivery_tag == 2
        client.close()


def test_disk_limit_blocks_clients_of_a_running_broker() -> None:
    """An impossible disk_free_limit blocks publishers from the start: a
    client that announces connection.blocked is told so once open."""
    with RoostBroker(disk_free_limit="1000000TB") as b:
        server = b.server
        assert server is not None
        assert b.call(lambda: set(server.broker.alarms)) == {DISK_ALARM}
        assert server.broker.disk_free_limit == 10**18  # as the management API reports
        pub = _Publisher(b.port, "q", b"")
        try:
            assert pub.blocked.wait(5)
            assert pub.events == ["blocked:low on disk"]
        finally:
            pub.close()


# -- under load --------------------------------------------------------------


def _rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Publisher:
    """A raw publisher with confirms that sends as fast as the socket takes
    frames and stops sending (between batches) once it is blocked."""

    def __init__(self, port: int, queue: str, body: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.queue = queue
        self.body = body
        self.sent = 0
        self.acked = 0
        self.nacked = 0
        self.events: list[str] = []
        self.blocked = threading.Event()
        self.unblocked = threading.Event()
        self.is_blocked = False  # as of the last blocked/unblocked seen
        self.stop = threading.Event()
        self._handshake()
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _frame(self, frame: object, channel: int = 0) -> bytes:
        return pframe.marshal(frame, channel)  # type: ignore[arg-type]

    def _recv(self) -> object:
        while True:
            if len(self.buf) >= 7:
                size = struct.unpack(">I", self.buf[3:7])[0]
                if len(self.buf) >= size + 8:
                    n, _ch, fr = pframe.unmarshal(self.buf[: size + 8])
                    self.buf = self.buf[n:]
                    return fr
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by broker")
            self.buf += data

    def _expect(self, cls: type) -> object:
        while True:
            fr = self._recv()
            if isinstance(fr, C.Connection.Blocked):  # sent at once while an alarm is set
                self.events.append("blocked:" + fr.reason)
                self.is_blocked = True
                self.blocked.set()
                continue
            assert isinstance(fr, cls), fr
            return fr

    def _handshake(self) -> None:
        s = self.sock
        s.sendall(PROTOCOL_HEADER)
        self._expect(C.Connection.Start)
        caps: FieldTable = {"connection.blocked": True, "publisher_confirms": True}
        s.sendall(
            self._frame(
                C.Connection.StartOk(
                    client_properties={"capabilities": caps},
                    mechanism="PLAIN",
                    response="\0guest\0guest",
                )
            )
        )
        tune = self._expect(C.Connection.Tune)
        assert isinstance(tune, C.Connection.Tune)
        s.sendall(
            self._frame(C.Connection.TuneOk(channel_max=16, frame_max=tune.frame_max, heartbeat=0))
        )
        s.sendall(self._frame(C.Connection.Open(virtual_host="/")))
        self._expect(C.Connection.OpenOk)
        s.sendall(self._frame(C.Channel.Open(), 1))
        self._expect(C.Channel.OpenOk)
        s.sendall(self._frame(C.Queue.Declare(queue=self.queue), 1))
        self._expect(C.Queue.DeclareOk)
        s.sendall(self._frame(C.Confirm.Select(), 1))
        self._expect(C.Confirm.SelectOk)

    def _read(self) -> None:
        try:
            while True:
                fr = self._recv()
                if isinstance(fr, C.Basic.Ack):
                    self.acked = fr.delivery_tag if fr.multiple else self.acked + 1
                elif isinstance(fr, C.Basic.Nack):
                    self.nacked += 1
                elif isinstance(fr, C.Connection.Blocked):
                    self.events.append("blocked:" + fr.reason)
                    self.is_blocked = True
                    self.blocked.set()
                elif isinstance(fr, C.Connection.Unblocked):
                    self.events.append("unblocked")
                    self.is_blocked = False
                    self.unblocked.set()
        except (OSError, ConnectionError):
            pass

    def _batch(self, batch: int) -> bytes:
        one = (
            self._frame(C.Basic.Publish(exchange="", routing_key=self.queue), 1)
            + self._frame(ContentHeader(0, len(self.body), C.Basic.Properties()), 1)
            + self._frame(ContentBody(self.body), 1)
        )
        return one * batch

    def publish_until_blocked(self, cap: int, batch: int = 200) -> None:
        chunk = self._batch(batch)
        while self.sent < cap and not self.blocked.is_set() and not self.stop.is_set():
            try:
                self.sock.sendall(chunk)
            except OSError:
                return  # closed at the end of the test
            self.sent += batch

    def publish_through_alarms(self, total: int, batch: int = 200) -> None:
        """Send ``total`` messages, holding back (between batches) while
        the connection is blocked, as a well-behaved client does."""
        chunk = self._batch(batch)
        while self.sent < total and not self.stop.is_set():
            if self.is_blocked:
                time.sleep(0.005)
                continue
            try:
                self.sock.sendall(chunk)
            except OSError:
                return
            self.sent += batch

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_memory_watermark_bounds_memory_under_load(tmp_path: Path) -> None:
    """Publish 120 MB (with confirms, no consumer) to a broker whose
    watermark is 40 MB above its idle RSS. The alarm blocks the publisher;
    the queue pages what it holds out to the message log, memory falls,
    the alarm clears and the publisher carries on, until all of it is
    queued. The RSS stays under the watermark plus MARGIN (what arrives
    between two checks) throughout, and a consumer then gets every
    message."""
    MARGIN = 64 * MB
    body = b"x" * 4096
    total = 30_000
    queue = "alarm-load"
    probe = RoostProcess(tmp_path / "probe", "--http-port", "-1").start()
    try:
        assert probe.proc is not None
        time.sleep(0.3)  # let start-up allocations settle before measuring
        idle = _rss_of(probe.proc.pid)
    finally:
        probe.close()
    watermark = idle + 40 * MB
    roost = RoostProcess(
        tmp_path / "data", "--http-port", "-1", "--memory-high-watermark", str(watermark)
    ).start()
    try:
        assert roost.proc is not None
        pid = roost.proc.pid
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], _rss_of(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        pub = _Publisher(roost.port, queue, body)
        writer = threading.Thread(target=pub.publish_through_alarms, args=(total,), daemon=True)
        writer.start()
        try:
            assert pub.blocked.wait(20), f"never blocked; sent {pub.sent}"
            assert pub.events[0] == "blocked:low on memory"
            # Without a consumer, only paging out lets the publisher go on.
            writer.join(60)
            assert not writer.is_alive(), f"still blocked after {pub.sent} of {total}"
            _wait(lambda: pub.acked == total, 20, "all confirms")
            assert pub.nacked == 0
            assert peak[0] < watermark + MARGIN, (peak[0] - idle) // MB
            assert pub.events[::2] == ["blocked:low on memory"] * ((len(pub.events) + 1) // 2)
            assert set(pub.events[1::2]) <= {"unblocked"}

            consumer = pika.BlockingConnection(pika.URLParameters(roost.url))
            try:
                ch = consumer.channel()
                ch.basic_qos(prefetch_count=2000)
                got = 0
                for method, _props, got_body in ch.consume(
                    queue, auto_ack=True, inactivity_timeout=5.0
                ):
                    assert method is not None, f"stalled after {got} of {total}"
                    assert got_body == body
                    got += 1
                    if got == total:
                        break
                ch.cancel()
            finally:
                consumer.close()
            assert got == total
            # In the end the alarm clears.
            _wait(lambda: pub.events[-1] == "unblocked", 10, "connection.unblocked")
            assert peak[0] < watermark + MARGIN, (peak[0] - idle) // MB
        finally:
            pub.stop.set()
            pub.close()
            sampling.set()
    finally:
        roost.close()


def test_memory_check_leaves_other_alarms_alone(tmp_path: Path) -> None:
    """An alarm set by something else (here by hand) outlives the checks that
    find memory fine, and the watermark's own alarm clears only its part."""
    broker = Broker()
    used = [10 * MB]
    mon = ResourceMonitor(
        broker, memory_limit=100 * MB, disk_free_limit=0, data_dir=tmp_path, rss=lambda: used[0]
    )
    broker.set_alarm(MEMORY_ALARM)
    mon.check()
    assert broker.alarms == {MEMORY_ALARM}
    used[0] = 200 * MB
    mon.check()
    used[0] = 10 * MB
    mon.check()
    assert broker.alarms == {MEMORY_ALARM}
    broker.clear_alarm(MEMORY_ALARM)
    assert broker.alarms == set()
