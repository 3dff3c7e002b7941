"""A throwaway highly available PostgreSQL for failover tests: one etcd and
two PostgreSQL instances managed by Patroni in synchronous mode, on
ephemeral loopback ports (Debian's ``patroni``, ``etcd-server`` and
``postgresql`` packages).

With ``synchronous_mode: true`` a COMMIT returns only once the standby has
the transaction, so whatever a client saw committed survives the loss of
the primary. :attr:`PatroniCluster.url` lists both instances with
``target_session_attrs=read-write``: a client reconnecting after a
failover reaches whichever became the primary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from roost.cluster.devdb import _free_port, _run_as, find_bindir

SCOPE = "roost-test"


def available() -> bool:
    return bool(shutil.which("patroni") and shutil.which("etcd") and find_bindir())


class PatroniCluster:
    def __init__(self) -> None:
        bindir = find_bindir()
        assert bindir is not None
        self.bindir = bindir
        self.user = _run_as()
        self.base = Path(tempfile.mkdtemp(prefix="roost-patroni-"))
        self._chown(self.base)
        self.etcd_port = _free_port()
        self.etcd_peer_port = _free_port()
        self.pg_ports = [_free_port(), _free_port()]
        self.api_ports = [_free_port(), _free_port()]
        self.etcd: subprocess.Popen[bytes] | None = None
        self.members: list[subprocess.Popen[bytes] | None] = [None, None]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.pg_ports)
        return f"postgresql://roost:roost@{hosts}/roost?target_session_attrs=read-write"

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 (the child writes it while it runs)
        self._chown(log)
        try:
            return subprocess.Popen(
                cmd,
                user=self.user.pw_uid if self.user else None,
                group=self.user.pw_gid if self.user else None,
                extra_groups=[] if self.user else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
                env={**os.environ, "HOME": str(self.base)},
            )
        finally:
            out.close()

    def _config(self, i: int) -> Path:
        data = self.base / f"pg{i}"
        config = {
            "scope": SCOPE,
            "name": f"pg{i}",
            "restapi": {
                "listen": f"127.0.0.1:{self.api_ports[i]}",
                "connect_address": f"127.0.0.1:{self.api_ports[i]}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": 10,
                    "loop_wait": 1,
                    "retry_timeout": 4,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": False,
                        "parameters": {"max_connections": 200, "wal_level": "replica"},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": [
                    "host replication replicator 127.0.0.1/32 trust",
                    "host all all 127.0.0.1/32 trust",
                    "local all all trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_ports[i]}",
                "connect_address": f"127.0.0.1:{self.pg_ports[i]}",
                "data_dir": str(data),
                "bin_dir": str(self.bindir),
                "pgpass": str(self.base / f"pgpass{i}"),
                "authentication": {
                    "superuser": {"username": "roost", "password": "roost"},
                    "replication": {"username": "replicator", "password": "replicator"},
                },
                "parameters": {"unix_socket_directories": str(self.base)},
            },
        }
        path = self.base / f"patroni{i}.json"
        # Patroni reads YAML, of which JSON is a subset.
        path.write_text(json.dumps(config))
        self._chown(path)
        return path

    def start(self, timeout: float = 90.0) -> None:
        etcd_data = self.base / "etcd"
        etcd_data.mkdir(mode=0o700)
        self._chown(etcd_data)
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = self._spawn(
            [
                "etcd",
                "--name=e1",
                f"--data-dir={etcd_data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=e1={peer}",
            ],
            self.base / "etcd.log",
        )
        self._wait(lambda: self._http_ok(f"{client}/health"), timeout, "etcd")
        self.start_member(0)
        self._wait(lambda: self.leader() == 0, timeout, "the first PostgreSQL")
        self.start_member(1)
        self._wait(self.healthy, timeout, "the synchronous standby")
        import psycopg

        admin = self.url.replace("/roost?", "/postgres?")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE roost")

    def start_member(self, i: int) -> None:
        self.members[i] = self._spawn(
            ["patroni", str(self._config(i))], self.base / f"patroni{i}.log"
        )

    def kill_member(self, i: int) -> None:
        """SIGKILL a member's Patroni and its PostgreSQL (the whole machine
        gone, as far as the others can tell)."""
        proc = self.members[i]
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        pid_file = self.base / f"pg{i}" / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            # Its backends notice the postmaster's death and exit.
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        self.members[i] = None

    def _http_ok(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _cluster(self) -> dict[str, object] | None:
        for port in self.api_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/cluster", timeout=2) as r:
                    doc: dict[str, object] = json.loads(r.read())
                    return doc
            except OSError:
                continue
        return None

    def leader(self) -> int | None:
        """Which member (0 or 1) is the running primary, or None."""
        doc = self._cluster()
        if doc is None:
            return None
        for m in doc.get("members", []):  # type: ignore[attr-defined]
            if m.get("role") == "leader" and m.get("state") == "running":
                return int(str(m["name"])[2:])
        return None

    def healthy(self) -> bool:
        """A running primary and a streaming synchronous standby."""
        doc = self._cluster()
        if doc is None:
            return False
        roles = {
            str(m.get("role")): str(m.get("state"))
            for m in doc.get("members", [])  # type: ignore[attr-defined]
        }
        return roles.get("leader") == "running" and roles.get("sync_standby") in (
            "running",
            "streaming",
        )

    def _wait(self, ok: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():  # type: ignore[operator]
                return
            time.sleep(0.3)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.base.glob("*.log"))
        )
        raise RuntimeError(f"{what} did not come up within {timeout:g}s\n{logs}")

    def wait_for_leader(self, other_than: int | None = None, timeout: float = 60.0) -> int:
        """The running primary, once there is one (other than ``other_than``)."""
        self._wait(lambda: self.leader() not in (None, other_than), timeout, "a new leader")
        leader = self.leader()
        assert leader is not None
        return leader

    def close(self) -> None:
        for i in range(len(self.members)):
            self.kill_member(i)
        if self.etcd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.etcd.pid, signal.SIGKILL)
            self.etcd.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PatroniCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
