"""Bugs the stateful model test (test_durable_broker.py) found, each
minimized to the smallest combination that shows it, on the model tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from pamqp import commands

from roost import properties
from roost.broker.broker import Broker
from roost.broker.message import Message
from tests.model.harness import ModelBroker, queue_contents


def test_discarded_by_its_only_queue_is_routed_before_the_first_batch(tmp_path: Path) -> None:
    """A queue that can never hold a message (x-max-length 0, drop-head)
    still matched it: a mandatory publish must not come back as unroutable.
    ``routed`` was derived from the journal batch to wait for, which is 0
    until the store has cut its first batch."""
    with ModelBroker(tmp_path / "data") as h:
        h.vhost.declare_queue("q", owner=None, arguments={"x-max-length": 0})
        p = h.publish("", "q", b"x", message_id="m1", mandatory=True)
        assert p.routed and not p.refused


def test_queue_duplicate_is_routed_without_a_store() -> None:
    """The same for a queue-level duplicate on a broker without a store,
    where there is never a batch to wait for."""
    vh = Broker().vhosts["/"]
    vh.declare_queue("q", owner=None, arguments={"x-message-deduplication": True})
    raw = properties.encode_properties(commands.Basic.Properties(message_id="same"))
    first = vh.publish(vh.exchange(""), Message("", "q", raw, b"x"), mandatory=True)
    again = vh.publish(vh.exchange(""), Message("", "q", raw, b"x"), mandatory=True)
    assert first[0] and again[0]
    assert vh.queues["q"].message_count == 1


@pytest.mark.parametrize("overflow", ["drop-head", "reject-publish"])
@pytest.mark.parametrize("priority", [False, True])
def test_byte_limit_counts_messages_restored_after_a_restart(
    tmp_path: Path, overflow: str, priority: bool
) -> None:
    """A durable x-max-length-bytes queue restarted with messages in it:
    a FIFO queue counted restored messages' bytes only as they were read
    back, so the next publishes went past the limit (3000 bytes in a
    2000-byte queue, with either overflow mode)."""
    args: dict[str, object] = {"x-max-length-bytes": 2000, "x-overflow": overflow}
    if priority:
        args["x-max-priority"] = 2
    with ModelBroker(tmp_path / "data") as h:
        h.vhost.declare_queue("q", owner=None, durable=True, arguments=args)
        h.publish("", "q", b"a" * 1500, message_id="m1")
        h.restart()
        assert h.vhost.queues["q"].ready_bytes == 1500
        p = h.publish("", "q", b"b" * 1500, message_id="m2")
        if overflow == "drop-head":
            assert h.contents("q") == [("m2", False)]
        else:
            assert p.refused
            assert h.contents("q") == [("m1", False)]
        assert h.vhost.queues["q"].ready_bytes == 1500


@pytest.mark.parametrize("second", ["reject-publish", "dedup"])
def test_a_dead_lettered_copy_does_not_overtake_its_original(tmp_path: Path, second: str) -> None:
    """A fanout to a queue that discards the message (x-max-length 0, with
    a dead-letter exchange) and to a second queue the dead-letter exchange
    also reaches. The copy was dead-lettered while the targets were still
    being asked, so it reached the second queue first: an empty
    reject-publish queue with room for one refused the original (the
    publisher got a nack), a dedup queue dropped the original as a
    duplicate of its own copy."""
    args: dict[str, object] = (
        {"x-max-length": 1, "x-overflow": "reject-publish"}
        if second == "reject-publish"
        else {"x-message-deduplication": True}
    )
    with ModelBroker(tmp_path / "data") as h:
        vh = h.vhost
        vh.declare_exchange("fan", "fanout")
        vh.declare_exchange("dlx", "fanout")
        src = vh.declare_queue(
            "src", owner=None, arguments={"x-max-length": 0, "x-dead-letter-exchange": "dlx"}
        )
        other = vh.declare_queue("other", owner=None, arguments=args)
        vh.bind("fan", src, "", None)
        vh.bind("fan", other, "", None)
        vh.bind("dlx", other, "", None)
        p = h.publish("fan", "k", b"x", message_id="m")
        assert p.routed and not p.refused
        [(message, _)] = queue_contents(other)
        assert "x-death" not in message.headers
