"""Encryption at rest: message records sealed with AES-GCM in the store.

End-to-end tests run a real broker (in-process, or ``roost serve`` as a
subprocess for exit codes) with pika, stop it, and look at the raw bytes
under ``messages/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from roost.cli import main as roost_main
from roost.store import records
from roost.store.encryption import (
    KEY_ENV,
    MARKER_FILE,
    EncryptionError,
    Keyring,
    generate_key_file,
    key_id,
)
from roost.testing import RoostBroker

EXCHANGE = "ex-kumquat-3307"
QUEUE = "q-encrypted"
ROUTING_KEY = "rk-marmalade-4411"
HEADER_VALUE = "hdr-quince-2290"
MESSAGE_ID = "mid-persimmon-5512"
CORRELATION_ID = "corr-loganberry-6623"
BODY = b"BODY-tangerine-7781:"
# What must never appear in clear under messages/ while encryption is on.
SECRETS = [BODY, ROUTING_KEY.encode(), HEADER_VALUE.encode(), MESSAGE_ID.encode()]
SECRETS += [CORRELATION_ID.encode(), EXCHANGE.encode()]


# -- helpers -----------------------------------------------------------------


def _key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    generate_key_file(path)
    return path


def _kid(key_file: Path) -> str:
    return key_id(base64.b64decode(key_file.read_bytes())).hex()


def _broker(data_dir: Path, key: Path | None = None, old: Path | None = None) -> RoostBroker:
    return RoostBroker(
        data_dir=str(data_dir),
        encryption_key_file=str(key) if key else "",
        old_encryption_key_file=str(old) if old else "",
    )


def _declare(ch: pika.adapters.blocking_connection.BlockingChannel) -> None:
    ch.exchange_declare(EXCHANGE, "direct", durable=True)
    ch.queue_declare(QUEUE, durable=True)
    ch.queue_bind(QUEUE, EXCHANGE, ROUTING_KEY)


def _publish(url: str, bodies: list[bytes], persistent: bool = True, first: int = 0) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        _declare(ch)
        ch.confirm_delivery()
        for i, body in enumerate(bodies, first):
            ch.basic_publish(
                EXCHANGE,
                ROUTING_KEY,
                body,
                pika.BasicProperties(
                    delivery_mode=2 if persistent else 1,
                    headers={"x-secret": HEADER_VALUE, "n": i},
                    message_id=MESSAGE_ID,
                    correlation_id=CORRELATION_ID,
                    content_type="application/x-test",
                ),
                mandatory=True,
            )
    finally:
        conn.close()


def _drain(url: str, count: int) -> list[tuple[bytes, pika.BasicProperties]]:
    """Get ``count`` messages from the queue (polling with a deadline)."""
    got: list[tuple[bytes, pika.BasicProperties]] = []
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        deadline = time.monotonic() + 5
        while len(got) < count and time.monotonic() < deadline:
            method, props, body = ch.basic_get(QUEUE, auto_ack=True)
            if method is None:
                conn.sleep(0.02)
                continue
            got.append((body, props))
    finally:
        conn.close()
    return got


def _messages_bytes(data_dir: Path) -> bytes:
    files = sorted(p for p in (data_dir / "messages").iterdir() if p.is_file())
    assert any(p.suffix == ".seg" and p.stat().st_size for p in files), "no records on disk"
    return b"".join(p.read_bytes() for p in files)


def _payloads(data_dir: Path) -> list[bytes]:
    """The payloads of the intact records in every segment file."""
    out = []
    for seg in sorted((data_dir / "messages").glob("*.seg")):
        data = seg.read_bytes()
        head = records.parse_segment_header(data)
        if head is None:
            continue
        seed, pos = head
        while pos + records.HEADER_SIZE <= len(data):
            length, crc = records.HEADER.unpack_from(data, pos)
            payload = data[pos + records.HEADER_SIZE : pos + records.HEADER_SIZE + length]
            if length < 2 or not records.check(payload, crc, seed):
                break
            out.append(payload)
            pos += records.HEADER_SIZE + length
    return out


def _snapshot(data_dir: Path) -> dict[str, str]:
    """Checksums of every file in the data directory but the lock file."""
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and p.name != "roost.lock"
    }


def _serve(
    data_dir: Path, *args: str, env_key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``roost serve`` expected to refuse to start."""
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if env_key is not None:
        env[KEY_ENV] = env_key
    cmd = [sys.executable, "-m", "roost", "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--data-dir", str(data_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=20)


def _check_message(body: bytes, props: pika.BasicProperties, n: int) -> None:
    assert body == BODY + str(n).encode()
    assert props.headers == {"x-secret": HEADER_VALUE, "n": n}
    assert props.message_id == MESSAGE_ID
    assert props.correlation_id == CORRELATION_ID
    assert props.content_type == "application/x-test"
    assert props.delivery_mode == 2


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


# -- records -----------------------------------------------------------------


def test_record_round_trip_encrypted() -> None:
    ring = Keyring(os.urandom(32))
    props = b"\x90\x00\x10application/x-test"
    rec = records.encode_message(
        records.PERSISTENT,
        [7, 9],
        "ex-secret",
        "rk-secret",
        props,
        b"body-secret",
        timestamp=1234,
        keyring=ring,
    )
    length, crc = records.HEADER.unpack_from(rec, 0)
    payload = rec[records.HEADER_SIZE :]
    assert length == len(payload) and records.check(payload, crc)
    for secret in (b"ex-secret", b"rk-secret", b"body-secret", b"application/x-test"):
        assert secret not in rec
    assert payload[0] == records.PERSISTENT | records.ENCRYPTED
    # Recovery's view needs no key.
    assert records.peek_queue_ids(payload) == (records.PERSISTENT, (7, 9), None)
    assert records.key_id_of(payload) == ring.current_id
    stored = records.decode_message(payload, ring)
    assert (stored.kind, stored.queue_ids, stored.timestamp) == (records.PERSISTENT, (7, 9), 1234)
    assert (stored.exchange, stored.routing_key) == ("ex-secret", "rk-secret")
    assert (stored.properties, stored.body) == (props, b"body-secret")
    # Same message twice: different nonces, different ciphertexts.
    again = records.encode_message(
        records.PERSISTENT,
        [7, 9],
        "ex-secret",
        "rk-secret",
        props,
        b"body-secret",
        timestamp=1234,
        keyring=ring,
    )
    assert again != rec


def test_moved_record_keeps_its_location_in_clear() -> None:
    ring = Keyring(os.urandom(32))
    rec = records.encode_message(
        records.MOVED,
        [3],
        "",
        "k",
        b"",
        b"payload",
        moved_from=(5, 4096),
        timestamp=9,
        keyring=ring,
    )
    payload = rec[records.HEADER_SIZE :]
    assert records.peek_queue_ids(payload) == (records.MOVED, (3,), (5, 4096))
    stored = records.decode_message(payload, ring)
    assert (stored.moved_from, stored.body, stored.timestamp) == ((5, 4096), b"payload", 9)


def test_record_tampering_and_wrong_keys_are_detected() -> None:
    key = os.urandom(32)
    ring = Keyring(key)
    payload = records.encode_message(
        records.PERSISTENT, [1], "e", "r", b"", b"secret body", timestamp=42, keyring=ring
    )[records.HEADER_SIZE :]
    # A flipped bit in the ciphertext, or in the clear header (the
    # associated data: here the queue id), fails authentication.
    for pos in (len(payload) - 20, 2):
        bad = bytearray(payload)
        bad[pos] ^= 1
        with pytest.raises(records.RecordError, match="failed authentication"):
            records.decode_message(bytes(bad), ring)
    with pytest.raises(records.RecordError, match=f"unknown key id {key_id(key).hex()}"):
        records.decode_message(payload, Keyring(os.urandom(32)))
    with pytest.raises(records.RecordError, match="no encryption key"):
        records.decode_message(payload)
    # Rotation: a keyring holding the old key as an earlier one opens it.
    assert records.decode_message(payload, Keyring(os.urandom(32), [key])).body == b"secret body"


def test_plain_records_read_with_a_keyring() -> None:
    payload = records.encode_message(records.PAGED, [], "e", "r", b"", b"plain", timestamp=1)[
        records.HEADER_SIZE :
    ]
    assert records.key_id_of(payload) is None
    assert records.decode_message(payload, Keyring(os.urandom(32))).body == b"plain"


# -- the broker --------------------------------------------------------------


def test_disk_holds_no_plaintext_and_restart_brings_everything_back(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data, key) as b:
        _publish(b.url, [BODY + str(i).encode() for i in range(20)])
    raw = _messages_bytes(data)
    for secret in SECRETS:
        assert secret not in raw, secret
    marker = json.loads((data / MARKER_FILE).read_text())
    assert marker == {"algorithm": "AES-256-GCM", "key_id": _kid(key)}
    with _broker(data, key) as b:
        got = _drain(b.url, 20)
    assert len(got) == 20
    for n, (body, props) in enumerate(got):
        _check_message(body, props, n)


def test_plain_store_holds_plaintext(tmp_path: Path) -> None:
    """The control for the test above: without a key the same bytes show."""
    data = tmp_path / "data"
    with _broker(data) as b:
        _publish(b.url, [BODY + b"0"])
    raw = _messages_bytes(data)
    for secret in SECRETS:
        assert secret in raw, secret
    assert not (data / MARKER_FILE).exists()


def test_paged_transient_messages_are_encrypted_too(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data, key) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        _declare(conn.channel())
        conn.close()

        def small_ready_limit() -> None:
            assert b.server is not None
            b.server.broker.vhosts["/"].queues[QUEUE].ready_limit = 2

        b.call(small_ready_limit)
        _publish(b.url, [BODY + str(i).encode() for i in range(10)], persistent=False)
        # Paged records are written out by the store's writer: poll.
        deadline = time.monotonic() + 5
        while len(_payloads(data)) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        kinds = [payload[0] for payload in _payloads(data)]
        assert kinds == [records.PAGED | records.ENCRYPTED] * 8
        raw = _messages_bytes(data)
        for secret in SECRETS:
            assert secret not in raw, secret
        got = _drain(b.url, 10)
    assert [body for body, _ in got] == [BODY + str(i).encode() for i in range(10)]


def test_start_without_key_refuses_and_changes_nothing(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data, key) as b:
        _publish(b.url, [BODY + b"0", BODY + b"1"])
    before = _snapshot(data)
    result = _serve(data)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "encrypt" in result.stderr and _kid(key) in result.stderr
    assert "no encryption key was given" in result.stderr
    assert "listening" not in result.stdout
    assert _snapshot(data) == before
    # Even with encryption.json gone, the records themselves give it away.
    (data / MARKER_FILE).unlink()
    before = _snapshot(data)
    with pytest.raises(EncryptionError, match=f"key id {_kid(key)}.*no encryption key"):
        _broker(data).start()
    assert _snapshot(data) == before
    with _broker(data, key) as b:
        got = _drain(b.url, 2)
    _check_message(*got[1], 1)


def test_start_with_wrong_key_refuses_and_changes_nothing(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    other = _key(tmp_path, "other.key")
    data = tmp_path / "data"
    with _broker(data, key) as b:
        _publish(b.url, [BODY + b"0"])
    # A torn tail, which a normal start would cut off: kept too.
    seg = max((data / "messages").glob("*.seg"), key=lambda p: p.stat().st_size)
    with open(seg, "ab") as fh:
        fh.write(b"\x00\x00\x01\x00torn")
    before = _snapshot(data)
    result = _serve(data, "--encryption-key-file", str(other))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"encrypted with key id {_kid(key)}" in result.stderr
    assert _kid(other) in result.stderr and "nothing was changed" in result.stderr
    assert _snapshot(data) == before
    (data / MARKER_FILE).unlink()
    before = _snapshot(data)
    with pytest.raises(EncryptionError, match=f"key id {_kid(key)}, which the encryption key"):
        _broker(data, other).start()
    assert _snapshot(data) == before


def test_marker_refuses_a_wrong_key_on_an_empty_store(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data, key):
        pass
    with pytest.raises(EncryptionError, match=f"encrypted with key id {_kid(key)}"):
        _broker(data, _key(tmp_path, "other.key")).start()


def test_key_in_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    monkeypatch.setenv(KEY_ENV, key.read_text())
    with _broker(data) as b:
        _publish(b.url, [BODY + b"0"])
    raw = _messages_bytes(data)
    assert BODY not in raw and HEADER_VALUE.encode() not in raw
    with pytest.raises(EncryptionError, match="set only one of them"):
        _broker(data, key).start()
    monkeypatch.delenv(KEY_ENV)
    with _broker(data, key) as b:  # the same key, from the file
        got = _drain(b.url, 1)
    _check_message(*got[0], 0)
    result = _serve(data, env_key="c2hvcnQ=")
    assert result.returncode == 1
    assert f"{KEY_ENV}: expected 32 random bytes in base64" in result.stderr


def test_bad_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not base64 at all!\n")
    bad.chmod(0o600)
    with pytest.raises(EncryptionError, match="expected 32 random bytes in base64"):
        _broker(tmp_path / "data", bad).start()
    with pytest.raises(EncryptionError, match="cannot read encryption key file"):
        _broker(tmp_path / "data", tmp_path / "missing.key").start()


def test_enabling_encryption_on_a_plain_store(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data) as b:
        _publish(b.url, [BODY + b"0"])
    with _broker(data, key) as b:
        _publish(b.url, [b"ENCRYPTED-damson-9931"])
    raw = _messages_bytes(data)
    assert BODY + b"0" in raw  # old records stay as they were written
    assert b"ENCRYPTED-damson-9931" not in raw
    with _broker(data, key) as b:
        got = _drain(b.url, 2)
    assert [body for body, _ in got] == [BODY + b"0", b"ENCRYPTED-damson-9931"]


def test_key_rotation(tmp_path: Path) -> None:
    old = _key(tmp_path, "old.key")
    new = _key(tmp_path, "new.key")
    data = tmp_path / "data"
    with _broker(data, old) as b:
        _publish(b.url, [BODY + b"0"])
    # The new key alone: refused, untouched.
    before = _snapshot(data)
    with pytest.raises(EncryptionError, match=f"encrypted with key id {_kid(old)}"):
        _broker(data, new).start()
    assert _snapshot(data) == before
    # New key plus the old one: old records read, new ones sealed with the new key.
    with _broker(data, new, old) as b:
        _publish(b.url, [BODY + b"1"], first=1)
    assert json.loads((data / MARKER_FILE).read_text())["key_id"] == _kid(new)
    key_ids = [records.key_id_of(payload) for payload in _payloads(data)]
    assert key_ids == [bytes.fromhex(_kid(old)), bytes.fromhex(_kid(new))]
    # A record under the old key is still queued: the new key alone is refused.
    before = _snapshot(data)
    with pytest.raises(EncryptionError, match=f"key id {_kid(old)}, which the encryption key"):
        _broker(data, new).start()
    assert _snapshot(data) == before
    # Consume what the old key wrote; its segment goes away.
    with _broker(data, new, old) as b:
        got = _drain(b.url, 1)
        _check_message(*got[0], 0)
    key_ids = [records.key_id_of(payload) for payload in _payloads(data)]
    assert key_ids == [bytes.fromhex(_kid(new))]
    with _broker(data, new) as b:
        got = _drain(b.url, 1)
    _check_message(*got[0], 1)


def test_delayed_exchange_recovers_encrypted_messages(tmp_path: Path) -> None:
    key = _key(tmp_path, "roost.key")
    data = tmp_path / "data"
    with _broker(data, key) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        ch.exchange_declare(
            "delayed-enc", "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"}
        )
        ch.queue_declare(QUEUE, durable=True)
        ch.queue_bind(QUEUE, "delayed-enc", ROUTING_KEY)
        ch.confirm_delivery()
        ch.basic_publish(
            "delayed-enc",
            ROUTING_KEY,
            BODY + b"late",
            pika.BasicProperties(
                delivery_mode=2, headers={"x-delay": 700, "x-secret": HEADER_VALUE}
            ),
        )
        assert ch.queue_declare(QUEUE, passive=True).method.message_count == 0
        conn.close()
    raw = _messages_bytes(data)
    assert BODY not in raw and HEADER_VALUE.encode() not in raw
    with _broker(data, key) as b:
        got = _drain(b.url, 1)
    assert got[0][0] == BODY + b"late"
    assert got[0][1].headers == {"x-delay": -700, "x-secret": HEADER_VALUE}


def test_many_encrypted_messages(tmp_path: Path) -> None:
    """Performance sanity (no timing assertion): a few thousand persistent
    messages of mixed sizes through an encrypted store and back."""
    key = _key(tmp_path, "roost.key")
    bodies = [BODY + str(i).encode() + b"x" * (i % 7 * 300) for i in range(2000)]
    with _broker(tmp_path / "data", key) as b:
        conn = pika.BlockingConnection(pika.URLParameters(b.url))
        ch = conn.channel()
        _declare(ch)
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(EXCHANGE, ROUTING_KEY, body, pika.BasicProperties(delivery_mode=2))
        got: list[bytes] = []
        for method, _, body in ch.consume(QUEUE, auto_ack=True, inactivity_timeout=5):
            if method is None:
                break
            got.append(body)
            if len(got) == len(bodies):
                break
        conn.close()
    assert got == bodies


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.key"
    assert roost_main(["keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = base64.b64decode(path.read_bytes(), validate=False)
    assert len(key) == 32
    assert key_id(key).hex() in capsys.readouterr().out
    content = path.read_bytes()
    assert roost_main(["keygen", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == content


# -- deduplication caches ---------------------------------------------------------

DEDUP_KEY = "dedup-key-tamarillo-8842"


def _dedup_publish(broker: RoostBroker, key: str) -> int:
    """Publish a persistent message with ``key`` to the durable dedup queue;
    returns the queue's depth afterwards."""
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    ch = conn.channel()
    ch.confirm_delivery()
    ok = ch.queue_declare("dedup-q", durable=True, arguments={"x-message-deduplication": True})
    assert ok.method.queue == "dedup-q"
    props = pika.BasicProperties(delivery_mode=2, headers={"x-deduplication-header": key})
    ch.basic_publish("", "dedup-q", b"body", props)
    depth = ch.queue_declare("dedup-q", passive=True).method.message_count
    conn.close()
    return int(depth)


def test_dedup_keys_are_not_stored_in_clear(tmp_path: Path) -> None:
    key = _key(tmp_path, "k.key")
    data = tmp_path / "data"
    with _broker(data, key) as broker:
        assert _dedup_publish(broker, DEDUP_KEY) == 1
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any("dedup" in p.parts for p in files)
    for path in files:
        assert DEDUP_KEY.encode() not in path.read_bytes(), path
        assert DEDUP_KEY.encode().hex().encode() not in path.read_bytes(), path
    # Still recovered: the same key after a restart is a duplicate.
    with _broker(data, key) as broker:
        assert _dedup_publish(broker, DEDUP_KEY) == 1
        assert _dedup_publish(broker, "another-key") == 2


def test_a_plain_dedup_cache_is_sealed_when_encryption_is_enabled(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _broker(data) as broker:
        assert _dedup_publish(broker, DEDUP_KEY) == 1
    assert any(DEDUP_KEY.encode() in p.read_bytes() for p in data.rglob("*.json"))
    key = _key(tmp_path, "k.key")
    with _broker(data, key) as broker:
        assert _dedup_publish(broker, DEDUP_KEY) == 1
    assert not any(DEDUP_KEY.encode() in p.read_bytes() for p in data.rglob("*.json"))
    with _broker(data, key) as broker:
        assert _dedup_publish(broker, DEDUP_KEY) == 1
