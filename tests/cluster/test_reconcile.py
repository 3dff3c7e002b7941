"""The three-way merge of the cluster's tables into a broker model (no
database needed: the tables are given as rows)."""

from __future__ import annotations

import pytest

from roost.broker.broker import Broker
from roost.broker.errors import BrokerError
from roost.cluster.reconcile import reconcile
from roost.cluster.rows import Owners, RemoteOwner, Rows, decode_table, encode_table, snapshot


def _node() -> tuple[Broker, Owners]:
    broker = Broker()
    owners = Owners()
    owners.epoch = 7
    return broker, owners


def test_field_tables_round_trip_with_their_types() -> None:
    table = {"x-max-length": 10, "b": True, "s": "v", "nested": {"k": 1.5}}
    raw = encode_table(table)
    assert decode_table(raw) == table
    # Key order does not matter: equal tables are equal bytes.
    assert encode_table(dict(reversed(list(table.items())))) == raw
    assert encode_table({}) == b"" and decode_table(b"") == {}


def test_what_was_created_elsewhere_is_created_here() -> None:
    source, source_owners = _node()
    vh = source.vhosts["/"]
    vh.declare_exchange("orders", "topic", durable=True)
    q = vh.declare_queue("shipping", owner=object(), durable=True, arguments={"x-max-length": 5})
    vh.bind("orders", q, "order.*", {})
    remote = snapshot(source, source_owners)

    broker, owners = _node()
    base = snapshot(broker, owners)
    new_base = reconcile(broker, owners, base, remote).base
    assert snapshot(broker, owners) == remote == new_base
    here = broker.vhosts["/"]
    assert here.queues["shipping"].arguments == {"x-max-length": 5}
    assert [b.routing_key for b in here.exchanges["orders"].bindings.values()] == ["order.*"]


def test_what_was_deleted_elsewhere_is_deleted_here() -> None:
    broker, owners = _node()
    vh = broker.vhosts["/"]
    vh.declare_queue("gone", owner=object())
    broker.add_vhost("old")
    base = snapshot(broker, owners)
    gone = {("queue", "/", "gone"), ("vhost", "old")}
    remote = {k: v for k, v in base.items() if k not in gone}
    reconcile(broker, owners, base, remote)
    assert "gone" not in vh.queues
    assert "old" not in broker.vhosts


def test_a_local_change_not_yet_written_wins() -> None:
    broker, owners = _node()
    vh = broker.vhosts["/"]
    vh.declare_queue("doomed", owner=object())
    base = snapshot(broker, owners)
    remote: Rows = dict(base)
    # Since the base: this node declared "fresh" and deleted "doomed".
    vh.declare_queue("fresh", owner=object())
    vh.remove_queue(vh.queues["doomed"])
    new_base = reconcile(broker, owners, base, remote).base
    assert set(vh.queues) == {"fresh"}  # neither undone
    # The new base is what the tables hold, so the next write sends both.
    assert ("queue", "/", "doomed") in new_base and ("queue", "/", "fresh") not in new_base


def test_a_remote_exclusive_queue_is_locked_here() -> None:
    broker, owners = _node()
    base = snapshot(broker, owners)
    remote = dict(base)
    remote[("queue", "/", "theirs")] = (False, False, b"", 3, "10.0.0.1:5000#1")
    new_base = reconcile(broker, owners, base, remote).base
    q = broker.vhosts["/"].queues["theirs"]
    assert isinstance(q.exclusive_owner, RemoteOwner) and q.exclusive_owner.epoch == 3
    assert new_base == remote
    with pytest.raises(BrokerError) as info:
        broker.vhosts["/"].declare_queue("theirs", owner=object(), passive=True)
    assert info.value.code == 405
    # Reconciling again changes nothing: the same owner object is found.
    merged = reconcile(broker, owners, new_base, remote)
    assert merged.base == remote
    assert broker.vhosts["/"].queues["theirs"] is q
    owners.retain(merged.model)
    assert owners.resolve(3, "10.0.0.1:5000#1") is q.exclusive_owner
    # Once the queue is gone, so is its owner.
    del remote[("queue", "/", "theirs")]
    owners.retain(reconcile(broker, owners, merged.base, remote).model)
    assert owners.resolve(3, "10.0.0.1:5000#1") is not q.exclusive_owner


def test_a_deleted_user_takes_its_permissions_along() -> None:
    broker, owners = _node()
    base = snapshot(broker, owners)
    remote = {k: v for k, v in base.items() if k[0] not in ("user", "permission")}
    reconcile(broker, owners, base, remote)
    assert not broker.users.users and not broker.permissions


def test_a_changed_queue_is_declared_again() -> None:
    broker, owners = _node()
    vh = broker.vhosts["/"]
    vh.declare_queue("q", owner=object(), durable=False)
    base = snapshot(broker, owners)
    remote = dict(base)
    remote[("queue", "/", "q")] = (True, False, encode_table({"x-max-length": 1}), None, None)
    reconcile(broker, owners, base, remote)
    assert vh.queues["q"].durable and vh.queues["q"].arguments == {"x-max-length": 1}


def test_exchange_to_exchange_bindings_and_arguments_carry_over() -> None:
    source, source_owners = _node()
    vh = source.vhosts["/"]
    vh.declare_exchange("ae", "fanout")
    vh.declare_exchange("front", "topic", arguments={"alternate-exchange": "ae"})
    vh.declare_exchange("back", "headers")
    vh.bind("front", vh.exchanges["back"], "#", {})
    q = vh.declare_queue("matched", owner=object())
    vh.bind("back", q, "", {"x-match": "all", "kind": "order", "n": 3})
    remote = snapshot(source, source_owners)

    broker, owners = _node()
    reconcile(broker, owners, snapshot(broker, owners), remote)
    assert snapshot(broker, owners) == remote
    here = broker.vhosts["/"]
    assert here.exchanges["front"].arguments == {"alternate-exchange": "ae"}
    [binding] = here.exchanges["back"].bindings.values()
    assert binding.arguments == {"x-match": "all", "kind": "order", "n": 3}
    assert [b.destination.name for b in here.exchanges["front"].bindings.values()] == ["back"]
