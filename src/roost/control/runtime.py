"""Control commands that need a running broker: listings of its queues,
exchanges, bindings, connections, channels and consumers; purging and
deleting; publishing and fetching messages; status; and definitions
export/import through the control socket.

Like ``roost.control.commands``, each takes the broker and a JSON object of
arguments and returns something JSON can encode. Message bodies travel as
text when they are UTF-8 and as base64 otherwise, as the management API's
``payload_encoding`` does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import time
from typing import Any

from pamqp import commands as C

from roost import __version__
from roost.broker import read_models
from roost.broker.access import check_not_internal
from roost.broker.broker import Broker
from roost.broker.errors import BrokerError
from roost.broker.message import Message
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost
from roost.control.commands import ControlError, str_arg, vhost_name_arg
from roost.properties import EMPTY, encode_properties
from roost.store import definitions, definitions_import

# Most messages one ``publish`` or ``get`` request handles: the client splits
# larger counts into several requests (and shows its progress between them).
MAX_BATCH = 10_000


def _vhost(broker: Broker, args: dict[str, Any]) -> VirtualHost:
    return broker.vhosts[vhost_name_arg(broker, args)]


def _queue(broker: Broker, args: dict[str, Any]) -> Queue:
    vh = _vhost(broker, args)
    name = str_arg(args, "name")
    q = vh.queues.get(name)
    if q is None:
        raise ControlError(f"queue '{name}' does not exist in vhost '{vh.name}'")
    return q


def _count(args: dict[str, Any]) -> int:
    count = args.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BATCH:
        raise ControlError(f"'count' must be an integer between 1 and {MAX_BATCH}")
    return count


# -- listings -------------------------------------------------------------


def list_queues(broker: Broker, args: dict[str, Any]) -> Any:
    vh = _vhost(broker, args)
    views = (read_models.queue_view(broker, q) for q in vh.queues.values())
    return [
        {
            "name": v.name,
            "messages": v.messages,
            "ready": v.messages_ready,
            "unacked": v.messages_unacknowledged,
            "consumers": v.consumers,
            "durable": v.durable,
            "auto_delete": v.auto_delete,
            "exclusive": v.exclusive,
        }
        for v in sorted(views, key=lambda v: v.name)
    ]


def list_exchanges(broker: Broker, args: dict[str, Any]) -> Any:
    vh = _vhost(broker, args)
    views = (read_models.exchange_view(broker, vh, ex) for ex in vh.exchanges.values())
    return [
        {
            "name": v.name,
            "type": v.type,
            "durable": v.durable,
            "auto_delete": v.auto_delete,
            "internal": v.internal,
        }
        for v in sorted(views, key=lambda v: v.name)
    ]


def _binding_row(b: read_models.BindingView) -> dict[str, Any]:
    return {
        "source": b.source,
        "destination": b.destination,
        "destination_type": b.destination_type,
        "routing_key": b.routing_key,
        "arguments": {k: str(v) for k, v in b.arguments.items()},
    }


def list_bindings(broker: Broker, args: dict[str, Any]) -> Any:
    vh = _vhost(broker, args)
    # The default exchange's implicit bindings first, as rabbitmqctl lists them.
    implicit = [_binding_row(read_models.default_binding(q)) for q in vh.queues.values()]
    rows = [_binding_row(b) for b in read_models.bindings(vh) if b.source != ""]
    key = lambda r: (r["source"], r["destination"], r["routing_key"])  # noqa: E731
    return sorted(implicit, key=key) + sorted(rows, key=key)


def list_connections(broker: Broker, args: dict[str, Any]) -> Any:
    vhost = vhost_name_arg(broker, args) if "vhost" in args else None
    return [
        {
            "peer": c.peer,
            "user": c.user,
            "vhost": c.vhost,
            "channels": len(c.channels),
            "tls": c.tls,
            "connected_s": round(c.connected_for, 1),
            "client": str(c.client_properties.get("product", "")),
        }
        for c in read_models.connections(broker, vhost)
    ]


def list_channels(broker: Broker, args: dict[str, Any]) -> Any:
    vhost = vhost_name_arg(broker, args) if "vhost" in args else None
    return [
        {
            "connection": c.peer,
            "number": ch.number,
            "user": c.user,
            "consumers": len(ch.consumers),
            "unacked": ch.messages_unacknowledged,
            "prefetch": ch.prefetch_count,
            "confirm": ch.confirm,
            "tx": ch.transactional,
        }
        for c in read_models.connections(broker, vhost)
        for ch in c.channels
    ]


def list_consumers(broker: Broker, args: dict[str, Any]) -> Any:
    return [
        {
            "queue": c.queue,
            "tag": c.tag,
            "connection": c.connection.peer if c.connection is not None else "",
            "channel": c.channel.number if c.channel is not None else 0,
            "ack_required": c.ack_required,
            "prefetch": c.prefetch_count,
            "exclusive": c.exclusive,
        }
        for c in read_models.queue_consumers(broker, _vhost(broker, args))
    ]


# -- queue operations -----------------------------------------------------


def purge(broker: Broker, args: dict[str, Any]) -> Any:
    q = _queue(broker, args)
    count = q.purge()
    return {"message": f"purged {count} message(s) from queue '{q.name}'", "count": count}


def delete_queue(broker: Broker, args: dict[str, Any]) -> Any:
    q = _queue(broker, args)
    # As an administrator may in RabbitMQ: exclusive queues included.
    count = q.vhost.remove_queue(q)
    return {"message": f"deleted queue '{q.name}' ({count} message(s))", "count": count}


def delete_exchange(broker: Broker, args: dict[str, Any]) -> Any:
    vh = _vhost(broker, args)
    name = str_arg(args, "name")
    if name == "" or name.startswith("amq."):
        raise ControlError(f"exchange '{name}' is built in and cannot be deleted")
    if name not in vh.exchanges:
        raise ControlError(f"exchange '{name}' does not exist in vhost '{vh.name}'")
    try:
        vh.delete_exchange(name)
    except BrokerError as exc:
        raise ControlError(exc.text) from None
    return {"message": f"deleted exchange '{name}'"}


def publish(broker: Broker, args: dict[str, Any]) -> Any:
    vh = _vhost(broker, args)
    name = str_arg(args, "exchange", "")
    ex = vh.exchanges.get(name)
    if ex is None:
        raise ControlError(f"exchange '{name}' does not exist in vhost '{vh.name}'")
    try:
        check_not_internal(name, ex.internal, vh.name)
    except BrokerError as exc:
        raise ControlError(exc.text) from None
    routing_key = str_arg(args, "routing_key")
    try:
        body = base64.b64decode(str_arg(args, "body_base64", ""), validate=True)
    except binascii.Error as exc:
        raise ControlError(f"'body_base64' is not base64: {exc}") from None
    persistent = bool(args.get("persistent"))
    props = encode_properties(C.Basic.Properties(delivery_mode=2)) if persistent else EMPTY
    routed = 0
    for _ in range(_count(args)):
        if vh.publish(ex, Message(name, routing_key, props, body, persistent))[0]:
            routed += 1
    return {"message": f"published {_count(args)} message(s), {routed} routed", "routed": routed}


def get(broker: Broker, args: dict[str, Any]) -> Any:
    q = _queue(broker, args)
    requeue = bool(args.get("requeue"))
    entries = []
    for _ in range(_count(args)):
        entry = q.get(no_ack=not requeue)
        if entry is None:
            break
        entries.append(entry)
    rows = []
    for entry in entries:
        m = entry.message
        try:
            payload, encoding = m.body.decode("utf-8"), "string"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(m.body).decode("ascii"), "base64"
        rows.append(
            {
                "exchange": m.exchange,
                "routing_key": m.routing_key,
                "redelivered": entry.redelivered,
                "payload_bytes": len(m.body),
                "payload_encoding": encoding,
                "payload": payload,
            }
        )
    if requeue and entries:
        q.requeue(entries)
    return rows


# -- status and definitions -------------------------------------------------


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def status(broker: Broker, args: dict[str, Any], info: dict[str, Any] | None = None) -> Any:
    info = info or {}
    totals = read_models.totals(broker.vhosts.values())
    started = info.get("started")
    data_dir = info.get("data_dir", "")
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - started, 1) if started else None,
        "listeners": info.get("listeners", []),
        "connections": len(read_models.connections(broker)),
        "vhosts": len(broker.vhosts),
        "queues": totals.queues,
        "messages": totals.messages,
        "messages_ready": totals.messages_ready,
        "messages_unacked": totals.messages_unacknowledged,
        "memory_rss": _rss(),
        "alarms": sorted(broker.alarms),
        "data_dir": data_dir,
        "store_bytes": _dir_size(data_dir) if data_dir else 0,
    }


def export_definitions(broker: Broker, args: dict[str, Any]) -> Any:
    return definitions.export(broker)


def import_definitions(broker: Broker, args: dict[str, Any]) -> Any:
    data = args.get("definitions")
    if not isinstance(data, dict):
        raise ControlError("'definitions' must be an object")
    try:
        problems = definitions_import.import_into(broker, data)
    except definitions.DefinitionsError as exc:
        raise ControlError(str(exc)) from None
    return {"message": "imported", "problems": problems}


RUNTIME_COMMANDS = {
    "list_queues": list_queues,
    "list_exchanges": list_exchanges,
    "list_bindings": list_bindings,
    "list_connections": list_connections,
    "list_channels": list_channels,
    "list_consumers": list_consumers,
    "purge": purge,
    "delete_queue": delete_queue,
    "delete_exchange": delete_exchange,
    "publish": publish,
    "get": get,
    "export_definitions": export_definitions,
    "import_definitions": import_definitions,
}
# Read nothing but the broker's state: no definitions to wait to be saved.
RUNTIME_READ_ONLY = frozenset(
    {
        "list_queues",
        "list_exchanges",
        "list_bindings",
        "list_connections",
        "list_channels",
        "list_consumers",
        "purge",
        "publish",
        "get",
        "export_definitions",
        "status",
    }
)
