"""A throwaway PostgreSQL server for tests and the local demo cluster.

``ThrowawayPostgres`` runs ``initdb`` into a temporary directory and starts
``postgres`` on an ephemeral loopback port, with a database ``roost`` owned
by a superuser ``roost`` (trust authentication: loopback only, nothing of
value). It needs the server binaries (Debian's ``postgresql`` package);
:func:`find_bindir` says whether they are there.

PostgreSQL refuses to run as root. Run as root, the server runs as the
unprivileged ``postgres`` account (created by Debian's package) or, failing
that, ``nobody``, and its directory is handed to that account.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_CANDIDATE_USERS = ("postgres", "nobody")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` live, or None."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    # Debian keeps them out of PATH, one directory per major version.
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True)
    return Path(found[0]).parent if found else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as, or None for the current one."""
    if os.geteuid() != 0:
        return None
    for name in _CANDIDATE_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and no unprivileged account to run PostgreSQL as")


class ThrowawayPostgres:
    """``with ThrowawayPostgres() as pg: pg.url`` -- a fresh server, removed
    afterwards. ``stop_immediate()`` and ``start()`` restart it on the same
    port and data (``pg_ctl stop -m immediate``: a crash, as far as
    PostgreSQL can tell)."""

    def __init__(self, base: Path | None = None, port: int = 0) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(
                "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
            )
        self.bindir = bindir
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="roost-pg-")) if base is None else base
        self.data = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log_file = self.base / "postgres.log"
        self.port = port or _free_port()
        self.user = _run_as()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://roost@127.0.0.1:{self.port}/roost"

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            extra_groups=[] if self.user else None,
            capture_output=True,
            text=True,
            cwd=self.base,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._chown(self.base)
        for d in (self.data, self.socket_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            self._chown(d)
        self._run(
            "initdb", "-D", str(self.data), "-U", "roost", "--auth=trust", "-E", "UTF8", "--no-sync"
        )

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_file, "ab")  # noqa: SIM115 (the server writes it while it runs)
        self._chown(self.log_file)
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ],
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            extra_groups=[] if self.user else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited:\n" + self.log_file.read_text()[-4000:])
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("postgres did not start:\n" + self.log_file.read_text()[-4000:])
        self._create_database(deadline)

    def _create_database(self, deadline: float) -> None:
        import psycopg

        admin = f"postgresql://roost@127.0.0.1:{self.port}/postgres"
        while True:
            try:
                with psycopg.connect(admin, autocommit=True) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'roost'")
                    if exists.fetchone() is None:
                        conn.execute("CREATE DATABASE roost")
                    return
            except psycopg.OperationalError:
                # Accepting TCP before it accepts logins ("starting up").
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The postmaster and its children (each child is a process group
        of its own: PostgreSQL makes them so, a signal to the postmaster's
        group reaches the postmaster alone)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        postmaster = self.proc.pid
        found = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The parent pid is the 2nd field after the ")" that ends
                # the command name (which may hold spaces).
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    found.append(int(stat.parent.name))
        return found

    def pause(self) -> None:
        """SIGSTOP the server and every backend: connections are accepted by
        the kernel and nothing answers, as with a hung database machine."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def stop_immediate(self) -> None:
        """Stop without a checkpoint, as a crash would (SIGQUIT)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(3)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a paused server would never stop
            self.proc.terminate()  # smart shutdown... fast: SIGINT; SIGTERM waits for clients
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    def __enter__(self) -> ThrowawayPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)
