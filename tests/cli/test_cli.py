"""The roost command line, run as a real process."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pika

from roost.config import Config
from roost.testing import RoostProcess
from tests.conftest import RawClient


def _roost(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", *args], capture_output=True, text=True, timeout=timeout
    )


def test_serve_help_documents_every_option() -> None:
    out = _roost("serve", "--help")
    assert out.returncode == 0
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out.stdout, flag
        assert f"ROOST_{f.name.upper()}" in out.stdout
    assert "--config" in out.stdout


def test_bad_option_value_is_a_plain_error(tmp_path: Path) -> None:
    out = _roost("serve", "--port", "99999", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "roost: port: 99999 is not between 0 and 65535" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_a_plain_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _roost("serve", "--port", str(port), "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert f"roost: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_environment_and_config_file_configure_serve(tmp_path: Path) -> None:
    cfg = tmp_path / "roost.toml"
    cfg.write_text('default-user = "alice"\ndefault-password = "secret"\n')
    env = {"ROOST_HEARTBEAT": "7", "PATH": "/usr/bin:/bin"}
    with RoostProcess(tmp_path / "data", "--config", str(cfg), env=env) as proc:
        raw = RawClient(proc.port)
        tune = raw.handshake(user="alice", password="secret")
        assert tune.heartbeat == 7  # from the environment
        raw.close()
        assert "data directory" in "".join(proc.output)


def test_sigterm_closes_clients_with_320_and_exits_zero(tmp_path: Path) -> None:
    with RoostProcess(tmp_path / "data") as proc:
        conn = pika.BlockingConnection(pika.URLParameters(proc.url))
        closed: list[tuple[int, str]] = []
        assert proc.terminate() == 0
        try:
            conn.process_data_events(time_limit=2)
        except pika.exceptions.ConnectionClosedByBroker as exc:
            closed.append((exc.reply_code, exc.reply_text))
        assert closed and closed[0][0] == 320
        assert "CONNECTION_FORCED" in closed[0][1]
