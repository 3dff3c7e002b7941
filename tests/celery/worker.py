"""Run a real Celery worker (``python -m celery ... worker``) as a subprocess
against a roost broker, for the Celery integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from roost.testing import RoostBroker

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy (returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class CeleryWorker:
    """``celery -A <app> worker --pool=solo`` with its output collected."""

    def __init__(self, app_module: str, broker_url: str, *extra_args: str) -> None:
        self.app_module = app_module
        self.broker_url = broker_url
        # A unique node name, so control replies and pidbox queues are ours alone.
        self.hostname = f"roost-{uuid.uuid4().hex[:8]}@localhost"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ROOST_CELERY_BROKER_URL"] = self.broker_url
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def start(self) -> CeleryWorker:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app_module,
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "-l",
            "info",
            "-n",
            self.hostname,
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, name="celery-worker-output", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("celery worker did not become ready:\n" + self.log)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if f"{self.hostname} ready." in line:
                self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def celery_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m celery -A <app> ARGS`` against the same broker."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", self.app_module, *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextmanager
def roost_and_worker(
    app_module: str, *extra_args: str
) -> Iterator[tuple[RoostBroker, CeleryWorker]]:
    """A fresh in-process roost broker and a worker of ``app_module`` on it."""
    with RoostBroker() as broker:
        worker = CeleryWorker(app_module, broker.url, *extra_args)
        try:
            yield broker, worker.start()
        finally:
            worker.stop()
