"""Definitions (users, vhosts, permissions, exchanges, queues, bindings)
in RabbitMQ's definitions JSON format.

The broker's own copy lives in ``definitions.json`` in the data directory,
rewritten atomically (temp file, fsync, rename, fsync of the directory) on
every change to a durable definition. It is RabbitMQ's export format plus a
``roost`` section mapping durable queues to their ids in the message log,
so ``roost definitions export``/``import`` and RabbitMQ's own files are
interchangeable.

The ``roost`` section (``format`` 2) holds the id counter, the ids of
durable queues and delayed exchanges, and the ids of deleted ones whose
records may still be unsettled on disk. Together they attribute every
record in the log: at start-up a record whose id is neither defined nor
deleted means the file is not the one the log was written with (missing,
emptied, hand-edited, a RabbitMQ export copied over it), and the broker
refuses to start rather than delete what it cannot attribute
(:class:`Attribution`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roost import __version__, safe_regex
from roost.broker.broker import Broker
from roost.broker.delayed import DelayedExchange
from roost.broker.errors import BrokerError
from roost.broker.fields import jsonable
from roost.broker.queue import Queue
from roost.broker.users import SHA256, User, hash_password
from roost.store import fsio
from roost.store.datadir import DataDirUnsafe, read_nofollow

FILENAME = "definitions.json"
# The roost section's format: 2 records deleted ids (see Attribution).
FORMAT = 2
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
            "format": FORMAT,
            "next_queue_id": broker.next_queue_id,
            "queue_ids": queue_ids,
            "exchange_ids": exchange_ids,
            "deleted_ids": sorted(broker.deleted_store_ids),
        }
    return out


def _invalid_pattern(patterns: tuple[Any, ...]) -> str | None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            return f"pattern {pattern!r} is not a string"
        try:
            safe_regex.compile_pattern(pattern)
        except safe_regex.InvalidPattern as exc:
            return f"invalid pattern {pattern!r}: {exc}"
    return None


def apply(broker: Broker, data: dict[str, Any], *, own: bool = False) -> list[str]:
    """Create what ``data`` defines (merging into what exists); returns
    problems found, one line each, without stopping at the first.

    Only a data directory's own file (``own``, see :func:`restore`) gives
    queues their ids in the message log: ids from anywhere else would map
    stored messages onto the wrong queues."""
    if not isinstance(data, dict):
        raise DefinitionsError("definitions must be a JSON object")
    problems: list[str] = []
    internal = (data.get("roost") or {}) if own else {}
    ids = {(v, n): i for v, n, i in internal.get("queue_ids", [])}
    exchange_ids = {(v, n): i for v, n, i in internal.get("exchange_ids", [])}
    broker.next_queue_id = max(broker.next_queue_id, int(internal.get("next_queue_id", 1)))
    broker.deleted_store_ids.update(int(i) for i in internal.get("deleted_ids", []))
    for u in data.get("users", []):
        try:
            tags = u.get("tags", [])
            if isinstance(tags, str):
                tags = [t for t in tags.split(",") if t]
            if "password_hash" in u:
                user = User(
                    u["name"], u["password_hash"], tuple(tags), u.get("hashing_algorithm", SHA256)
                )
            elif u.get("password"):
                user = User(u["name"], hash_password(u["password"]), tuple(tags))
            else:
                # As RabbitMQ: a user without a password; no password logs it in.
                user = User(u["name"], "", tuple(tags))
            broker.users.put(user)
        except (KeyError, TypeError) as exc:
            problems.append(f"user {u!r}: {exc}")
    for v in data.get("vhosts", []):
        broker.add_vhost(v["name"])
    for p in data.get("permissions", []):
        try:
            patterns = (p["configure"], p["write"], p["read"])
        except KeyError as exc:
            problems.append(f"permission {p!r}: missing {exc}")
            continue
        # Imported patterns are refused as when set one by one; the data
        # directory's own file is taken as it is (access.py treats a bad
        # pattern there as permitting nothing, with a warning).
        bad = None if own else _invalid_pattern(patterns)
        if bad is not None:
            problems.append(f"permission {p!r}: {bad}")
            continue
        broker.permissions[(p["user"], p["vhost"])] = patterns
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

    The saved users and permissions replace the defaults: the default user
    (guest) exists only on a brand-new data directory, one without
    definitions. Deleting every user never brings guest back with its
    well-known password; ``roost ctl add-user`` on the stopped broker
    makes a new one."""
    broker.users.users.clear()
    broker.permissions.clear()
    return apply(broker, saved, own=True)


