"""Routing in the broker model: exchange types, exchange-to-exchange
bindings and alternate exchanges, driven on VirtualHost directly.

The expectations are RabbitMQ's (rabbit_exchange_type_*, rabbit_exchange:route):
each queue gets a message at most once however many paths lead to it, an
alternate exchange is used only when an exchange routes to nothing at all,
and cycles through exchange bindings or alternate exchanges terminate.
"""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import commands as C

from roost import properties
from roost.broker.errors import ACCESS_REFUSED, PRECONDITION_FAILED, BrokerError
from roost.broker.exchange import Exchange
from roost.broker.message import Message
from roost.broker.queue import Queue
from roost.broker.vhost import VirtualHost

OWNER = object()


def message(routing_key: str = "", headers: dict[str, Any] | None = None) -> Message:
    props = (
        properties.encode_properties(C.Basic.Properties(headers=headers))
        if headers is not None
        else properties.EMPTY
    )
    return Message("x", routing_key, props, b"body")


@pytest.fixture
def vh() -> VirtualHost:
    return VirtualHost("/")


def queue(vh: VirtualHost, name: str) -> Queue:
    return vh.declare_queue(name, owner=OWNER)


def exchange(vh: VirtualHost, name: str, type_: str, **args: Any) -> Exchange:
    return vh.declare_exchange(name, type_, arguments=args or None)


def routed(vh: VirtualHost, ex: str | Exchange, msg: Message) -> list[str]:
    x = vh.exchange(ex) if isinstance(ex, str) else ex
    names = [q.name for q in vh.route(x, msg)]
    assert len(names) == len(set(names)), f"a queue was routed to twice: {names}"
    return sorted(names)


# -- default and direct --------------------------------------------------


def test_default_exchange_routes_by_queue_name(vh: VirtualHost) -> None:
    queue(vh, "q1")
    queue(vh, "q2")
    assert routed(vh, "", message("q1")) == ["q1"]
    assert routed(vh, "", message("q2")) == ["q2"]
    assert routed(vh, "", message("nope")) == []


def test_direct_exact_key(vh: VirtualHost) -> None:
    x = exchange(vh, "d", "direct")
    for name in ("q1", "q2", "q3"):
        queue(vh, name)
    vh.bind("d", vh.queue("q1"), "k1", None)
    vh.bind("d", vh.queue("q2"), "k1", None)
    vh.bind("d", vh.queue("q3"), "k2", None)
    assert routed(vh, x, message("k1")) == ["q1", "q2"]
    assert routed(vh, x, message("k2")) == ["q3"]
    assert routed(vh, x, message("k")) == []
    assert routed(vh, x, message("K1")) == []
    assert routed(vh, x, message("")) == []


def test_direct_empty_key_binding(vh: VirtualHost) -> None:
    x = exchange(vh, "d", "direct")
    vh.bind("d", queue(vh, "q"), "", None)
    assert routed(vh, x, message("")) == ["q"]
    assert routed(vh, x, message("a")) == []


def test_direct_binding_arguments_make_separate_bindings(vh: VirtualHost) -> None:
    x = exchange(vh, "d", "direct")
    q = queue(vh, "q")
    vh.bind("d", q, "k", {"a": 1})
    vh.bind("d", q, "k", {"a": 2})
    assert len(x.bindings) == 2
    assert routed(vh, x, message("k")) == ["q"]
    vh.unbind("d", q, "k", {"a": 1})
    assert routed(vh, x, message("k")) == ["q"]
    vh.unbind("d", q, "k", {"a": 2})
    assert routed(vh, x, message("k")) == []


def test_rebinding_is_idempotent_and_unbind_removes(vh: VirtualHost) -> None:
    x = exchange(vh, "d", "direct")
    q = queue(vh, "q")
    vh.bind("d", q, "k", None)
    vh.bind("d", q, "k", None)
    assert len(x.bindings) == 1
    vh.unbind("d", q, "k", None)
    assert routed(vh, x, message("k")) == []
    # Unbinding again, or something never bound, is fine.
    vh.unbind("d", q, "k", None)
    vh.unbind("d", q, "other", None)
    vh.unbind("missing-exchange", q, "k", None)


# -- fanout ----------------------------------------------------------------


