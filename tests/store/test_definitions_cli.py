"""``roost definitions export|import`` on a stopped broker's data directory,
checked with RabbitMQ's own export and by serving the result."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.exceptions import (
    ChannelClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from roost.broker.users import check_password
from roost.cli import main
from roost.testing import RoostProcess

# `rabbitmqctl export_definitions` from RabbitMQ 3.10.8, trimmed to the
# objects made for it: users alice/secret (tags monitoring), bob/hunter2 and
# guest/guest; vhost defs-vh; durable exchanges of each type (one with an
# alternate exchange); queues with arguments; bindings including headers
# arguments and an exchange-to-exchange binding (events -> audit).
RABBITMQ_DEFS = Path(__file__).parent / "data" / "rabbitmq-3.10-definitions.json"
SUMMARY = "3 users, 2 vhosts, 5 permissions, 6 exchanges, 5 queues, 6 bindings"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``roost definitions ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main(["definitions", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _roost(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``roost definitions ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "roost", "definitions", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _saved(data_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((data_dir / "definitions.json").read_text())
    return data


def _ids(data_dir: Path) -> dict[tuple[str, str], int]:
    return {(v, n): i for v, n, i in _saved(data_dir)["roost"]["queue_ids"]}


def _keyed(data: dict[str, Any], section: str, fields: tuple[str, ...]) -> set[str]:
    """A section as a set of canonical JSON strings of the given fields."""
    return {json.dumps({f: e.get(f) for f in fields}, sort_keys=True) for e in data[section] if e}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RoostProcess]:
    """`roost serve` on the data directory the fixture was imported into."""
    data_dir = tmp_path / "data"
    rc = main(["definitions", "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS)])
    assert rc == 0
    proc = RoostProcess(data_dir)
    try:
        yield proc.start()
    finally:
        proc.close()


def _connect(proc: RoostProcess, user: str, password: str, vhost: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            proc.host,
            proc.port,
            vhost,
            pika.PlainCredentials(user, password),
            connection_attempts=1,
        )
    )


# -- export ---------------------------------------------------------------


def test_export_of_a_fresh_data_dir_is_what_serve_starts_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "never-used"
    out_file = tmp_path / "defs.json"
    rc, out, err = _run(capsys, "export", "--data-dir", str(data_dir), str(out_file))
    assert rc == 0, err
    assert out == ""
    data = json.loads(out_file.read_text())
    assert "roost" not in data
    assert [(u["name"], u["tags"], u["hashing_algorithm"]) for u in data["users"]] == [
        ("guest", ["administrator"], "rabbit_password_hashing_sha256")
    ]
    assert check_password("guest", data["users"][0]["password_hash"])
    assert [v["name"] for v in data["vhosts"]] == ["/"]
    assert data["permissions"] == [
        {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    ]
    assert data["exchanges"] == data["queues"] == data["bindings"] == []
    assert "exported 1 user, 1 vhost, 1 permission, 0 exchanges, 0 queues, 0 bindings" in err
    assert not data_dir.exists()  # a read-only command creates nothing
    assert out_file.stat().st_mode & 0o077 == 0  # it holds password hashes


def test_export_takes_the_default_user_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "roost.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "d"}"\ndefault_user = "admin"\ndefault_password = "s3"\n'
    )
    rc, out, err = _run(capsys, "export", "--config", str(config), "-")
    assert rc == 0, err
    data = json.loads(out)
    assert [u["name"] for u in data["users"]] == ["admin"]
    assert check_password("s3", data["users"][0]["password_hash"])
    assert str(tmp_path / "d") in err


# -- import of RabbitMQ's own export, then serve ----------------------------


def test_import_of_rabbitmq_definitions_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "new" / "data"
    rc, out, err = _run(capsys, "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))
    assert rc == 0, err
    assert out == ""
    assert f"roost: imported {SUMMARY} from {RABBITMQ_DEFS} into {data_dir}" in err
    assert "problem" not in err and "warning" not in err
    saved = _saved(data_dir)
    # Every durable queue got its own id in the message log.
    ids = _ids(data_dir)
    assert set(ids) == {
        ("defs-vh", q) for q in ("orders.new", "pdf-jobs", "events.all", "dead", "work")
    }
    assert len(set(ids.values())) == 5
    assert saved["roost"]["next_queue_id"] > max(ids.values())


def test_imported_user_logs_in_with_the_rabbitmq_password(served: RoostProcess) -> None:
    conn = _connect(served, "alice", "secret", "defs-vh")
    assert conn.is_open
    conn.close()
    with pytest.raises(ProbableAuthenticationError):
        _connect(served, "alice", "wrong", "defs-vh")
    # guest's hash came from RabbitMQ too.
    _connect(served, "guest", "guest", "/").close()
    # Connecting to defs-vh above shows the vhost was imported: an unknown
    # one is refused.
    with pytest.raises(ProbableAccessDeniedError) as info:
        _connect(served, "alice", "secret", "no-such-vhost")
    assert "(530) 'NOT_ALLOWED - vhost no-such-vhost not found'" in str(info.value)


def test_imported_exchanges_queues_and_bindings_route(served: RoostProcess) -> None:
    conn = _connect(served, "alice", "secret", "defs-vh")
    ch = conn.channel()
    ch.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    ch.basic_publish("orders", "new", b"order-1", persistent)
    ch.basic_publish(
        "by-header",
        "",
        b"report",
        pika.BasicProperties(headers={"format": "pdf", "type": "report"}),
    )
    ch.basic_publish("by-header", "", b"no-match", pika.BasicProperties(headers={"format": "pdf"}))
    ch.basic_publish("broadcast", "anything", b"fanned")
    # events (topic) -> events.all by '#', and -> audit by 'order.*' -> dead.
    ch.basic_publish("events", "order.created", b"evt")
    # with-ae has no bindings: its alternate exchange (broadcast) takes it.
    ch.basic_publish("with-ae", "nowhere", b"via-ae")

    def bodies(queue: str) -> list[bytes]:
        got: list[bytes] = []
        while True:
            _, _, body = ch.basic_get(queue, auto_ack=True)
            if body is None:
                return got
            got.append(body)

    assert bodies("orders.new") == [b"order-1"]
    assert bodies("pdf-jobs") == [b"report"]
    assert bodies("work") == [b"fanned", b"via-ae"]
    assert bodies("events.all") == [b"evt"]
    assert bodies("dead") == [b"evt"]
    # The queues' arguments came across: an equivalent redeclaration is
    # accepted, a different one refused.
    ch.queue_declare(
        "events.all", durable=True, arguments={"x-max-length": 1000, "x-message-ttl": 60000}
    )
    with pytest.raises(ChannelClosedByBroker) as info:
        ch.queue_declare("events.all", durable=True)
    assert info.value.reply_code == 406
    assert "inequivalent arg 'x-message-ttl'" in info.value.reply_text
    conn.close()


# -- round trip -------------------------------------------------------------


def test_import_then_export_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    assert _run(capsys, "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))[0] == 0
    rc, out, err = _run(capsys, "export", "--data-dir", str(data_dir), "-")
    assert rc == 0, err
    exported = json.loads(out)
    assert "roost" not in exported
    original = json.loads(RABBITMQ_DEFS.read_text())
    for section, fields in {
        "users": ("name", "password_hash", "hashing_algorithm", "tags"),
        "vhosts": ("name",),
        "permissions": ("user", "vhost", "configure", "write", "read"),
        "exchanges": ("name", "vhost", "type", "durable", "auto_delete", "arguments"),
        "queues": ("name", "vhost", "durable", "auto_delete", "arguments"),
        "bindings": (
            "source",
            "vhost",
            "destination",
            "destination_type",
            "routing_key",
            "arguments",
        ),
    }.items():
        assert _keyed(exported, section, fields) == _keyed(original, section, fields), section
    assert f"exported {SUMMARY}" in err


def test_export_to_stdout_pipes_into_import_from_stdin(tmp_path: Path) -> None:
    source, target = tmp_path / "a", tmp_path / "b"
    assert main(["definitions", "import", "--data-dir", str(source), str(RABBITMQ_DEFS)]) == 0
    exported = _roost("export", "--data-dir", str(source), "-")
    assert exported.returncode == 0, exported.stderr
    imported = _roost("import", "--data-dir", str(target), "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {SUMMARY} from standard input into {target}" in imported.stderr
    a, b = _saved(source), _saved(target)
    for section in ("users", "vhosts", "permissions", "exchanges", "queues", "bindings"):
        assert a[section] == b[section], section


# -- stored messages survive an import --------------------------------------


def test_import_keeps_stored_messages_and_queue_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "guest", "guest", "/")
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("keep", durable=True)
        for i in range(3):
            ch.basic_publish("", "keep", b"m%d" % i, pika.BasicProperties(delivery_mode=2))
        conn.close()
        assert proc.terminate() == 0
    before = _saved(data_dir)["roost"]
    keep_id = _ids(data_dir)[("/", "keep")]
    # A file from another data directory, whose internal section gives its
    # queue "other" the id "keep" has here: that id must not be taken over.
    other = {
        "vhosts": [{"name": "/"}],
        "queues": [
            {"name": "keep", "vhost": "/", "durable": True, "auto_delete": False},
            {"name": "other", "vhost": "/", "durable": True, "auto_delete": False},
        ],
        "roost": {"next_queue_id": keep_id + 1, "queue_ids": [["/", "other", keep_id]]},
    }
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc, _, err = _run(capsys, "import", "--data-dir", str(data_dir), str(tmp_path / "other.json"))
    assert rc == 0, err
    rc, _, err = _run(capsys, "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))
    assert rc == 0, err
    ids = _ids(data_dir)
    assert ids[("/", "keep")] == keep_id
    assert len(set(ids.values())) == len(ids) == 7
    assert min(i for k, i in ids.items() if k != ("/", "keep")) >= before["next_queue_id"]
    with RoostProcess(data_dir) as proc:
        conn = _connect(proc, "guest", "guest", "/")
        ch = conn.channel()
        got = [ch.basic_get("keep", auto_ack=True)[2] for _ in range(4)]
        assert got == [b"m0", b"m1", b"m2", None]
        assert ch.queue_declare("other", passive=True).method.message_count == 0
        conn.close()


# -- problems and errors ----------------------------------------------------


def test_inequivalent_redeclaration_is_a_problem_and_the_rest_imports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    assert _run(capsys, "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))[0] == 0
    ids = _ids(data_dir)
    clash = {
        "queues": [
            {"name": "events.all", "vhost": "defs-vh", "durable": True, "arguments": {}},
            {"name": "extra", "vhost": "defs-vh", "durable": True, "arguments": {}},
        ],
        "exchanges": [{"name": "orders", "vhost": "defs-vh", "type": "fanout", "durable": True}],
    }
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    rc, out, err = _run(capsys, "import", "--data-dir", str(data_dir), str(tmp_path / "clash.json"))
    assert rc == 1
    assert out == ""
    assert (
        "roost: problem: queue 'events.all' in vhost 'defs-vh': PRECONDITION_FAILED - "
        "inequivalent arg 'x-message-ttl' for queue 'events.all' in vhost 'defs-vh'"
    ) in err
    assert "roost: problem: exchange 'orders' in vhost 'defs-vh': PRECONDITION_FAILED" in err
    assert "roost: 2 problems in " in err
    saved = _saved(data_dir)
    events = [q for q in saved["queues"] if q["name"] == "events.all"]
    assert events[0]["arguments"] == {"x-max-length": 1000, "x-message-ttl": 60000}
    assert [e["type"] for e in saved["exchanges"] if e["name"] == "orders"] == ["direct"]
    new_ids = _ids(data_dir)
    assert ("defs-vh", "extra") in new_ids
    assert {k: v for k, v in new_ids.items() if k != ("defs-vh", "extra")} == ids


def test_unsupported_sections_and_transient_objects_are_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "queues": [{"name": "tmp", "vhost": "/", "durable": False}],
        "policies": [{"name": "ha", "vhost": "/", "pattern": ".*", "definition": {}}],
    }
    (tmp_path / "d.json").write_text(json.dumps(data))
    rc, _, err = _run(capsys, "import", "--data-dir", str(tmp_path / "x"), str(tmp_path / "d.json"))
    assert rc == 0
    assert "roost: warning: ignored 1 policy (not supported by roost)" in err
    assert "roost: warning: skipped 1 non-durable queue (only durable ones are stored)" in err
    assert _saved(tmp_path / "x")["queues"] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"users": [', "is not valid JSON: Expecting value: line 1 column 12"),
        ("\xff\xfe garbage", "is not valid JSON"),
        ("[]", "is not a definitions file: expected a JSON object, got list"),
        ('{"hello": 1}', "is not a definitions file: it has none of 'users', 'vhosts'"),
        ('{"queues": {"name": "q"}}', "is not a definitions file: 'queues' must be a list"),
        (
            '{"vhosts": [{"nom": "v"}]}',
            "is not a definitions file: vhosts[0] needs a string 'name'",
        ),
        (
            '{"queues": [{"name": "q", "durable": "yes"}]}',
            "is not a definitions file: queues[0]: 'durable' must be true or false",
        ),
    ],
)
def test_unreadable_definitions_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    data_dir = tmp_path / "data"
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="latin-1")
    rc, out, err = _run(capsys, "import", "--data-dir", str(data_dir), str(bad))
    assert rc == 2
    assert out == ""
    assert err.startswith(f"roost: {bad} {message}"), err
    assert not (data_dir / "definitions.json").exists()


def test_invalid_json_as_a_process_exits_2_without_a_traceback(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    out = _roost("import", "--data-dir", str(data_dir), "-", stdin="{'single': 'quotes'}")
    assert out.returncode == 2
    assert out.stderr.startswith("roost: standard input is not valid JSON: Expecting property")
    assert "Traceback" not in out.stderr
    missing = _roost("import", "--data-dir", str(data_dir), str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert f"roost: cannot read {tmp_path / 'nope.json'}: No such file or directory" in (
        missing.stderr
    )
    assert "Traceback" not in missing.stderr


def test_running_broker_makes_both_commands_exit_1(
    roost_process: RoostProcess, tmp_path: Path
) -> None:
    data_dir = roost_process.data_dir
    assert roost_process.proc is not None
    before = (data_dir / "definitions.json").read_bytes()
    in_use = (
        f"roost: data directory {data_dir} is in use by another roost process "
        f"(pid {roost_process.proc.pid}); stop it first"
    )
    exported = _roost("export", "--data-dir", str(data_dir), "-")
    assert exported.returncode == 1
    assert exported.stdout == ""
    assert exported.stderr.strip() == in_use
    imported = _roost("import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))
    assert imported.returncode == 1
    assert imported.stderr.strip() == in_use
    assert (data_dir / "definitions.json").read_bytes() == before
    # The broker is unaffected and still works.
    conn = _connect(roost_process, "guest", "guest", "/")
    with pytest.raises(ChannelClosedByBroker):
        conn.channel().queue_declare("orders.new", passive=True)
    conn.close()


def test_corrupt_data_dir_definitions_are_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "definitions.json").write_text("{torn")
    rc, _, err = _run(capsys, "import", "--data-dir", str(data_dir), str(RABBITMQ_DEFS))
    assert rc == 1
    assert f"roost: {data_dir / 'definitions.json'} is not valid JSON" in err
    assert (data_dir / "definitions.json").read_text() == "{torn"


def test_definitions_help_documents_the_commands() -> None:
    top = subprocess.run(
        [sys.executable, "-m", "roost", "--help"], capture_output=True, text=True, timeout=30
    )
    assert "definitions" in top.stdout
    out = _roost("--help")
    assert out.returncode == 0
    assert "export" in out.stdout and "import" in out.stdout
    assert "RabbitMQ's definitions JSON" in out.stdout
    assert "roost definitions export --data-dir" in out.stdout
    for action in ("export", "import"):
        sub = _roost(action, "--help")
        assert sub.returncode == 0
        for flag in ("--data-dir DIR", "--config FILE", "FILE"):
            assert flag in sub.stdout
        stream = "standard output" if action == "export" else "standard input"
        assert stream in sub.stdout
    bare = _roost()
    assert bare.returncode == 2
    assert "export" in bare.stderr
