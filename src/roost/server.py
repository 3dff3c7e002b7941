"""Running a broker: recovery, listeners and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from roost.amqp.connection import AMQPConnection, ConnectionSettings
from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED
from roost.config import Config
from roost.control.server import ControlServer
from roost.control.socket_path import control_socket
from roost.http.app import build_app
from roost.http.limits import (
    ConnectionGuard,
    HTTPLimits,
    guarded_factory,
    quiet_unparsable_requests,
)
from roost.http.metrics import MetricsOptions
from roost.resources import ResourceMonitor, parse_memory_watermark, parse_size, total_ram
from roost.store.datadir import DataDirLock
from roost.store.durable_state import DurableState
from roost.store.encryption import load_keyring
from roost.tls import TLSError, server_context

if TYPE_CHECKING:
    from roost.cluster.runtime import ClusterNode

log = logging.getLogger("roost")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = ConnectionSettings(
            channel_max=config.channel_max,
            frame_max=config.frame_max,
            heartbeat=config.heartbeat,
            consumer_timeout=config.consumer_timeout,
            max_unfinished_bytes=config.max_unfinished_bytes,
            unfinished_message_timeout=config.unfinished_message_timeout,
        )
        self.connections: set[AMQPConnection] = set()
        self.state: DurableState | None = None
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self.control: ControlServer | None = None
        self.port = 0
        self.tls_port = 0  # 0 while there is no amqps listener
        self._http: web.AppRunner | None = None
        self._http_server: asyncio.Server | None = None
        self._http_connections: set[ConnectionGuard] = set()
        self.http_port = 0  # 0 while the management API is not served
        self._http_tls: ssl.SSLContext | None = None  # HTTPS when http_tls_cert is set
        self.started = time.time()
        self.resources: ResourceMonitor | None = None  # the memory and disk alarms
        # Cluster mode (config.cluster): this node of the cluster, and the
        # data directory's lock (there is no DurableState to hold it).
        self.cluster: ClusterNode | None = None
        self._lock: DataDirLock | None = None

    @property
    def broker(self) -> Broker:
        assert self._broker is not None, "server not started"
        return self._broker

    async def start(self) -> None:
        """Lock the data directory, recover, then listen. Raises
        ``DataDirInUse``, ``TLSError`` or ``OSError`` with a message fit
        for a user."""
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if self.config.tls_cert:
            # Before touching the data directory: a bad certificate is a
            # configuration mistake and should fail fast.
            tls = server_context(
                self.config.tls_cert,
                self.config.tls_key,
                self.config.tls_ca,
                self.config.tls_verify_peer,
                self.config.tls_min_version,
            )
        if self.config.http_tls_cert:
            # The management API's own certificate, checked as early.
            self._http_tls = server_context(self.config.http_tls_cert, self.config.http_tls_key)
        # Also before the data directory: a key file that cannot be read.
        keyring = load_keyring(
            self.config.encryption_key_file, self.config.old_encryption_key_file, os.environ
        )
        clustered = bool(self.config.cluster)
        state: DurableState | None = None
        if clustered:
            # No message log: definitions and messages live in PostgreSQL.
            # The data directory still holds the control socket; locked so
            # that two nodes never share it.
            self._lock = DataDirLock(self.config.resolved_data_dir())
            self._lock.acquire()
        else:
            state = DurableState(self.config.resolved_data_dir(), self.config.segment_size, keyring)
        try:
            broker = Broker(
                default_user=self.config.default_user,
                default_password=self.config.default_password,
                max_message_size=self.config.max_message_size,
                # In cluster mode no local journal: the message layer (rows
                # in PostgreSQL) plugs in at _join_cluster.
                journal=state.store if state is not None else None,
                max_connections=self.config.max_connections,
                max_connections_per_vhost=self.config.max_connections_per_vhost,
                max_connections_per_user=self.config.max_connections_per_user,
                max_queues_per_vhost=self.config.max_queues_per_vhost,
                queue_memory_limit=self.config.queue_memory_limit,
                loopback_users=[
                    u.strip() for u in self.config.loopback_users.split(",") if u.strip()
                ],
            )
            if state is not None:
                state.recover(broker)
                state.start(loop)
            broker.set_scheduler(loop.call_later)
            self.resources = ResourceMonitor(
                broker,
                memory_limit=parse_memory_watermark(self.config.memory_high_watermark, total_ram()),
                disk_free_limit=parse_size(self.config.disk_free_limit),
                data_dir=self.config.resolved_data_dir(),
            )
            self.resources.start(loop.call_later)
            self._server = await loop.create_server(
                lambda: AMQPConnection(broker, self.settings, self.connections),
                host=self.config.host,
                port=self.config.port,
                reuse_address=True,
                backlog=1024,
                # A cluster node accepts clients once it has the definitions.
                start_serving=not clustered,
            )
            if tls is not None:
                try:
                    self._tls_server = await loop.create_server(
                        lambda: AMQPConnection(broker, self.settings, self.connections),
                        host=self.config.host,
                        port=self.config.tls_port,
                        reuse_address=True,
                        backlog=1024,
                        ssl=tls,
                        # The AMQP handshake timer starts only after TLS is up.
                        ssl_handshake_timeout=self.settings.handshake_timeout,
                        start_serving=not clustered,
                    )
                except OSError as exc:
                    raise TLSError(
                        f"cannot listen on {self.config.host}:{self.config.tls_port}: "
                        f"{exc.strerror or exc}"
                    ) from exc
            if clustered:
                await self._join_cluster(broker)
        except BaseException:
            for server in (self._server, self._tls_server):
                if server is not None:
                    server.close()
            self._server = self._tls_server = None
            if self.cluster is not None:
                await self.cluster.stop()
                self.cluster = None
            if state is not None:
                state.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            raise
        self.state = state
        self._broker = broker
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("roost listening for AMQP on %s:%d", self.config.host, self.port)
        if self._tls_server is not None:
            self.tls_port = self._tls_server.sockets[0].getsockname()[1]
            log.info("roost listening for AMQP over TLS on %s:%d", self.config.host, self.tls_port)
        if self.config.http_port >= 0:
            await self._start_http(broker)
        if self.cluster is not None:
            http = f"{self.config.http_host or self.config.host}:{self.http_port}"
            await self.cluster.set_addresses(
                f"{self.config.host}:{self.port}", http if self.http_port else ""
            )
        # For ``roost ctl``; without it the broker still serves, and ctl
        # reports that the data directory is in use.
        control = ControlServer(
            broker,
            control_socket(self.config.resolved_data_dir()),
            self._status_info,
            cluster=self.cluster.views if self.cluster is not None else None,
            node=self.cluster.name if self.cluster is not None else "",
        )
        try:
            await control.start()
            self.control = control
        except OSError as exc:
            log.error("cannot create the control socket %s: %s", control.path, exc)

    async def _join_cluster(self, broker: Broker) -> None:
        """Register as a node, load the shared definitions, then serve."""
        from roost.cluster.runtime import ClusterNode

        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        node = ClusterNode(
            self.config.cluster,
            # The machine's name, not the listen address: nodes on several
            # machines all listening on 0.0.0.0 still get names of their own.
            self.config.node_name or f"{socket.gethostname()}:{port}",
            self.config.node_timeout,
            parse_size(self.config.cluster_max_pending),
        )
        self.cluster = node
        await node.register(self._fenced)
        # With the epoch known and before the definitions create the queues:
        # messages live in PostgreSQL, shared by every node.
        await node.start_messages(broker)
        await node.load(broker)
        await self._server.start_serving()
        if self._tls_server is not None:
            await self._tls_server.start_serving()

    async def _fenced(self) -> None:
        """The cluster declared this node's incarnation dead (it was paused
        or cut off too long): what its clients were doing is void, and
        others may already hold it. Close every connection first."""
        for conn in list(self.connections):
            conn.close(
                CONNECTION_FORCED,
                "broker forced connection closure with reason 'node declared dead by the cluster'",
            )

    def _status_info(self) -> dict[str, Any]:
        """For ``roost ctl status``: what the broker model does not know."""
        listeners = [{"protocol": "amqp", "ip_address": self.config.host, "port": self.port}]
        if self.tls_port:
            listeners.append(
                {"protocol": "amqp/ssl", "ip_address": self.config.host, "port": self.tls_port}
            )
        if self.http_port:
            host = self.config.http_host or self.config.host
            listeners.append(
                {"protocol": self.http_scheme, "ip_address": host, "port": self.http_port}
            )
        return {
            "listeners": listeners,
            "data_dir": str(self.config.resolved_data_dir()),
            "started": self.started,
        }

    async def _start_http(self, broker: Broker) -> None:
        """Serve the management API on this loop. Failing to listen is
        logged, not fatal (like the control socket): the broker's job is
        AMQP, and a second roost or a RabbitMQ on the same machine often
        already holds 15672."""
        host = self.config.http_host or self.config.host
        listeners = [{"protocol": "amqp", "ip_address": self.config.host, "port": self.port}]
        if self.tls_port:
            listeners.append(
                {"protocol": "amqp/ssl", "ip_address": self.config.host, "port": self.tls_port}
            )
        limits = HTTPLimits(
            max_connections=self.config.http_max_connections,
            header_timeout=self.config.http_header_timeout,
            body_timeout=self.config.http_body_timeout,
        )
        runner = web.AppRunner(
            build_app(
                broker,
                listeners,
                str(self.config.resolved_data_dir()),
                self.started,
                client_max_size=self.config.http_max_body_size,
                metrics=MetricsOptions(
                    per_object=self.config.metrics_per_object,
                    auth=self.config.metrics_auth,
                    cache_seconds=self.config.metrics_cache_seconds,
                ),
                node_name=self.cluster.name if self.cluster is not None else None,
                cluster_nodes=self.cluster.nodes if self.cluster is not None else None,
                cluster_view=self.cluster.views if self.cluster is not None else None,
                cluster_metrics=self.cluster.metrics if self.cluster is not None else None,
            ),
            access_log=None,
            shutdown_timeout=1.0,
            # An idle keep-alive connection holds a slot of http_max_connections.
            # Later than the guard's header timer, which answers 408 where
            # aiohttp's keep-alive timer would close without a word.
            keepalive_timeout=2 * self.config.http_header_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        quiet_unparsable_requests()
        try:
            # Not a TCPSite: each connection's protocol is wrapped in a guard
            # that enforces the connection cap and the read timeouts.
            self._http_server = await asyncio.get_running_loop().create_server(
                guarded_factory(runner.server, limits, self._http_connections),
                host,
                self.config.http_port,
                reuse_address=True,
                ssl=self._http_tls,
                backlog=1024,
            )
        except OSError as exc:
            log.error(
                "cannot serve the management API on %s:%d: %s",
                host,
                self.config.http_port,
                exc.strerror or exc,
            )
            await runner.cleanup()
            return
        self._http = runner
        self.http_port = self._http_server.sockets[0].getsockname()[1]
        scheme = self.http_scheme
        listeners.append({"protocol": scheme, "ip_address": host, "port": self.http_port})
        log.info("roost serving the management API on %s://%s:%d", scheme, host, self.http_port)

    @property
    def http_scheme(self) -> str:
        """How the management API is served: "https" with http_tls_cert."""
        return "https" if self._http_tls is not None else "http"

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, close every connection with 320, wait for them to
        go, then flush and fsync the store."""
        if self.resources is not None:
            self.resources.stop()
            self.resources = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self._http_server is not None:
            self._http_server.close()
            self._http_server = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
            self.http_port = 0
        if self._server is not None:
            self._server.close()
        if self._tls_server is not None:
            self._tls_server.close()
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
        if self._tls_server is not None:
            await self._tls_server.wait_closed()
            self._tls_server = None
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
        if self.state is not None:
            self.state.close()
            self.state = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