def test_fanout_ignores_routing_key(vh: VirtualHost) -> None:
    x = exchange(vh, "f", "fanout")
    vh.bind("f", queue(vh, "q1"), "", None)
    vh.bind("f", queue(vh, "q2"), "whatever", None)
    assert routed(vh, x, message("")) == ["q1", "q2"]
    assert routed(vh, x, message("anything.at.all")) == ["q1", "q2"]


def test_fanout_queue_bound_twice_gets_one_copy(vh: VirtualHost) -> None:
    x = exchange(vh, "f", "fanout")
    q = queue(vh, "q")
    vh.bind("f", q, "a", None)
    vh.bind("f", q, "b", None)
    assert routed(vh, x, message()) == ["q"]
    vh.unbind("f", q, "a", None)
    assert routed(vh, x, message()) == ["q"]
    vh.unbind("f", q, "b", None)
    assert routed(vh, x, message()) == []


# -- topic -----------------------------------------------------------------


def test_topic_routing(vh: VirtualHost) -> None:
    x = exchange(vh, "t", "topic")
    vh.bind("t", queue(vh, "all"), "#", None)
    vh.bind("t", queue(vh, "stock"), "stock.*", None)
    vh.bind("t", queue(vh, "usd"), "*.usd.#", None)
    vh.bind("t", queue(vh, "exact"), "stock.usd", None)
    assert routed(vh, x, message("stock.usd")) == ["all", "exact", "stock", "usd"]
    assert routed(vh, x, message("stock.eur")) == ["all", "stock"]
    assert routed(vh, x, message("bond.usd.long")) == ["all", "usd"]
    assert routed(vh, x, message("stock")) == ["all"]
    assert routed(vh, x, message("")) == ["all"]


def test_topic_queue_matched_by_several_patterns_gets_one_copy(vh: VirtualHost) -> None:
    x = exchange(vh, "t", "topic")
    q = queue(vh, "q")
    for pattern in ("#", "a.*", "a.b", "*.b", "#.b"):
        vh.bind("t", q, pattern, None)
    assert routed(vh, x, message("a.b")) == ["q"]


def test_topic_route_cache_follows_binding_changes(vh: VirtualHost) -> None:
    x = exchange(vh, "t", "topic")
    q = queue(vh, "q")
    assert routed(vh, x, message("a.b")) == []
    vh.bind("t", q, "a.#", None)
    assert routed(vh, x, message("a.b")) == ["q"]
    vh.unbind("t", q, "a.#", None)
    assert routed(vh, x, message("a.b")) == []


# -- headers ---------------------------------------------------------------


def headers_route(vh: VirtualHost, binding: dict[str, Any], headers: dict[str, Any] | None) -> bool:
    x = vh.exchanges.get("h") or exchange(vh, "h", "headers")
    q = queue(vh, "hq")
    vh.bind("h", q, "", binding)
    try:
        return routed(vh, x, message("", headers)) == ["hq"]
    finally:
        vh.unbind("h", q, "", binding)


