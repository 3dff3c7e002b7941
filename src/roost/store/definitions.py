"""Definitions (users, vhosts, permissions, exchanges, queues, bindings)
in RabbitMQ's definitions JSON format.

The broker's own copy lives in ``definitions.json`` in the data directory,
rewritten atomically (temp file, fsync, rename, fsync of the directory) on
every change to a durable definition. It is RabbitMQ's export format plus a
``roost`` section mapping durable queues to their ids in the message log,
so ``roost definitions export``/``import`` and RabbitMQ's own files are
interchangeable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from roost import __version__
from roost.broker.broker import Broker
from roost.broker.delayed import DelayedExchange
from roost.broker.errors import BrokerError
from roost.broker.fields import jsonable
from roost.broker.queue import Queue
from roost.broker.users import SHA256, User, hash_password

FILENAME = "definitions.json"
_SYSTEM_OWNER = object()  # owner for queues created from definitions (never exclusive)


class DefinitionsError(ValueError):
    pass


def export(broker: Broker, include_internal: bool = False) -> dict[str, Any]:
    users = [
        {
            "name": u.name,
            "password_hash": u.password_hash,
            "hashing_algorithm": u.algorithm,
            "tags": list(u.tags),
            "limits": {},
        }
        for u in broker.users.users.values()
    ]
    vhosts = [{"name": name, "limits": [], "metadata": {}} for name in broker.vhosts]
    permissions = [
        {"user": user, "vhost": vhost, "configure": c, "write": w, "read": r}
        for (user, vhost), (c, w, r) in broker.permissions.items()
    ]
    queues: list[dict[str, Any]] = []
    exchanges: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    queue_ids: list[list[Any]] = []
    exchange_ids: list[list[Any]] = []
    for vname, vh in broker.vhosts.items():
        for q in vh.queues.values():
            if not q.durable:
                continue
            queues.append(
                {
                    "name": q.name,
                    "vhost": vname,
                    "durable": True,
                    "auto_delete": q.auto_delete,
                    "arguments": jsonable(q.arguments),
                }
            )
            if q.store_id:
                queue_ids.append([vname, q.name, q.store_id])
        for ex in vh.exchanges.values():
            if not ex.durable or not ex.name or ex.name.startswith("amq."):
                continue
            if isinstance(ex, DelayedExchange) and ex.store_id:
                exchange_ids.append([vname, ex.name, ex.store_id])
            exchanges.append(
                {
                    "name": ex.name,
                    "vhost": vname,
                    "type": ex.type_name,
                    "durable": True,
                    "auto_delete": ex.auto_delete,
                    "internal": ex.internal,
                    "arguments": jsonable(ex.arguments),
                }
            )
        for ex in vh.exchanges.values():
            if not ex.durable or not ex.name:
                continue
            for b in ex.bindings.values():
                if not b.destination.durable:
                    continue
                bindings.append(
                    {
                        "source": ex.name,
                        "vhost": vname,
                        "destination": b.destination.name,
                        "destination_type": b.destination.kind,
                        "routing_key": b.routing_key,
                        "arguments": jsonable(b.arguments),
                    }
                )
    out: dict[str, Any] = {
        "rabbit_version": "3.10.8",
        "rabbitmq_version": "3.10.8",
        "product_name": "roost",
        "product_version": __version__,
        "users": users,
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }
    if include_internal:
        out["roost"] = {
            "next_queue_id": broker.next_queue_id,
            "queue_ids": queue_ids,
            "exchange_ids": exchange_ids,
        }
    return out


def apply(broker: Broker, data: dict[str, Any]) -> list[str]:
    """Create what ``data`` defines (merging into what exists); returns
    problems found, one line each, without stopping at the first."""
    if not isinstance(data, dict):
        raise DefinitionsError("definitions must be a JSON object")
    problems: list[str] = []
    internal = data.get("roost") or {}
    ids = {(v, n): i for v, n, i in internal.get("queue_ids", [])}
    exchange_ids = {(v, n): i for v, n, i in internal.get("exchange_ids", [])}
    broker.next_queue_id = max(broker.next_queue_id, int(internal.get("next_queue_id", 1)))
    for u in data.get("users", []):
        try:
            tags = u.get("tags", [])
            if isinstance(tags, str):
                tags = [t for t in tags.split(",") if t]
            if "password_hash" in u:
                user = User(
                    u["name"], u["password_hash"], tuple(tags), u.get("hashing_algorithm", SHA256)
                )
            else:
                user = User(u["name"], hash_password(u.get("password", "")), tuple(tags))
            broker.users.put(user)
        except (KeyError, TypeError) as exc:
            problems.append(f"user {u!r}: {exc}")
    for v in data.get("vhosts", []):
        broker.add_vhost(v["name"])
    for p in data.get("permissions", []):
        try:
            broker.permissions[(p["user"], p["vhost"])] = (p["configure"], p["write"], p["read"])
        except KeyError as exc:
            problems.append(f"permission {p!r}: missing {exc}")
    for x in data.get("exchanges", []):
        vh = broker.vhosts.get(x.get("vhost", "/"))
        if vh is None:
            problems.append(f"exchange {x.get('name')!r}: no vhost {x.get('vhost')!r}")
            continue
        if not x.get("name") or x["name"].startswith("amq."):
            continue
        existed = x["name"] in vh.exchanges
        try:
            ex = vh.declare_exchange(
                x["name"],
                x.get("type", "direct"),
                durable=bool(x.get("durable", True)),
                auto_delete=bool(x.get("auto_delete", False)),
                internal=bool(x.get("internal", False)),
                arguments=x.get("arguments") or {},
            )
        except BrokerError as exc:
            problems.append(f"exchange {x['name']!r} in vhost {vh.name!r}: {exc}")
            continue
        # A delayed exchange's held messages are logged under its saved id.
        # Kept also without a message log (offline edits by `roost ctl` and
        # `roost definitions import`), so the rewritten file still has it.
        xid = exchange_ids.get((vh.name, x["name"]))
        if isinstance(ex, DelayedExchange) and xid is not None and not existed:
            ex.store_id = xid
    for q in data.get("queues", []):
        vh = broker.vhosts.get(q.get("vhost", "/"))
        if vh is None:
            problems.append(f"queue {q.get('name')!r}: no vhost {q.get('vhost')!r}")
            continue
        name = q.get("name", "")
        existed = name in vh.queues
        try:
            queue = vh.declare_queue(
                name,
                owner=_SYSTEM_OWNER,
                durable=bool(q.get("durable", True)),
                auto_delete=bool(q.get("auto_delete", False)),
                arguments=q.get("arguments") or {},
            )
        except BrokerError as exc:
            problems.append(f"queue {name!r} in vhost {vh.name!r}: {exc}")
            continue
        _restore_id(queue, ids.get((vh.name, name)), existed)
    for b in data.get("bindings", []):
        vh = broker.vhosts.get(b.get("vhost", "/"))
        if vh is None:
            problems.append(f"binding {b!r}: no vhost")
            continue
        try:
            dest: Any
            if b.get("destination_type", "queue") == "queue":
                dest = vh.queue(b["destination"], _SYSTEM_OWNER)
            else:
                dest = vh.exchange(b["destination"])
            vh.bind(b["source"], dest, b.get("routing_key", ""), b.get("arguments") or {})
        except (BrokerError, KeyError) as exc:
            problems.append(f"binding {b.get('source')!r} -> {b.get('destination')!r}: {exc}")
    return problems


def restore(broker: Broker, saved: dict[str, Any]) -> list[str]:
    """Load a data directory's own definitions into a fresh broker.

    The saved users and permissions replace the defaults, so a deleted
    default user stays deleted; only definitions without any user get the
    default user back (a broker nobody could log in to is no use)."""
    broker.users.users.clear()
    broker.permissions.clear()
    problems = apply(broker, saved)
    broker.ensure_default_user()
    return problems


def _restore_id(queue: Queue, qid: int | None, existed: bool) -> None:
    if qid is not None and not existed and queue.store_id != qid:
        queue.store_id = qid


def encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=False).encode("utf-8") + b"\n"


def write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DefinitionsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DefinitionsError(f"{path} does not hold a definitions object")
    return data
