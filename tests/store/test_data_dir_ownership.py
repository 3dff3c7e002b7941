"""The data directory is the broker's own: ``roost serve`` and the offline
commands refuse one another user could have written, the files the broker
opens there are never followed through a symbolic link, and ``roost ctl``
talks only to a control socket of its own user."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.store.encryption import generate_key_file
from roost.testing import RoostProcess

OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "roost", *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"roost {args[0]} ran on a data directory it should refuse") from exc


def _serve(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _run("serve", "--port", "0", "--http-port", "-1", "--data-dir", str(data_dir), *extra)


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one-line refusal on standard error."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def used_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory a broker has run on (definitions, messages, lock)."""
    data = tmp_path / "data"
    with RoostProcess(data, "--http-port", "-1"):
        pass
    assert (data / "definitions.json").exists()
    yield data


# -- ownership and modes -------------------------------------------------------


def test_serve_refuses_a_group_writable_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o770)
    line = _refused(_serve(data), str(data), "writable by its group", "0770")
    assert "chmod" in line
    assert not (data / "roost.lock").exists()  # refused before anything was written


def test_serve_refuses_a_world_writable_file_inside(used_dir: Path) -> None:
    (used_dir / "definitions.json").chmod(0o666)
    _refused(_serve(used_dir), str(used_dir / "definitions.json"), "writable by group and others")


def test_offline_commands_refuse_it_too(used_dir: Path) -> None:
    (used_dir / "messages").chmod(0o777)
    _refused(_run("ctl", "list-users", "--data-dir", str(used_dir)), "writable by")
    _refused(_run("ctl", "add-user", "eve", "--password", "pw", "--data-dir", str(used_dir)))
    _refused(_run("definitions", "export", "-", "--data-dir", str(used_dir)), "writable by")
    assert "eve" not in (used_dir / "definitions.json").read_text()


@needs_root
def test_serve_refuses_an_entry_owned_by_another_user(used_dir: Path) -> None:
    os.chown(used_dir / "messages", OTHER_UID, -1)
    _refused(_serve(used_dir), str(used_dir / "messages"), f"owned by uid {OTHER_UID}")


@needs_root
def test_serve_refuses_a_data_dir_owned_by_another_user_even_as_root(used_dir: Path) -> None:
    os.chown(used_dir, OTHER_UID, -1)
    _refused(_serve(used_dir), f"owned by uid {OTHER_UID}, not by uid 0")


def test_directories_roost_creates_pass_its_own_check_under_a_loose_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0o002)
    try:
        data = tmp_path / "data"
        added = _run("ctl", "add-user", "alice", "--password", "pw", "--data-dir", str(data))
        assert added.returncode == 0, added.stderr
        for _ in range(2):
            with RoostProcess(data, "--http-port", "-1"):
                pass
    finally:
        os.umask(old)


# -- symbolic links ----------------------------------------------------------


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("precious content\n")
    (data / "roost.lock").symlink_to(target)
    _refused(_serve(data), str(data / "roost.lock"), "symbolic link")
    assert target.read_text() == "precious content\n"


def test_a_symlinked_definitions_file_is_refused(used_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    (used_dir / "definitions.json").rename(elsewhere)
    (used_dir / "definitions.json").symlink_to(elsewhere)
    _refused(_serve(used_dir), "definitions.json", "symbolic link")
    _refused(_run("ctl", "list-users", "--data-dir", str(used_dir)), "symbolic link")


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "real.key"
    generate_key_file(key)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    line = _refused(_serve(tmp_path / "data", "--encryption-key-file", str(link)))
    assert "symbolic link" in line and str(link) in line


@pytest.mark.parametrize("mode", [0o640, 0o604], ids=["0640", "0604"])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "loose.key"
    generate_key_file(key)
    key.chmod(mode)
    _refused(_serve(tmp_path / "data", "--encryption-key-file", str(key)), str(key), "chmod 600")
    assert not (tmp_path / "data" / "roost.lock").exists()


# -- the control socket --------------------------------------------------------


@needs_root
def test_ctl_refuses_a_control_socket_owned_by_another_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RoostProcess(data, "--http-port", "-1"):
        sock = data / "roost.ctl"
        os.chown(sock, OTHER_UID, -1)
        done = _run("ctl", "add-user", "mallory", "--password", "pw", "--data-dir", str(data))
        line = _refused(done, str(sock), f"owned by uid {OTHER_UID}")
        assert "refusing" in line
        os.chown(sock, 0, -1)
        users = _run("ctl", "list-users", "--data-dir", str(data))
        assert users.returncode == 0, users.stderr
        assert "guest" in users.stdout and "mallory" not in users.stdout


def test_ctl_refuses_a_control_socket_path_that_is_not_a_socket(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RoostProcess(data, "--http-port", "-1"):
        (data / "roost.ctl").unlink()
        (data / "roost.ctl").symlink_to(tmp_path / "somewhere")
        done = _run("ctl", "list-users", "--data-dir", str(data))
        _refused(done, "not a socket")


def test_a_refused_definitions_file_is_left_as_it_was(used_dir: Path) -> None:
    """Refusing to start never replaces the file with the defaults."""
    (used_dir / "definitions.json").write_text("{not json")
    _refused(_serve(used_dir), "not valid JSON")
    assert (used_dir / "definitions.json").read_text() == "{not json"