# (binding arguments, message headers, routed?) — each checked against RabbitMQ 3.10.
HEADERS_CASES: list[tuple[dict[str, Any], dict[str, Any] | None, bool]] = [
    # x-match all (also the default)
    ({"x-match": "all", "a": 1, "b": "x"}, {"a": 1, "b": "x"}, True),
    ({"x-match": "all", "a": 1, "b": "x"}, {"a": 1, "b": "x", "c": 3}, True),
    ({"x-match": "all", "a": 1, "b": "x"}, {"a": 1}, False),
    ({"x-match": "all", "a": 1, "b": "x"}, {"a": 1, "b": "y"}, False),
    ({"a": 1, "b": 2}, {"a": 1}, False),
    ({"a": 1}, {"a": 1, "b": 2}, True),
    ({}, {}, True),
    ({}, None, True),
    ({"x-match": "all"}, None, True),
    ({"x-match": "all", "a": 1}, None, False),
    # x-match any
    ({"x-match": "any", "a": 1, "b": 2}, {"b": 2}, True),
    ({"x-match": "any", "a": 1, "b": 2}, {"a": 2, "b": 1}, False),
    ({"x-match": "any", "a": 1, "b": 2}, {}, False),
    ({"x-match": "any"}, {"a": 1}, False),
    ({"x-match": "any"}, None, False),
    # values compare without regard to integer width, but strictly otherwise
    ({"a": 1}, {"a": 1}, True),
    ({"a": 1}, {"a": 1000000}, False),
    ({"a": 1}, {"a": True}, False),
    ({"a": True}, {"a": 1}, False),
    ({"a": True}, {"a": True}, True),
    ({"a": "1"}, {"a": 1}, False),
    ({"a": "v"}, {"a": bytearray(b"v")}, True),
    ({"a": {"n": 1}}, {"a": {"n": 1}}, True),
    ({"a": [1, 2]}, {"a": [1, 2]}, True),
    ({"a": [1, 2]}, {"a": [2, 1]}, False),
    # void binding values ask for presence only
    ({"x-match": "all", "a": None}, {"a": "anything"}, True),
    ({"x-match": "all", "a": None}, {"a": None}, True),
    ({"x-match": "all", "a": None}, {"b": 1}, False),
    ({"x-match": "all", "a": None, "b": 2}, {"a": 0, "b": 2}, True),
    ({"x-match": "any", "a": None}, {"a": 5}, True),
    ({"x-match": "any", "a": None}, {"b": 1}, False),
    ({"x-match": "all", "a": "v"}, {"a": None}, False),
    # x- keys are ignored by all/any ...
    ({"x-match": "all", "x-a": 1}, {}, True),
    ({"x-match": "all", "x-a": 1, "b": 2}, {"b": 2}, True),
    ({"x-match": "any", "x-a": 1}, {"x-a": 1}, False),
    ({"x-match": "any", "x-a": 1, "b": 2}, {"x-a": 1}, False),
    # ... and compared by all-with-x/any-with-x
    ({"x-match": "all-with-x", "x-a": 1}, {"x-a": 1}, True),
    ({"x-match": "all-with-x", "x-a": 1}, {}, False),
    ({"x-match": "all-with-x", "x-a": 1, "b": 2}, {"x-a": 1}, False),
    ({"x-match": "all-with-x"}, {}, True),
    ({"x-match": "any-with-x", "x-a": 1}, {"x-a": 1}, True),
    ({"x-match": "any-with-x", "x-a": 1, "b": 2}, {"b": 3, "x-a": 1}, True),
    ({"x-match": "any-with-x", "x-a": 1}, {"x-a": 2}, False),
    # x-match itself is never a header to compare
    ({"x-match": "any-with-x"}, {"x-match": "any-with-x"}, False),
    ({"x-match": "all-with-x", "a": 1}, {"a": 1}, True),
]


@pytest.mark.parametrize(("binding", "headers", "expected"), HEADERS_CASES)
def test_headers_matching(
    vh: VirtualHost, binding: dict[str, Any], headers: dict[str, Any] | None, expected: bool
) -> None:
    assert headers_route(vh, binding, headers) is expected


def test_headers_ignores_routing_key(vh: VirtualHost) -> None:
    x = exchange(vh, "h", "headers")
    vh.bind("h", queue(vh, "q"), "some-key", {"a": 1})
    assert routed(vh, x, message("other-key", {"a": 1})) == ["q"]


def test_headers_several_bindings_one_copy(vh: VirtualHost) -> None:
    x = exchange(vh, "h", "headers")
    q = queue(vh, "q")
    vh.bind("h", q, "", {"a": 1})
    vh.bind("h", q, "", {"x-match": "any", "b": 2})
    vh.bind("h", queue(vh, "other"), "", {"c": 3})
    assert routed(vh, x, message("", {"a": 1, "b": 2})) == ["q"]
    assert routed(vh, x, message("", {"a": 1, "b": 2, "c": 3})) == ["other", "q"]


def test_headers_invalid_x_match_value_is_refused(vh: VirtualHost) -> None:
    exchange(vh, "h", "headers")
    q = queue(vh, "q")
    with pytest.raises(BrokerError) as err:
        vh.bind("h", q, "", {"x-match": "foo"})
    assert err.value.code == PRECONDITION_FAILED
    assert err.value.text == (
        'Invalid x-match field value <<"foo">>; expected all, any, all-with-x, or any-with-x'
    )
    with pytest.raises(BrokerError) as err:
        vh.bind("h", q, "", {"x-match": 1})
    assert err.value.code == PRECONDITION_FAILED
    assert err.value.text == "Invalid x-match field type signedint (value 1); expected longstr"
    assert not vh.exchange("h").bindings


def test_x_match_is_not_validated_on_other_types(vh: VirtualHost) -> None:
    x = exchange(vh, "d", "direct")
    vh.bind("d", queue(vh, "q"), "k", {"x-match": "foo"})
    assert routed(vh, x, message("k")) == ["q"]


