"""Regression tests for the confirmed-message losses and resurrections of
issue 11: each combines features that passed their own tests, and each
failed on the code before the backing-queue redesign.

Where a defect is an ordering between two disk writes, the test holds one
of them (blocks the store's writer thread, or the definitions write) and
checks that what must come after it has not happened yet, instead of
hoping a SIGKILL lands in a microsecond window.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pamqp import commands as C
from pamqp import frame as pframe

from roost.broker.broker import Broker
from roost.store import dedup_state, definitions
from roost.store.durable_state import DurableState
from roost.testing import RoostBroker, RoostProcess
from tests.conftest import RawClient
from tests.store.helpers import connect, drain, message_count, publish_frames


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[RoostProcess]:
    p = RoostProcess(
        tmp_path / "data",
        "--segment-size",
        "65536",
        "--queue-memory-limit",
        "1",
        "--http-port",
        "-1",
    )
    try:
        yield p.start()
    finally:
        p.close()
        print("".join(p.output))  # shown when a test fails


def confirmed_publish(port: int, exchange: str, key: str, bodies: list[bytes]) -> None:
    """Publish persistent messages with confirms; return once all are confirmed."""
    conn = connect(port)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(exchange, key, body, properties=persistent())
    finally:
        conn.close()


def persistent() -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2)


def barrier(port: int) -> None:
    """Make earlier acks durable: a confirmed persistent publish after them
    (a batch writes its records, then its .acks; a confirm comes after)."""
    conn = connect(port)
    try:
        ch = conn.channel()
        ch.queue_declare("barrier", durable=True)
        ch.confirm_delivery()
        ch.basic_publish("", "barrier", b"b", properties=persistent())
    finally:
        conn.close()


def ack_matching(port: int, queue: str, keep: Callable[[bytes], bool]) -> int:
    """Consume every message of ``queue``, acking those ``keep`` rejects and
    leaving the others unacked (requeued when the connection closes)."""
    conn = connect(port)
    acked = 0
    try:
        ch = conn.channel()
        n = ch.queue_declare(queue, passive=True).method.message_count
        for _ in range(n):
            method, _, body = ch.basic_get(queue)
            assert method is not None
            if not keep(body):
                ch.basic_ack(method.delivery_tag)
                acked += 1
    finally:
        conn.close()
    return acked


# -- defect 1: a paged copy in a non-durable queue redirected durable acks ---


def test_paging_a_fanned_out_copy_keeps_the_durable_queues_acks(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.exchange_declare("fx", "fanout", durable=True)
    # The non-durable queue first: it pages its copy before the durable
    # queue takes its reference.
    ch.queue_declare("transient-q", durable=False)
    ch.queue_declare("durable-q", durable=True)
    ch.queue_bind("transient-q", "fx")
    ch.queue_bind("durable-q", "fx")
    conn.close()
    # queue_memory_limit 1: both queues page every message to the log.
    confirmed_publish(proc.port, "fx", "", [b"m%d" % i for i in range(200)])
    assert ack_matching(proc.port, "durable-q", lambda body: int(body[1:]) % 2 == 1) == 100
    barrier(proc.port)
    proc.kill()
    proc.restart()
    # Exactly the unacked half, once each: no acked one back, none lost.
    got = sorted(int(body[1:]) for body, _ in drain(proc.port, "durable-q"))
    assert got == list(range(1, 200, 2))
    ack_matching(proc.port, "durable-q", lambda body: False)
    proc.terminate()
    proc.restart()
    assert message_count(proc.port, "durable-q") == 0


# -- defect 5: a drop-head queue that cannot take a message at all ----------


@pytest.mark.parametrize(
    "args",
    [{"x-max-length": 0}, {"x-max-length-bytes": 10}],
    ids=["max-length-0", "body-over-max-bytes"],
)
def test_a_message_a_queue_can_never_hold_is_not_logged_for_it(
    proc: RoostProcess, args: dict[str, Any]
) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("dlq", durable=True)
    dl = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq"}
    ch.queue_declare("tiny", durable=True, arguments={**args, **dl})
    conn.close()
    confirmed_publish(proc.port, "", "tiny", [b"x" * 100])
    assert message_count(proc.port, "tiny") == 0
    assert message_count(proc.port, "dlq") == 1
    proc.kill()
    proc.restart()
    assert message_count(proc.port, "tiny") == 0
    assert [body for body, _ in drain(proc.port, "dlq")] == ["x" * 100]


# -- defect 2: ids on disk are never handed out again ------------------------


def test_an_id_records_carry_is_never_given_to_a_new_queue(proc: RoostProcess) -> None:
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("keep", durable=True)
    ch.queue_declare("old", durable=True)
    conn.close()
    confirmed_publish(proc.port, "", "keep", [b"kept"])
    confirmed_publish(proc.port, "", "old", [b"stale"])
    proc.terminate()
    # A definitions file whose counter went back: "old" recorded as deleted
    # (its records still on disk), the counter at its start.
    path = proc.data_dir / definitions.FILENAME
    data = json.loads(path.read_text())
    old_id = next(i for v, n, i in data["roost"]["queue_ids"] if n == "old")
    data["queues"] = [q for q in data["queues"] if q["name"] != "old"]
    data["roost"]["queue_ids"] = [e for e in data["roost"]["queue_ids"] if e[1] != "old"]
    data["roost"]["next_queue_id"] = 1
    data["roost"]["deleted_ids"] = [old_id]
    path.write_text(json.dumps(data))
    proc.restart()
    conn = connect(proc.port)
    conn.channel().queue_declare("new", durable=True)
    conn.close()
    proc.terminate()
    proc.restart()
    assert message_count(proc.port, "new") == 0
    assert [body for body, _ in drain(proc.port, "keep")] == ["kept"]


# -- ordering of writes, checked by holding one of them -------------------


class Hold:
    """Blocks the calls ``wrap`` is given while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.release = threading.Event()
        self.held = threading.Event()

    def wrap(self, fn: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
        def held(*args: Any) -> Any:
            if self.armed and when(*args):
                self.held.set()
                self.release.wait(20)
            return fn(*args)

        return held


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RoostBroker]:
    b = RoostBroker(data_dir=str(tmp_path / "data"), segment_size=65536, http_port=-1)
    with b:
        yield b