class Attribution:
    """Whether the log's records can all be attributed to what a data
    directory's definitions (``saved``, None when the file is missing)
    define or record as deleted.

    :meth:`check` is given the ids that still hold unsettled records but
    were not restored as queues or delayed exchanges; any that the
    definitions do not record as deleted make it raise DefinitionsError,
    before recovery changes anything on disk. Files written before format
    2 did not record deleted ids: there an id below the saved counter is
    taken as deleted, as those versions did.
    """

    def __init__(self, path: Path, saved: dict[str, Any] | None, problems: list[str]) -> None:
        self.path = path
        internal = saved.get("roost") if saved is not None else None
        self.internal = internal if isinstance(internal, dict) else None
        fmt = self.internal.get("format", 1) if self.internal is not None else 0
        self.deleted: set[int] = set()
        self.legacy_below = 0
        self.listed: dict[int, str] = {}
        if self.internal is not None:
            if fmt >= FORMAT:
                self.deleted = {int(i) for i in self.internal.get("deleted_ids", [])}
            else:
                self.legacy_below = int(self.internal.get("next_queue_id", 1))
            for kind, key in (("queue", "queue_ids"), ("exchange", "exchange_ids")):
                for vhost, name, qid in self.internal.get(key, []):
                    self.listed[int(qid)] = f"{kind} '{name}' in vhost '{vhost}'"
        self.saved = saved
        self.problems = problems

    def check(self, live: dict[int, int]) -> None:
        lost = {
            qid: n
            for qid, n in live.items()
            if qid not in self.deleted and not qid < self.legacy_below
        }
        if not lost:
            return
        total = sum(lost.values())
        if self.saved is None:
            why = f"{self.path} is missing"
        elif self.internal is None:
            why = (
                f"{self.path} has no 'roost' section (a file not written by this broker, "
                "such as a RabbitMQ export, or one edited by hand)"
            )
        else:
            named = [
                f"{self.listed[qid]} (id {qid}) could not be restored"
                for qid in sorted(lost)
                if qid in self.listed
            ]
            unnamed = [str(qid) for qid in sorted(lost) if qid not in self.listed]
            parts = named
            if unnamed:
                parts.append(f"id(s) {', '.join(unnamed)} are neither defined nor deleted")
            why = f"in {self.path}, " + "; ".join(parts)
            if self.problems:
                why += " (" + "; ".join(self.problems[:3]) + ")"
        raise DefinitionsError(
            f"the message store holds {total} unsettled message(s) that the definitions do "
            f"not account for: {why}. roost refuses to start rather than delete them; "
            "nothing was changed. Restore the definitions.json this data directory was "
            "written with (or fix the queue definitions it names), or move the data "
            "directory aside to start empty."
        )


def _restore_id(queue: Queue, qid: int | None, existed: bool) -> None:
    if qid is not None and not existed and queue.store_id != qid:
        queue.store_id = qid


def encode(data: dict[str, Any]) -> bytes:
    """``data`` as JSON, one top-level entry per line and one list item
    (user, queue, binding...) per line: as easy to read and diff as
    indented JSON, but every piece goes through json's C encoder (indent=
    makes it use the pure-Python one, about twice as slow here), which
    matters when the file is rewritten after each of 10,000 durable
    bindings."""
    if not data:
        return b"{}\n"
    parts = []
    for key, value in data.items():
        head = f"  {json.dumps(key)}: "
        if isinstance(value, list) and value:
            items = ",\n".join("    " + json.dumps(item) for item in value)
            parts.append(f"{head}[\n{items}\n  ]")
        else:
            parts.append(head + json.dumps(value))
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode("utf-8")


def write_atomic(path: Path, content: bytes) -> None:
    fsio.write_atomic(path, content)


def load(path: Path) -> dict[str, Any] | None:
    try:
        raw = read_nofollow(path)
    except FileNotFoundError:
        return None
    except DataDirUnsafe as exc:
        raise DefinitionsError(str(exc)) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DefinitionsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DefinitionsError(f"{path} does not hold a definitions object")
    return data