# -- exchange to exchange --------------------------------------------------


def test_exchange_to_exchange_chain(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "direct")
    exchange(vh, "b", "topic")
    exchange(vh, "c", "fanout")
    vh.bind("a", vh.exchange("b"), "k.x", None)
    vh.bind("b", vh.exchange("c"), "k.*", None)
    vh.bind("c", queue(vh, "end"), "", None)
    vh.bind("b", queue(vh, "mid"), "#", None)
    assert routed(vh, a, message("k.x")) == ["end", "mid"]
    assert routed(vh, a, message("k.y")) == []
    assert routed(vh, "b", message("k.y")) == ["end", "mid"]
    assert routed(vh, "b", message("z")) == ["mid"]


def test_exchange_cycle_terminates_and_delivers_once(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "fanout")
    b = exchange(vh, "b", "fanout")
    c = exchange(vh, "c", "fanout")
    vh.bind("a", b, "", None)
    vh.bind("b", c, "", None)
    vh.bind("c", a, "", None)
    vh.bind("a", queue(vh, "qa"), "", None)
    vh.bind("c", queue(vh, "qc"), "", None)
    for start in ("a", "b", "c"):
        assert routed(vh, start, message()) == ["qa", "qc"]


def test_self_binding_terminates(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "fanout")
    vh.bind("a", a, "", None)
    assert routed(vh, a, message()) == []
    vh.bind("a", queue(vh, "q"), "", None)
    assert routed(vh, a, message()) == ["q"]


def test_queue_reached_by_several_paths_gets_one_copy(vh: VirtualHost) -> None:
    top = exchange(vh, "top", "fanout")
    q = queue(vh, "q")
    for name in ("l", "r"):
        exchange(vh, name, "fanout")
        vh.bind("top", vh.exchange(name), "", None)
        vh.bind(name, q, "", None)
    vh.bind("top", q, "", None)
    assert routed(vh, top, message()) == ["q"]


def test_unbinding_exchange_cuts_the_path(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "fanout")
    b = exchange(vh, "b", "fanout")
    vh.bind("a", b, "", None)
    vh.bind("b", queue(vh, "q"), "", None)
    assert routed(vh, a, message()) == ["q"]
    vh.unbind("a", b, "", None)
    assert routed(vh, a, message()) == []
    assert not b.inbound


def test_default_exchange_cannot_be_bound(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "fanout")
    q = queue(vh, "q")
    for src, dest in (("", q), ("", a), ("a", vh.default_exchange)):
        with pytest.raises(BrokerError) as err:
            vh.bind(src, dest, "k", None)
        assert err.value.code == ACCESS_REFUSED
        assert err.value.text == "operation not permitted on the default exchange"


def test_deleting_destination_exchange_removes_its_inbound_bindings(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "fanout")
    b = exchange(vh, "b", "fanout")
    vh.bind("a", b, "", None)
    vh.bind("b", queue(vh, "q"), "", None)
    vh.delete_exchange("b")
    assert not a.bindings
    assert routed(vh, a, message()) == []


def test_auto_delete_exchange_goes_with_its_last_binding(vh: VirtualHost) -> None:
    vh.declare_exchange("ad", "fanout", auto_delete=True)
    q1, q2 = queue(vh, "q1"), queue(vh, "q2")
    vh.bind("ad", q1, "", None)
    vh.bind("ad", q2, "", None)
    vh.unbind("ad", q1, "", None)
    assert "ad" in vh.exchanges
    vh.delete_queue("q2", owner=OWNER)
    assert "ad" not in vh.exchanges


def test_auto_delete_exchange_without_bindings_stays(vh: VirtualHost) -> None:
    vh.declare_exchange("ad", "fanout", auto_delete=True)
    assert "ad" in vh.exchanges


# -- alternate exchanges ---------------------------------------------------


def test_alternate_exchange_takes_unroutable(vh: VirtualHost) -> None:
    ae = exchange(vh, "ae", "fanout")
    main = exchange(vh, "main", "direct", **{"alternate-exchange": "ae"})
    vh.bind("main", queue(vh, "routed"), "k", None)
    vh.bind("ae", queue(vh, "unrouted"), "", None)
    assert main.alternate_exchange == "ae"
    assert ae.alternate_exchange is None
    assert routed(vh, main, message("k")) == ["routed"]
    assert routed(vh, main, message("other")) == ["unrouted"]