def state_of(b: RoostBroker) -> DurableState:
    assert b.server is not None and b.server.state is not None
    return b.server.state


def broker_of(b: RoostBroker) -> Broker:
    assert b.server is not None
    return b.server.broker


def open_confirming(port: int, channels: tuple[int, ...] = (1,)) -> RawClient:
    client = RawClient(port)
    client.handshake()
    for n in channels:
        client.open_channel(n)
        client.send_frame(C.Confirm.Select(), n)
        client.expect(C.Confirm.SelectOk)
    return client


def frames_within(client: RawClient, seconds: float) -> list[object]:
    """Every frame the broker sends within ``seconds``."""
    got: list[object] = []
    end = time.monotonic() + seconds
    client.sock.settimeout(0.1)
    try:
        while time.monotonic() < end:
            try:
                got.append(client.recv_frame()[1])
            except TimeoutError:
                continue
    finally:
        client.sock.settimeout(5.0)
    return got


def block_writer(b: RoostBroker) -> threading.Event:
    """Hold the store's writer thread until the returned event is set."""
    release = threading.Event()

    def wait() -> None:
        release.wait(20)

    b.call(lambda: state_of(b).store.run_in_writer(wait))
    return release


def test_confirm_waits_for_the_queue_declared_in_the_same_read(
    broker: RoostBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = connect(broker.port)
    conn.channel().queue_declare("existing", durable=True)
    conn.close()
    hold = Hold()
    monkeypatch.setattr(
        definitions,
        "write_atomic",
        hold.wrap(definitions.write_atomic, lambda path, _: path.name == definitions.FILENAME),
    )
    client = open_confirming(broker.port)
    hold.armed = True
    try:
        # One write: a publish (scheduling a batch), the declaration of a
        # durable queue (nowait) and a persistent publish to it.
        client.send(
            publish_frames("", "existing", b"a", "a")
            + pframe_marshal(C.Queue.Declare(queue="fresh", durable=True, nowait=True))
            + publish_frames("", "fresh", b"b", "b")
        )
        early = frames_within(client, 1.5)
        assert hold.held.is_set()
        assert not [f for f in early if isinstance(f, C.Basic.Ack)], (
            "a confirm went out before definitions.json held the queue"
        )
    finally:
        hold.release.set()
    acked = [f for f in frames_within(client, 2.0) if isinstance(f, C.Basic.Ack)]
    assert acked and max(f.delivery_tag for f in acked) == 2
    client.close()


def pframe_marshal(method: object, channel: int = 1) -> bytes:
    return pframe.marshal(method, channel)  # type: ignore[arg-type]


def test_duplicate_is_confirmed_only_once_the_original_is_durable(
    broker: RoostBroker,
) -> None:
    conn = connect(broker.port)
    conn.channel().queue_declare(
        "dedup-q", durable=True, arguments={"x-message-deduplication": True}
    )
    conn.close()
    client = open_confirming(broker.port, (1, 2))
    release = block_writer(broker)
    try:
        original = publish_frames("", "dedup-q", b"first", "same-id")
        duplicate = publish_frames("", "dedup-q", b"again", "same-id").replace(
            b"\x00\x01", b"\x00\x02", 1
        )
        client.send(original + _on_channel(duplicate, 2))
        early = frames_within(client, 1.0)
        assert not [f for f in early if isinstance(f, C.Basic.Ack)], (
            "the duplicate was confirmed before its original was on disk"
        )
    finally:
        release.set()
    acks = [f for f in frames_within(client, 2.0) if isinstance(f, C.Basic.Ack)]
    assert len(acks) == 2
    client.close()
    assert message_count(broker.port, "dedup-q") == 1


def _on_channel(frames: bytes, channel: int) -> bytes:
    """The same frames on another channel (bytes 1-2 of each frame)."""
    out = bytearray()
    pos = 0
    while pos < len(frames):
        size = int.from_bytes(frames[pos + 3 : pos + 7], "big")
        frame = bytearray(frames[pos : pos + size + 8])
        frame[1:3] = channel.to_bytes(2, "big")
        out += frame
        pos += size + 8
    return bytes(out)


def test_dedup_key_is_written_only_after_its_message(
    broker: RoostBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    segments = Path(broker.config.data_dir) / "messages"
    seen: list[bool] = []
    real = dedup_state._write

    def checked(path: Path, content: bytes | None) -> None:
        if content is not None and b"key-1" in content:
            seen.append(any(b"BODY-MARKER" in p.read_bytes() for p in segments.glob("*.seg")))
        real(path, content)

    monkeypatch.setattr(dedup_state, "_write", checked)
    conn = connect(broker.port)
    ch = conn.channel()
    ch.queue_declare("dq", durable=True, arguments={"x-message-deduplication": True})
    ch.confirm_delivery()
    ch.basic_publish(
        "",
        "dq",
        b"BODY-MARKER",
        properties=pika.BasicProperties(delivery_mode=2, message_id="key-1"),
    )
    conn.close()
    assert seen == [True], "the dedup key was made durable before its message"


def test_purge_ok_waits_until_the_purge_is_durable(broker: RoostBroker) -> None:
    confirmed_publish_setup(broker.port, "pq", 5)
    client = RawClient(broker.port)
    client.handshake()
    client.open_channel(1)
    release = block_writer(broker)
    try:
        client.send_frame(C.Queue.Purge(queue="pq"), 1)
        early = frames_within(client, 1.0)
        assert not [f for f in early if isinstance(f, C.Queue.PurgeOk)], (
            "purge-ok went out before the purge was on disk"
        )
    finally:
        release.set()
    ok = [f for f in frames_within(client, 2.0) if isinstance(f, C.Queue.PurgeOk)]
    assert len(ok) == 1 and ok[0].message_count == 5
    client.close()


def confirmed_publish_setup(port: int, queue: str, n: int) -> None:
    conn = connect(port)
    conn.channel().queue_declare(queue, durable=True)
    conn.close()
    confirmed_publish(port, "", queue, [b"%d" % i for i in range(n)])


def test_segments_of_a_deleted_queue_outlive_its_definitions(
    broker: RoostBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    segments = Path(broker.config.data_dir) / "messages"
    conn = connect(broker.port)
    ch = conn.channel()
    ch.queue_declare("victim", durable=True)
    ch.queue_declare("other", durable=True)
    conn.close()
    # The victim fills the first 64 KiB segment; "other" rolls past it.
    confirmed_publish(broker.port, "", "victim", [b"v" * 8000 for _ in range(12)])
    confirmed_publish(broker.port, "", "other", [b"o" * 8000 for _ in range(12)])
    first = sorted(segments.glob("*.seg"))[0]
    hold = Hold()
    monkeypatch.setattr(
        definitions,
        "write_atomic",
        hold.wrap(definitions.write_atomic, lambda path, _: path.name == definitions.FILENAME),
    )
    hold.armed = True
    try:
        broker.call(lambda: broker_of(broker).vhosts["/"].delete_queue("victim", owner=None))
        assert hold.held.wait(5)
        time.sleep(0.5)
        assert first.exists(), "a segment was unlinked before definitions dropped its queue"
    finally:
        hold.release.set()
    deadline = time.monotonic() + 5
    while first.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not first.exists()


# -- defect 4: start-up never deletes what it cannot attribute ---------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _serve_once(data_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "roost", "serve", "--port", "0", "--http-port", "-1"]
    try:
        return subprocess.run(
            [*cmd, "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("roost started (and served) on definitions it should refuse") from exc


RABBITMQ_EXPORT = {
    "rabbit_version": "3.10.8",
    "users": [],
    "vhosts": [{"name": "/"}],
    "permissions": [],
    "queues": [{"name": "q", "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}],
    "exchanges": [],
    "bindings": [],
}


def _break(kind: str, path: Path) -> None:
    data = json.loads(path.read_text())
    if kind == "missing":
        path.unlink()
        return
    if kind == "empty":
        data = {}
    elif kind == "invalid-arguments":
        data["queues"][0]["arguments"] = {"x-max-length": "many"}
    elif kind == "changed-id":
        data["roost"]["queue_ids"][0][2] = 99
        data["roost"]["next_queue_id"] = 100
    elif kind == "rabbitmq-export":
        data = RABBITMQ_EXPORT
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "invalid-arguments", "changed-id", "rabbitmq-export"]
)
def test_start_up_refuses_unattributable_messages_and_changes_nothing(
    proc: RoostProcess, kind: str
) -> None:
    conn = connect(proc.port)
    conn.channel().queue_declare("q", durable=True)
    conn.close()
    confirmed_publish(proc.port, "", "q", [b"precious-%d" % i for i in range(280)])
    proc.terminate()
    _break(kind, proc.data_dir / definitions.FILENAME)
    before = _snapshot(proc.data_dir / "messages")
    out = _serve_once(proc.data_dir)
    assert out.returncode == 1, out.stderr
    assert "refuses to start" in out.stderr and "280 unsettled" in out.stderr, out.stderr
    assert _snapshot(proc.data_dir / "messages") == before


def _stopped_with_queues(proc: RoostProcess) -> None:
    """Queues q and r, one message each, and the broker stopped."""
    conn = connect(proc.port)
    ch = conn.channel()
    ch.queue_declare("q", durable=True)
    ch.queue_declare("r", durable=True)
    conn.close()
    confirmed_publish(proc.port, "", "q", [b"in-q"])
    confirmed_publish(proc.port, "", "r", [b"in-r"])
    proc.terminate()


def _export(path: Path, *queues: str) -> None:
    """A RabbitMQ export defining durable ``queues`` (in that order)."""
    export = dict(RABBITMQ_EXPORT)
    export["queues"] = [
        {"name": n, "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}
        for n in queues
    ]
    path.write_text(json.dumps(export))


def _import(data_dir: Path, source: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "roost", "definitions", "import", str(source)]
    return subprocess.run(
        [*cmd, "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=30
    )


def test_importing_a_rabbitmq_export_never_remaps_stored_messages(
    proc: RoostProcess, tmp_path: Path
) -> None:
    _stopped_with_queues(proc)
    _export(tmp_path / "rabbit.json", "s", "r", "q")  # new and existing, in another order
    out = _import(proc.data_dir, tmp_path / "rabbit.json")
    assert out.returncode == 0, out.stderr
    proc.restart()
    assert [b for b, _ in drain(proc.port, "q")] == ["in-q"]
    assert [b for b, _ in drain(proc.port, "r")] == ["in-r"]
    assert message_count(proc.port, "s") == 0


def test_import_refuses_a_data_directory_whose_definitions_lost_their_ids(
    proc: RoostProcess, tmp_path: Path
) -> None:
    _stopped_with_queues(proc)
    # definitions.json replaced by a RabbitMQ export listing the queues in
    # another order: ids handed out now would give q's messages to r.
    path = proc.data_dir / definitions.FILENAME
    _export(path, "r", "q")
    before = path.read_bytes()
    _export(tmp_path / "more.json")
    out = _import(proc.data_dir, tmp_path / "more.json")
    assert out.returncode == 1 and "has no roost section" in out.stderr, out.stderr
    assert path.read_bytes() == before
