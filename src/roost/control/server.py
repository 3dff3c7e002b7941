"""The control socket of a running broker.

A Unix socket, ``roost.ctl`` in the data directory, mode 0600: only the
data directory's owner (and root) can connect, which is the whole of its
authentication, as RabbitMQ's Erlang cookie is for ``rabbitmqctl``.

One JSON request per line, ``{"command": "add_user", "args": {...}}``; one
JSON response per line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. A change is answered only once the
definitions holding it are on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roost.broker.broker import Broker
from roost.control import runtime
from roost.control.cluster_rows import CLUSTER_LISTINGS, complete
from roost.control.commands import READ_ONLY, ControlError, execute
from roost.control.socket_path import reachable
from roost.http.cluster_view import ClusterView

log = logging.getLogger("roost.control")
MAX_REQUEST = 1024 * 1024


class ControlServer:
    def __init__(
        self,
        broker: Broker,
        path: Path,
        info: Callable[[], dict[str, Any]] | None = None,
        cluster: ClusterView | None = None,
        node: str = "",
    ) -> None:
        self.broker = broker
        self.path = path
        # In cluster mode: listings cover the other nodes too (``node``
        # names this one in their rows).
        self.cluster = cluster
        self.node = node
        # What ``status`` reports beyond the broker: listeners, data
        # directory, start time (given by the server).
        self.info = info
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound under a temporary name, made owner-only, then renamed
            # into place before listening: no moment when another user can
            # connect. A leftover socket (a killed broker's) is replaced;
            # the data directory's lock says no live broker owns it.
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with reachable(tmp) as short:
                tmp.unlink(missing_ok=True)
                sock.bind(short)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            raise
        log.info("control socket at %s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        # Remove the socket only if it is still ours.
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the stream limit
                    writer.write(_encode({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                writer.write(_encode(await self._handle(line)))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not valid JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": "a request is an object with a string 'command'"}
        command = request["command"]
        args = request.get("args") or {}
        try:
            if command == "status":
                result = runtime.status(self.broker, args, self.info() if self.info else None)
            elif command in runtime.RUNTIME_COMMANDS:
                if not isinstance(args, dict):
                    raise ControlError("'args' must be an object")
                result = runtime.RUNTIME_COMMANDS[command](self.broker, args)
            else:
                result = execute(self.broker, command, args)
            if self.cluster is not None and command in CLUSTER_LISTINGS:
                snap = await self.cluster.snapshot()
                result = complete(self.broker, self.node, command, args, result, snap)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug: report it rather than drop the client
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}
        if command not in READ_ONLY and command not in runtime.RUNTIME_READ_ONLY:
            saved: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_saved() -> None:
                if not saved.done():
                    saved.set_result(None)

            # A reply means what the AMQP one does: definitions changed and
            # messages published or purged are on disk.
            self.broker.when_definitions_saved(lambda: self.broker.when_durable(on_saved))
            await saved
        return {"ok": True, "result": result}


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response).encode("utf-8") + b"\n"
