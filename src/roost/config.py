"""Configuration: defaults, overridden by a TOML file, then ``ROOST_*``
environment variables, then command-line options."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from roost import resources


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "roost"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 5672
    data_dir: str = ""
    default_user: str = "guest"
    default_password: str = "guest"
    channel_max: int = 2047
    frame_max: int = 131072
    heartbeat: int = 60
    max_message_size: int = 16 * 1024 * 1024
    max_unfinished_bytes: int = 0
    unfinished_message_timeout: int = 60
    log_level: str = "info"
    log_format: str = "text"
    uvloop: bool = True
    segment_size: int = 32 * 1024 * 1024
    consumer_timeout: int = 1800000
    loopback_users: str = "guest"
    max_connections: int = 0
    max_connections_per_vhost: int = 0
    max_connections_per_user: int = 0
    max_queues_per_vhost: int = 0
    queue_memory_limit: int = 128 * 1024 * 1024
    memory_high_watermark: str = "0.4"
    disk_free_limit: str = "50MB"
    tls_port: int = 5671
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_verify_peer: bool = False
    tls_min_version: str = "1.2"
    encryption_key_file: str = ""
    old_encryption_key_file: str = ""
    http_port: int = 15672
    http_host: str = ""
    http_tls_cert: str = ""
    http_tls_key: str = ""
    http_max_connections: int = 256
    http_header_timeout: int = 30
    http_body_timeout: int = 60
    http_max_body_size: int = 20 * 1024 * 1024
    metrics_per_object: bool = False
    metrics_auth: bool = False
    metrics_cache_seconds: int = 5
    cluster: str = ""
    node_name: str = ""
    node_timeout: int = 10
    cluster_max_pending: str = "64MB"

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()


HELP = {
    "host": "address to listen on",
    "port": "AMQP port (0 picks a free one)",
    "data_dir": "directory for all broker data (default: ~/.local/share/roost)",
    "default_user": "user created at first start",
    "default_password": "password of the default user",
    "channel_max": "highest channel number a client may open",
    "frame_max": "largest frame size offered to clients, in bytes",
    "heartbeat": "heartbeat interval offered to clients, in seconds (0 disables)",
    "max_message_size": "largest message body accepted, in bytes",
    "max_unfinished_bytes": "bytes (content headers and bodies) of messages still being "
    "received that one connection may hold, all its channels together; beyond it the "
    "connection is closed with 506 (0: four times max_message_size)",
    "unfinished_message_timeout": "seconds a client may take to send one message, from its "
    "basic.publish frame to its last body frame; a connection holding a message longer "
    "is closed with 506 (0 disables)",
    "log_level": "debug, info, warning or error",
    "log_format": "text (one line per event) or json (one JSON object per line, with "
    "fields such as event, peer, user, vhost, duration_s and reason)",
    "uvloop": "use uvloop when it is installed",
    "segment_size": "size of each message log segment file, in bytes",
    "consumer_timeout": "ms a consumer may hold an unacknowledged delivery before its "
    "channel is closed with 406, as in RabbitMQ (0 disables; queues override it "
    "with x-consumer-timeout)",
    "loopback_users": "comma-separated users that may only connect from a loopback address, "
    "as RabbitMQ's loopback_users (empty: no such restriction)",
    "max_connections": "most client connections open at once (0: no limit)",
    "max_connections_per_vhost": "most client connections open at once to any one virtual "
    "host (0: no limit)",
    "max_connections_per_user": "most client connections open at once by any one user "
    "(0: no limit)",
    "queue_memory_limit": "bytes of messages (bodies plus bookkeeping) one queue keeps in "
    "memory; beyond it messages are paged to the message log",
    "memory_high_watermark": "memory alarm threshold: a fraction of the RAM (a number up to "
    "1, as RabbitMQ's 0.4) or an absolute size such as 256MB or 1GiB; above it publishers "
    "are blocked and queues page new messages to disk until memory falls",
    "disk_free_limit": "disk alarm threshold: publishers are blocked while the data "
    "directory's filesystem has less free space than this size (such as 50MB or 1GiB; "
    "0 turns the check off)",
    "max_queues_per_vhost": "most queues in any one virtual host; declaring one more is "
    "refused with 406 (0: no limit)",
    "tls_port": "amqps (AMQP over TLS) port, used only when tls_cert is set (0 picks a free one)",
    "tls_cert": "PEM certificate chain of the TLS listener; setting it enables amqps",
    "tls_key": "PEM private key of tls_cert (empty: the key is in the tls_cert file)",
    "tls_ca": "PEM CA bundle that client certificates must be signed by",
    "tls_verify_peer": "require a client certificate signed by tls_ca; also offers SASL "
    "EXTERNAL (login as the user named by the certificate's CN)",
    "tls_min_version": "lowest TLS version accepted: 1.2 or 1.3",
    "encryption_key_file": "file holding a base64 AES-256 key (make one with `roost keygen "
    "FILE`): message bodies, properties, exchange and routing key are then encrypted in "
    "the message store; alternatively put the key itself in ROOST_ENCRYPTION_KEY",
    "old_encryption_key_file": "comma-separated key files of earlier keys: messages "
    "stored under them stay readable while new ones use the current key (key rotation)",
    "http_port": "port of the HTTP management API (RabbitMQ's management API; 0 picks a "
    "free one, -1 turns it off)",
    "http_host": "address the management API listens on (empty: the same as host)",
    "http_tls_cert": "PEM certificate chain for the management API; setting it serves the "
    "API over HTTPS (only) on http_port",
    "http_tls_key": "PEM private key of http_tls_cert (empty: the key is in the "
    "http_tls_cert file)",
    "http_max_connections": "most management API connections open at once; one more is "
    "answered 503 and closed (0: no limit)",
    "http_header_timeout": "seconds a management API client has to send a request's "
    "headers (from its first byte, or from connecting); an idle keep-alive connection is "
    "closed after twice this",
    "http_body_timeout": "seconds a management API client has to send a request's body "
    "once its headers are in",
    "http_max_body_size": "largest management API request body, in bytes (413 beyond it); "
    "a definitions import must fit (0: no limit)",
    "metrics_per_object": "also serve per-queue, per-exchange and per-vhost metrics at "
    "/metrics (as RabbitMQ's prometheus.return_per_object_metrics); they are always at "
    "/metrics/per-object",
    "metrics_auth": "require the management API's basic auth (a user with a management "
    "tag) on /metrics",
    "metrics_cache_seconds": "seconds a rendered /metrics page is served again to later "
    "scrapes before it is rendered anew (0: render every scrape)",
    "cluster": "PostgreSQL URL (postgresql://user:pass@host/db) of a cluster: nodes sharing "
    "it share users, vhosts, exchanges, queues and bindings (empty: a single node keeping "
    "everything in data_dir)",
    "node_name": "this node's name in the cluster, unique to it: a node started with the "
    "name of a running one takes over from it, as from its own earlier run (empty: this "
    "machine's hostname:port)",
    "node_timeout": "seconds a cluster node may go without a heartbeat before the others "
    "declare it dead and take over what it held",
    "cluster_max_pending": "bytes of published messages a cluster node may hold waiting for "
    "PostgreSQL's COMMIT (such as 64MB); above it publishers are blocked, as by the memory "
    "alarm, until half of it is written",
}


class ConfigError(ValueError):
    pass


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from exc
    if isinstance(value, list):
        # A TOML list for a comma-separated option (loopback_users = []).
        return ",".join(str(v) for v in value)
    return str(value)


_TYPES = {"int": int, "bool": bool, "str": str}


def load_config(
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    cfg = Config()
    kinds = {f.name: _TYPES[str(f.type)] for f in fields(Config)}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        table = data.get("roost", data)
        unknown = sorted(set(k.replace("-", "_") for k in table) - set(kinds))
        if unknown:
            raise ConfigError(f"config file {file}: unknown option(s): {', '.join(unknown)}")
        layers.append((file, {k.replace("-", "_"): v for k, v in table.items()}))
    environ = os.environ if env is None else env
    layers.append(
        (
            "environment",
            {
                name: environ[f"ROOST_{name.upper()}"]
                for name in kinds
                if f"ROOST_{name.upper()}" in environ
            },
        )
    )
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    for _, layer in layers:
        for name, value in layer.items():
            setattr(cfg, name, _coerce(name, kinds[name], value))
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port: {cfg.port} is not between 0 and 65535")
    if cfg.frame_max < 4096:
        raise ConfigError("frame_max: must be at least 4096")
    if not 1 <= cfg.channel_max <= 65535:
        raise ConfigError("channel_max: must be between 1 and 65535")
    if not 64 * 1024 <= cfg.segment_size <= 1024**3:
        raise ConfigError("segment_size: must be between 65536 and 1073741824")
    if cfg.max_message_size < 1:
        raise ConfigError("max_message_size: must be positive")
    if cfg.max_unfinished_bytes < 0:
        raise ConfigError(
            "max_unfinished_bytes: must not be negative (0 means four times max_message_size)"
        )
    if cfg.unfinished_message_timeout < 0:
        raise ConfigError("unfinished_message_timeout: must not be negative (0 disables it)")
    if cfg.consumer_timeout < 0:
        raise ConfigError("consumer_timeout: must not be negative (0 disables it)")
    for limit in (
        "max_connections",
        "max_connections_per_vhost",
        "max_connections_per_user",
        "max_queues_per_vhost",
    ):
        if getattr(cfg, limit) < 0:
            raise ConfigError(f"{limit}: must not be negative (0 means no limit)")
    try:
        resources.parse_memory_watermark(cfg.memory_high_watermark, 1)
    except ValueError as exc:
        raise ConfigError(f"memory_high_watermark: {exc}") from None
    try:
        resources.parse_size(cfg.disk_free_limit)
    except ValueError as exc:
        raise ConfigError(f"disk_free_limit: {exc}") from None
    try:
        if resources.parse_size(cfg.cluster_max_pending) <= 0:
            raise ValueError("must be above 0")
    except ValueError as exc:
        raise ConfigError(f"cluster_max_pending: {exc}") from None
    if not 0 <= cfg.tls_port <= 65535:
        raise ConfigError(f"tls_port: {cfg.tls_port} is not between 0 and 65535")
    if not -1 <= cfg.http_port <= 65535:
        raise ConfigError(f"http_port: {cfg.http_port} is not between -1 (off) and 65535")
    for bound in ("http_max_connections", "http_max_body_size", "metrics_cache_seconds"):
        if getattr(cfg, bound) < 0:
            raise ConfigError(f"{bound}: must not be negative")
    for timeout in ("http_header_timeout", "http_body_timeout"):
        if getattr(cfg, timeout) < 1:
            raise ConfigError(f"{timeout}: must be at least 1 (second)")
    if cfg.node_timeout < 3:
        # Heartbeats go every node_timeout/3 seconds: below 3, a busy node
        # or a slow commit would be declared dead while it is alive.
        raise ConfigError("node_timeout: must be at least 3 (seconds)")
    if cfg.cluster and not cfg.cluster.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "cluster: expected a PostgreSQL URL (postgresql://user:password@host/database)"
        )
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {cfg.log_format!r}")
    if cfg.tls_min_version not in ("1.2", "1.3"):
        raise ConfigError(f"tls_min_version: expected 1.2 or 1.3, got {cfg.tls_min_version!r}")
    if not cfg.tls_cert and (cfg.tls_key or cfg.tls_ca or cfg.tls_verify_peer):
        raise ConfigError("tls_key, tls_ca and tls_verify_peer need tls_cert")
    if cfg.http_tls_key and not cfg.http_tls_cert:
        raise ConfigError("http_tls_key needs http_tls_cert")
    if cfg.tls_verify_peer and not cfg.tls_ca:
        raise ConfigError(
            "tls_verify_peer: needs tls_ca (the CA client certificates must be signed by)"
        )
    return cfg