def test_alternate_exchange_missing_drops(vh: VirtualHost) -> None:
    main = exchange(vh, "main", "direct", **{"alternate-exchange": "nowhere"})
    assert routed(vh, main, message("k")) == []


def test_alternate_of_alternate(vh: VirtualHost) -> None:
    main = exchange(vh, "main", "direct", **{"alternate-exchange": "ae1"})
    exchange(vh, "ae1", "direct", **{"alternate-exchange": "ae2"})
    exchange(vh, "ae2", "fanout")
    vh.bind("ae1", queue(vh, "q1"), "special", None)
    vh.bind("ae2", queue(vh, "q2"), "", None)
    assert routed(vh, main, message("special")) == ["q1"]
    assert routed(vh, main, message("other")) == ["q2"]


def test_alternate_exchange_cycle_terminates(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "direct", **{"alternate-exchange": "b"})
    exchange(vh, "b", "direct", **{"alternate-exchange": "a"})
    vh.bind("b", queue(vh, "qb"), "kb", None)
    vh.bind("a", queue(vh, "qa"), "ka", None)
    assert routed(vh, a, message("nothing")) == []
    assert routed(vh, a, message("kb")) == ["qb"]
    assert routed(vh, "b", message("ka")) == ["qa"]


def test_self_alternate_terminates(vh: VirtualHost) -> None:
    a = exchange(vh, "a", "direct", **{"alternate-exchange": "a"})
    assert routed(vh, a, message("k")) == []


def test_alternate_not_used_when_routed_to_an_exchange_only(vh: VirtualHost) -> None:
    # rabbit_exchange:process_alternate: the alternate is for an exchange
    # whose own routing found no destination at all; an exchange destination
    # counts even if nothing comes out of it.
    main = exchange(vh, "main", "fanout", **{"alternate-exchange": "ae"})
    exchange(vh, "ae", "fanout")
    exchange(vh, "empty", "fanout")
    vh.bind("main", vh.exchange("empty"), "", None)
    vh.bind("ae", queue(vh, "unrouted"), "", None)
    assert routed(vh, main, message()) == []


def test_alternate_of_a_bound_exchange(vh: VirtualHost) -> None:
    top = exchange(vh, "top", "fanout")
    exchange(vh, "inner", "direct", **{"alternate-exchange": "ae"})
    exchange(vh, "ae", "fanout")
    vh.bind("top", vh.exchange("inner"), "", None)
    vh.bind("inner", queue(vh, "q"), "k", None)
    vh.bind("ae", queue(vh, "caught"), "", None)
    assert routed(vh, top, message("k")) == ["q"]
    assert routed(vh, top, message("z")) == ["caught"]


def test_alternate_and_direct_route_to_same_queue_once(vh: VirtualHost) -> None:
    top = exchange(vh, "top", "fanout")
    exchange(vh, "inner", "direct", **{"alternate-exchange": "ae"})
    exchange(vh, "ae", "fanout")
    q = queue(vh, "q")
    vh.bind("top", vh.exchange("inner"), "", None)
    vh.bind("top", q, "", None)
    vh.bind("ae", q, "", None)
    assert routed(vh, top, message("z")) == ["q"]


def test_alternate_exchange_must_be_a_string(vh: VirtualHost) -> None:
    with pytest.raises(BrokerError) as err:
        vh.declare_exchange("bad", "direct", arguments={"alternate-exchange": 5})
    assert err.value.code == PRECONDITION_FAILED
    assert err.value.text == (
        "invalid type 'signedint' for arg 'alternate-exchange' in exchange 'bad' in vhost '/'"
    )
    assert "bad" not in vh.exchanges


# -- enqueueing end to end within the model --------------------------------


def test_routed_message_is_enqueued_once_per_queue(vh: VirtualHost) -> None:
    top = exchange(vh, "top", "fanout")
    t = exchange(vh, "t", "topic")
    q = queue(vh, "q")
    vh.bind("top", t, "", None)
    vh.bind("top", q, "", None)
    vh.bind("t", q, "#", None)
    vh.bind("t", q, "a.*", None)
    assert vh.route(top, message("a.b")) == [q]
    vh.publish(top, message("a.b"))
    assert q.message_count == 1
