"""The exchanges' binding indexes (direct and fanout destination counts,
the topic trie) stay in step with the bindings themselves through any
sequence of binds, unbinds and queue and exchange deletions: routing
always gives what matching every remaining binding by hand gives."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from roost import properties
from roost.broker.exchange import Exchange
from roost.broker.message import Message
from roost.broker.queue import Queue
from roost.broker.topic import compile_pattern, matches, split
from roost.broker.vhost import VirtualHost

OWNER = object()
KEYS = ["a", "b", "a.b", "a.*", "#", "*.b", ""]
QUEUES = ["q0", "q1", "q2"]
ARGS: list[dict[str, Any]] = [{}, {"x-tag": "one"}, {"x-tag": "two"}]

_op = st.one_of(
    st.tuples(
        st.sampled_from(["bind", "unbind"]),
        st.sampled_from(["d", "f", "t"]),
        st.sampled_from(QUEUES),
        st.sampled_from(KEYS),
        st.integers(0, len(ARGS) - 1),
    ),
    st.tuples(st.just("delete-queue"), st.sampled_from(QUEUES)),
)


def by_hand(ex: Exchange, key: str) -> set[str]:
    out = set()
    for b in ex.bindings.values():
        hit = {
            "direct": b.routing_key == key,
            "fanout": True,
            "topic": matches(compile_pattern(b.routing_key), split(key)),
        }[ex.type_name]
        if hit:
            out.add(b.destination.name)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_routing_agrees_with_the_bindings(ops: list[tuple[Any, ...]]) -> None:
    vh = VirtualHost("/")
    exchanges = {
        "d": vh.declare_exchange("d", "direct"),
        "f": vh.declare_exchange("f", "fanout"),
        "t": vh.declare_exchange("t", "topic"),
    }
    for name in QUEUES:
        vh.declare_queue(name, owner=OWNER)
    for op in ops:
        if op[0] == "delete-queue":
            q = vh.queues.get(op[1])
            if q is not None:
                vh.remove_queue(q)
            vh.declare_queue(op[1], owner=OWNER)
            continue
        action, ex, qname, key, args = op
        q = vh.queues[qname]
        if action == "bind":
            vh.bind(ex, q, key, ARGS[args])
        else:
            vh.unbind(ex, q, key, ARGS[args], OWNER)
        for e in exchanges.values():
            for k in KEYS:
                message = Message(e.name, k, properties.EMPTY, b"")
                routed = [d.name for d in e.route(message)]
                assert len(routed) == len(set(routed))
                assert set(routed) == by_hand(e, k), (e.type_name, k)
    # Every queue's own set of bindings matches the exchanges' view.
    for q in vh.queues.values():
        assert isinstance(q, Queue)
        assert q.bindings == {
            b for e in exchanges.values() for b in e.bindings.values() if b.destination is q
        }


def test_deleting_an_exchange_unbinds_its_destinations() -> None:
    vh = VirtualHost("/")
    src = vh.declare_exchange("src", "topic")
    mid = vh.declare_exchange("mid", "direct")
    q = vh.declare_queue("q", owner=OWNER)
    for i in range(500):
        vh.bind("src", mid, f"k{i}.#", None)
        vh.bind("mid", q, f"k{i}", None)
    vh.delete_exchange("mid")
    assert not src.bindings and not q.bindings
    assert src.route(Message("src", "k1.x", properties.EMPTY, b"")) == []
