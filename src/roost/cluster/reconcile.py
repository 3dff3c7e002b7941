"""Bringing a node's broker model in line with the cluster's tables.

A three-way merge: ``base`` is what this node last knew the tables to hold
(its last write or reload), ``remote`` what they hold now, and the model
itself the third side. A row the model changed since ``base`` (a local
change not yet written) is left alone: the next write sends it. Every
other row is made what ``remote`` says: created, replaced (a queue or
exchange whose properties differ was deleted and declared again
elsewhere) or deleted — a deleted queue cancels its consumers with
basic.cancel, a deleted vhost or user closes its connections, as the same
deletions on this node would.

What cannot be applied (it should not happen between nodes running the
same roost) is logged and left out of the returned base, so that it is
retried at the next reload and never written back as a deletion.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED, BrokerError
from roost.broker.users import User
from roost.broker.vhost import VirtualHost
from roost.cluster.rows import TABLES, Key, Owners, Row, Rows, decode_table, snapshot

log = logging.getLogger("roost.cluster")

# Owner of the non-exclusive queues created here (never compared).
_NO_OWNER = object()


class Merged(NamedTuple):
    base: Rows  # the new base: what the tables hold, as far as this node knows
    model: Rows  # the model's rows after the merge


def reconcile(
    broker: Broker,
    owners: Owners,
    base: Rows,
    remote: Rows,
    pending: frozenset[Key] = frozenset(),
) -> Merged:
    """Apply ``remote`` to the model. ``pending`` are local changes that
    rows do not show (a queue deleted and declared again alike)."""
    before = snapshot(broker, owners)
    dirty = {k for k in before.keys() | base.keys() if before.get(k) != base.get(k)} | pending
    by_table: dict[str, Rows] = {t: {} for t in TABLES}
    for key, row in before.items():
        by_table[key[0]][key] = row
    applied = 0

    def current(table: str) -> Rows:
        # Snapshots cost O(definitions): taken again only after a change.
        return snapshot(broker, owners, table) if applied else by_table[table]

    for table in reversed(TABLES):
        for key in current(table).keys() - remote.keys() - dirty:
            applied += _try(key, _delete, broker, key)
    for table in TABLES:
        rows = current(table)
        for key, row in remote.items():
            if key[0] == table and key not in dirty and rows.get(key) != row:
                applied += _try(key, _put, broker, owners, key, row, key in rows)
    after = snapshot(broker, owners) if applied else before
    new_base: Rows = {}
    for key in remote.keys() | after.keys() | base.keys():
        kept = remote.get(key) if key in dirty else after.get(key)
        if kept is not None:
            new_base[key] = kept
    return Merged(new_base, after)


class Missing(Exception):
    """What a row depends on (its vhost, user, exchange or queue) is not in
    the model: this node deleted it and has not written that yet. The row
    goes with the deletion; it is not applied meanwhile."""


def _try(key: Key, fn: Any, *args: Any) -> int:
    """1 when the change was applied (or tried: it may have done part)."""
    try:
        fn(*args)
        log.debug("cluster: %s %r", "deleted" if fn is _delete else "applied", key)
    except Missing as exc:
        log.debug("cluster: not applying %r: %s is gone here", key, exc)
    except (BrokerError, KeyError, ValueError, TypeError) as exc:
        log.error("cluster: cannot apply the definition change of %r: %s", key, exc)
    return 1


def _vhost(broker: Broker, name: str) -> VirtualHost:
    vh = broker.vhosts.get(name)
    if vh is None:
        raise Missing(f"vhost {name!r}")
    return vh


def _delete(broker: Broker, key: Key) -> None:
    table = key[0]
    if table == "vhost":
        broker.delete_vhost(key[1])
    elif table == "user":
        name = key[1]
        broker.users.users.pop(name, None)
        for k in [k for k in broker.permissions if k[0] == name]:
            del broker.permissions[k]
        for conn in [c for c in broker.connections if c.username == name]:
            conn.close(CONNECTION_FORCED, f"user '{name}' is deleted")
    elif table == "permission":
        broker.permissions.pop((key[1], key[2]), None)
    elif table == "exchange":
        vh = broker.vhosts.get(key[1])
        if vh is not None:
            vh.delete_exchange(key[2])
    elif table == "queue":
        vh = broker.vhosts.get(key[1])
        q = vh.queues.get(key[2]) if vh is not None else None
        if vh is not None and q is not None:
            vh.remove_queue(q)
    elif table == "binding":
        _, vhost, source, dest_type, dest_name, routing_key, args = key
        vh = broker.vhosts.get(vhost)
        if vh is None:
            return
        dest: Any = (vh.queues if dest_type == "queue" else vh.exchanges).get(dest_name)
        owner = getattr(dest, "exclusive_owner", None)
        vh.unbind(source, dest, routing_key, decode_table(args), owner)


def _put(broker: Broker, owners: Owners, key: Key, row: Row, exists: bool) -> None:
    table = key[0]
    if table == "vhost":
        broker.add_vhost(key[1])
    elif table == "user":
        password_hash, algorithm, tags = row
        broker.users.put(User(key[1], password_hash, tuple(tags), algorithm))
    elif table == "permission":
        _vhost(broker, key[2])
        if key[1] not in broker.users.users:
            raise Missing(f"user {key[1]!r}")
        broker.permissions[(key[1], key[2])] = (row[0], row[1], row[2])
    elif table == "exchange":
        vh = _vhost(broker, key[1])
        if exists:
            vh.delete_exchange(key[2])
        type_, durable, auto_delete, internal, args = row
        vh.declare_exchange(
            key[2],
            type_,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            arguments=decode_table(args),
        )
    elif table == "queue":
        vh = _vhost(broker, key[1])
        old = vh.queues.get(key[2])
        if old is not None:
            vh.remove_queue(old)
        durable, auto_delete, args, owner_epoch, owner_connection = row
        exclusive = owner_epoch is not None
        vh.declare_queue(
            key[2],
            owner=owners.resolve(owner_epoch, owner_connection) if exclusive else _NO_OWNER,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments=decode_table(args),
            replicated=True,
        )
    elif table == "binding":
        _, vhost, source, dest_type, dest_name, routing_key, args = key
        vh = _vhost(broker, vhost)
        dest: Any = (vh.queues if dest_type == "queue" else vh.exchanges).get(dest_name)
        if dest is None:
            raise Missing(f"{dest_type} {dest_name!r}")
        if source not in vh.exchanges:
            raise Missing(f"exchange {source!r}")
        vh.bind(source, dest, routing_key, decode_table(args))
