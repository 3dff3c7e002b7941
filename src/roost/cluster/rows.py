"""The broker's definitions as rows of the cluster's tables.

A snapshot maps a key — the table and the row's primary key — to the
row's other columns, exactly as they are stored, so that two snapshots (or
a snapshot and what was read from PostgreSQL) compare with ``==``:

====================================================  =========================================
key                                                   value
====================================================  =========================================
("vhost", name)                                       ()
("user", name)                                        (password_hash, algorithm, tags)
("permission", user, vhost)                           (configure, write, read)
("exchange", vhost, name)                             (type, durable, auto_delete, internal, args)
("queue", vhost, name)                                (durable, auto_delete, args, owner_epoch,
                                                      owner_connection)
("binding", vhost, source, dest_type, dest, key,     ()
args)
====================================================  =========================================

Arguments are AMQP field tables in AMQP's encoding, keys sorted, so equal
tables give equal bytes and the types survive the round trip. The default
exchange, its implicit bindings and the ``amq.*`` exchanges every vhost
has are not rows.

An exclusive queue names its owner: the node epoch and a label of the
owning connection. On the other nodes the owner is a :class:`RemoteOwner`,
one object per (epoch, connection), so that the broker's identity checks
(405 RESOURCE_LOCKED to everyone else) work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pamqp import decode, encode

from roost.broker.broker import Broker
from roost.broker.queue import Queue

Key = tuple[Any, ...]
Row = tuple[Any, ...]
Rows = dict[Key, Row]

# In dependency order: a row may need rows of the tables before it.
TABLES = ("vhost", "user", "permission", "exchange", "queue", "binding")


def encode_table(table: dict[str, Any] | None) -> bytes:
    if not table:
        return b""
    return bytes(encode.field_table(dict(sorted(table.items()))))


def decode_table(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    _, table = decode.field_table(bytes(raw))
    return dict(table)


class TableEncodings:
    """encode_table for snapshots, each table encoded once: a snapshot is
    taken on every change, and the arguments of thousands of queues and
    bindings would otherwise be encoded again every time. Keyed by the
    table's identity; the entry holds the table, so the id is not reused
    while cached, and compares it, so a table changed in place is encoded
    anew. Entries not used by a whole snapshot are dropped after it."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[dict[str, Any], dict[str, Any], bytes]] = {}
        self._used: dict[int, tuple[dict[str, Any], dict[str, Any], bytes]] | None = None

    def encode(self, table: dict[str, Any] | None) -> bytes:
        if not table:
            return b""
        entry = self._cache.get(id(table))
        if entry is None or entry[0] is not table or entry[1] != table:
            entry = self._cache[id(table)] = (table, dict(table), encode_table(table))
        if self._used is not None:
            self._used[id(table)] = entry
        return entry[2]

    def begin(self) -> None:
        self._used = {}

    def end(self) -> None:
        if self._used is not None:
            self._cache, self._used = self._used, None


class RemoteOwner:
    """The owner of an exclusive queue declared on another node (or by an
    earlier incarnation of this one)."""

    __slots__ = ("connection", "epoch")

    def __init__(self, epoch: int, connection: str) -> None:
        self.epoch = epoch
        self.connection = connection

    def __repr__(self) -> str:
        return f"RemoteOwner({self.epoch}, {self.connection!r})"


class Owners:
    """Maps exclusive owners to (epoch, connection label) and back."""

    def __init__(self) -> None:
        self.epoch = 0  # this node's current epoch
        self._remote: dict[tuple[int, str], RemoteOwner] = {}
        # Kept here as the one object every snapshot of a node is given.
        self.tables = TableEncodings()

    def describe(self, owner: object) -> tuple[int, str]:
        if isinstance(owner, RemoteOwner):
            return owner.epoch, owner.connection
        # A local connection: its peer address, and its identity to tell
        # apart two connections from the same address over time.
        return self.epoch, f"{getattr(owner, 'peer', '')}#{id(owner):x}"

    def resolve(self, epoch: int, connection: str) -> RemoteOwner:
        key = (epoch, connection)
        owner = self._remote.get(key)
        if owner is None:
            owner = self._remote[key] = RemoteOwner(epoch, connection)
        return owner

    def retain(self, rows: Rows) -> None:
        """Forget the owners no queue of ``rows`` names any more (one per
        remote connection that ever declared an exclusive queue, otherwise)."""
        named = {(r[3], r[4]) for k, r in rows.items() if k[0] == "queue" and r[3] is not None}
        for key in [k for k in self._remote if k not in named]:
            del self._remote[key]


def snapshot(broker: Broker, owners: Owners, table: str | None = None) -> Rows:
    """The rows of one table (all tables when ``table`` is None)."""
    rows: Rows = {}
    if table is None:
        owners.tables.begin()
    for t in TABLES if table is None else (table,):
        rows.update(_ROWS[t](broker, owners))
    if table is None:
        owners.tables.end()
    return rows


def _vhosts(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for name in broker.vhosts:
        yield ("vhost", name), ()


def _users(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for u in broker.users.users.values():
        yield ("user", u.name), (u.password_hash, u.algorithm, tuple(u.tags))


def _permissions(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for (user, vhost), (c, w, r) in broker.permissions.items():
        yield ("permission", user, vhost), (c, w, r)


def is_shared_exchange(name: str) -> bool:
    """Every vhost has the default and amq.* exchanges of its own."""
    return bool(name) and not name.startswith("amq.")


def _exchanges(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for vname, vh in broker.vhosts.items():
        for ex in vh.exchanges.values():
            if is_shared_exchange(ex.name):
                yield (
                    ("exchange", vname, ex.name),
                    (
                        ex.type_name,
                        ex.durable,
                        ex.auto_delete,
                        ex.internal,
                        owners.tables.encode(ex.arguments),
                    ),
                )


def queue_row(q: Queue, owners: Owners) -> Row:
    epoch: int | None = None
    connection: str | None = None
    if q.exclusive_owner is not None:
        epoch, connection = owners.describe(q.exclusive_owner)
    return (q.durable, q.auto_delete, owners.tables.encode(q.arguments), epoch, connection)


def _queues(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for vname, vh in broker.vhosts.items():
        for q in vh.queues.values():
            yield ("queue", vname, q.name), queue_row(q, owners)


def _bindings(broker: Broker, owners: Owners) -> Iterator[tuple[Key, Row]]:
    for vname, vh in broker.vhosts.items():
        for ex in vh.exchanges.values():
            if not ex.name:
                continue  # the default exchange's bindings are implicit
            for b in ex.bindings.values():
                yield (
                    (
                        "binding",
                        vname,
                        ex.name,
                        b.destination.kind,
                        b.destination.name,
                        b.routing_key,
                        owners.tables.encode(b.arguments),
                    ),
                    (),
                )


_ROWS = {
    "vhost": _vhosts,
    "user": _users,
    "permission": _permissions,
    "exchange": _exchanges,
    "queue": _queues,
    "binding": _bindings,
}
