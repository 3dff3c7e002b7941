"""pytest fixtures that run roost for your tests.

Installed as a pytest plugin (entry point ``roost``), so after
``pip install roost`` these fixtures are available in any test suite:

``roost_broker``
    A broker running in-process (in a background thread with its own event
    loop) on an ephemeral loopback port. ``roost_broker.url`` is an
    ``amqp://`` URL for any client.
``roost_process``
    ``roost serve`` running as a subprocess on an ephemeral port with a
    temporary data directory; ``kill()`` sends SIGKILL, ``restart()``
    starts it again on the same data directory.

Both can also be used directly as context managers: ``with RoostBroker() as b:``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from roost.config import Config
from roost.server import Server

T = TypeVar("T")

__all__ = ["RoostBroker", "RoostProcess", "roost_broker", "roost_process"]


class RoostBroker:
    """A broker on its own event-loop thread, for tests in the same process."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        # The amqps listener runs only when tls_cert is given; then on an
        # ephemeral port too.
        config.setdefault("tls_port", 0)
        # The management API too (pass http_port=-1 to turn it off).
        config.setdefault("http_port", 0)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not config.get("data_dir"):
            self._tmp = tempfile.TemporaryDirectory(prefix="roost-")
            config["data_dir"] = self._tmp.name
        self.config = Config(**config)
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        assert self.server is not None, "broker not started"
        return self.server.port

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def tls_port(self) -> int:
        """The amqps port; 0 when the broker has no TLS listener."""
        assert self.server is not None, "broker not started"
        return self.server.tls_port

    @property
    def tls_url(self) -> str:
        assert self.tls_port, "broker has no TLS listener (pass tls_cert=...)"
        return f"amqps://guest:guest@{self.host}:{self.tls_port}/"

    @property
    def http_port(self) -> int:
        """The management API's port; 0 when it is not served."""
        assert self.server is not None, "broker not started"
        return self.server.http_port

    @property
    def http_url(self) -> str:
        """Base URL of the management API (``http_url + "/api/overview"``)."""
        assert self.http_port, "broker serves no management API (http_port=-1)"
        assert self.server is not None
        return f"{self.server.http_scheme}://{self.host}:{self.http_port}"

    def start(self) -> RoostBroker:
        started: Future[None] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.server = Server(self.config)
                loop.run_until_complete(self.server.start())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="roost-broker", daemon=True)
        self._thread.start()
        started.result(timeout=30)
        return self

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the broker's loop thread and return its result;
        use it to inspect or change broker state safely."""
        assert self.loop is not None
        result: Future[T] = Future()

        def invoke() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return result.result(timeout)

    def stop(self) -> None:
        if self.loop is None or self.server is None or self._thread is None:
            return
        server = self.server
        fut = asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), self.loop)
        try:
            fut.result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> RoostBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LISTENING = re.compile(r"listening on amqp://([^:\s]+):(\d+)")
_LISTENING_TLS = re.compile(r"and amqps://[^:\s]+:(\d+)")
_LISTENING_HTTP = re.compile(r"and https?://[^:\s]+:(\d+)")


class RoostProcess:
    """``roost serve`` as a child process on an ephemeral port."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *extra_args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="roost-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.tls_port = 0  # the amqps port once started, when --tls-cert is given
        self.http_port = 0  # the management API's port once started
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def tls_url(self) -> str:
        assert self.tls_port, "roost has no TLS listener (pass --tls-cert ... --tls-port 0)"
        return f"amqps://guest:guest@{self.host}:{self.tls_port}/"

    def start(self, timeout: float = 30.0) -> RoostProcess:
        cmd = [
            sys.executable,
            "-m",
            "roost",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            # The management API on an ephemeral port (kept on restart);
            # extra_args may override it (--http-port -1 turns it off).
            "--http-port",
            str(self.http_port),
            *self.extra_args,
        ]
        if self.tls_port:
            # A restart keeps the amqps port too (the last --tls-port wins).
            cmd += ["--tls-port", str(self.tls_port)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        found: Future[tuple[str, int, int]] = Future()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = _LISTENING.search(line)
                if m and not found.done():
                    tls = _LISTENING_TLS.search(line)
                    http = _LISTENING_HTTP.search(line)
                    self.http_port = int(http.group(1)) if http else 0
                    found.set_result((m.group(1), int(m.group(2)), int(tls.group(1)) if tls else 0))
            if not found.done():
                found.set_exception(
                    RuntimeError("roost exited before listening:\n" + "".join(self.output))
                )

        threading.Thread(target=pump, name="roost-output", daemon=True).start()
        self.host, self.port, self.tls_port = found.result(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> RoostProcess:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RoostProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def roost_broker() -> Iterator[RoostBroker]:
    """An in-process roost broker on an ephemeral port."""
    with RoostBroker() as broker:
        yield broker


@pytest.fixture
def roost_process(tmp_path: Path) -> Iterator[RoostProcess]:
    """``roost serve`` as a subprocess on an ephemeral port."""
    proc = RoostProcess(tmp_path / "roost-data")
    try:
        yield proc.start()
    finally:
        proc.close()
