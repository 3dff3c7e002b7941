"""Running a broker: listeners, start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from roost.amqp.connection import AMQPConnection, ConnectionSettings
from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED
from roost.config import Config

log = logging.getLogger("roost")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.broker = Broker(
            default_user=config.default_user,
            default_password=config.default_password,
            max_message_size=config.max_message_size,
        )
        self.settings = ConnectionSettings(
            channel_max=config.channel_max,
            frame_max=config.frame_max,
            heartbeat=config.heartbeat,
        )
        self.connections: set[AMQPConnection] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: AMQPConnection(self.broker, self.settings, self.connections),
            host=self.config.host,
            port=self.config.port,
            reuse_address=True,
            backlog=1024,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("roost listening for AMQP on %s:%d", self.config.host, self.port)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, close every connection with 320, wait for them to go."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close(CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'")
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
