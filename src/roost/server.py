"""Running a broker: recovery, listeners and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from roost.amqp.connection import AMQPConnection, ConnectionSettings
from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED
from roost.config import Config
from roost.store.durable_state import DurableState

log = logging.getLogger("roost")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = ConnectionSettings(
            channel_max=config.channel_max,
            frame_max=config.frame_max,
            heartbeat=config.heartbeat,
            consumer_timeout=config.consumer_timeout,
        )
        self.connections: set[AMQPConnection] = set()
        self.state: DurableState | None = None
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def broker(self) -> Broker:
        assert self._broker is not None, "server not started"
        return self._broker

    async def start(self) -> None:
        """Lock the data directory, recover, then listen. Raises
        ``DataDirInUse`` or ``OSError`` with a message fit for a user."""
        loop = asyncio.get_running_loop()
        state = DurableState(self.config.resolved_data_dir(), self.config.segment_size)
        try:
            broker = Broker(
                default_user=self.config.default_user,
                default_password=self.config.default_password,
                max_message_size=self.config.max_message_size,
                journal=state.store,
            )
            state.recover(broker)
            state.start(loop)
            broker.set_scheduler(loop.call_later)
            self._server = await loop.create_server(
                lambda: AMQPConnection(broker, self.settings, self.connections),
                host=self.config.host,
                port=self.config.port,
                reuse_address=True,
                backlog=1024,
            )
        except BaseException:
            state.close()
            raise
        self.state = state
        self._broker = broker
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("roost listening for AMQP on %s:%d", self.config.host, self.port)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, close every connection with 320, wait for them to
        go, then flush and fsync the store."""
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
        if self.state is not None:
            self.state.close()
            self.state = None
