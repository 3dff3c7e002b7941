"""Publisher confirms and transactions (confirm and tx classes).

Reply codes and texts were checked against RabbitMQ 3.10.
"""

from __future__ import annotations

from collections.abc import Iterator

import aio_pika
import aiormq
import pika
import pytest
from pamqp import commands as C
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from roost.testing import RoostBroker
from tests.conftest import RawClient
from tests.e2e.basic_helpers import (
    basic_get,
    connect,
    declare_queue,
    expect_channel_close,
    expect_method,
    next_method,
    publish,
    read_content,
    sync,
)


@pytest.fixture
def client(roost_broker: RoostBroker) -> Iterator[RawClient]:
    c = connect(roost_broker.port, channels=2)
    yield c
    c.close()


def close_channel(client: RawClient, channel: int) -> None:
    client.send_frame(
        C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), channel
    )
    expect_method(client, C.Channel.CloseOk, channel)


def confirm_select(client: RawClient, channel: int = 1) -> None:
    client.send_frame(C.Confirm.Select(), channel)
    expect_method(client, C.Confirm.SelectOk, channel)


def tx_select(client: RawClient, channel: int = 1) -> None:
    client.send_frame(C.Tx.Select(), channel)
    expect_method(client, C.Tx.SelectOk, channel)


# -- publisher confirms ------------------------------------------------------


def test_pika_confirms_raise_only_for_unroutable_mandatory(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", q, b"one")
        ch.basic_publish("", q, b"two", mandatory=True)
        # Unroutable without mandatory: confirmed (and dropped), no error.
        ch.basic_publish("amq.direct", "nowhere", b"dropped")
        with pytest.raises(UnroutableError) as info:
            ch.basic_publish("amq.direct", "nowhere", b"returned", mandatory=True)
        [returned] = info.value.messages
        assert returned.method.reply_code == 312
        assert returned.method.reply_text == "NO_ROUTE"
        assert returned.body == b"returned"
        # The channel is still usable and the routable messages arrived.
        ch.basic_publish("", q, b"three")
        assert ch.queue_declare(q, passive=True).method.message_count == 3
    finally:
        conn.close()


async def test_aio_pika_publisher_confirms(roost_broker: RoostBroker) -> None:
    conn = await aio_pika.connect(roost_broker.url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        q = await ch.declare_queue("", exclusive=True)
        for i in range(20):
            result = await ch.default_exchange.publish(aio_pika.Message(b"%d" % i), q.name)
            assert isinstance(result, aiormq.spec.Basic.Ack)
        declared = await ch.declare_queue(q.name, passive=True)
        assert declared.declaration_result.message_count == 20


def _covered(acks: list[tuple[int, bool]]) -> list[int]:
    """Expand (delivery_tag, multiple) acks into the publish seqs they confirm."""
    covered: list[int] = []
    last = 0
    for tag, multiple in acks:
        assert tag > last, f"ack {tag} after {last}: out of order or repeated"
        covered.extend(range(last + 1, tag + 1) if multiple else [tag])
        last = tag
    return covered


def test_every_publish_confirmed_exactly_once_in_order(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    confirm_select(client)
    n = 500
    for i in range(n):
        # Routable, unroutable and persistent publishes are all confirmed.
        if i % 7 == 3:
            publish(client, "amq.direct", "nowhere", b"x")
        else:
            publish(client, "", q, b"%d" % i, C.Basic.Properties(delivery_mode=1 + i % 2))
    acks: list[tuple[int, bool]] = []
    while not acks or acks[-1][0] < n:
        ch, method = next_method(client)
        assert ch == 1
        assert isinstance(method, C.Basic.Ack), method
        acks.append((method.delivery_tag, method.multiple))
    assert _covered(acks) == list(range(1, n + 1))
    assert sync(client, q, channel=2)[0] == n - len(range(3, n, 7))


def test_return_comes_before_its_confirm(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    confirm_select(client)
    publish(client, "", q, b"routed", mandatory=True)
    publish(client, "amq.direct", "nowhere", b"returned", mandatory=True)
    publish(client, "", q, b"routed again", mandatory=True)
    seen: list[object] = []
    confirmed = 0
    while confirmed < 3:
        ch, method = next_method(client)
        if isinstance(method, C.Basic.Return):
            body = read_content(client, method, ch).body
            seen.append(("return", method.reply_code, body))
            continue
        assert isinstance(method, C.Basic.Ack)
        start = confirmed + 1
        confirmed = method.delivery_tag
        seen.extend(("ack", seq) for seq in range(start, confirmed + 1))
    assert seen.index(("return", 312, b"returned")) < seen.index(("ack", 2))


def test_confirm_select_nowait_and_repeated(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    client.send_frame(C.Confirm.Select(nowait=True), 1)
    confirm_select(client)  # a second select is fine
    publish(client, "", q, b"x")
    ack = expect_method(client, C.Basic.Ack, 1)
    assert (ack.delivery_tag, ack.multiple) == (1, False)


def test_confirm_after_tx_is_refused(client: RawClient) -> None:
    tx_select(client)
    client.send_frame(C.Confirm.Select(), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
    assert (close.class_id, close.method_id) == (85, 10)


def test_tx_after_confirm_is_refused(client: RawClient) -> None:
    confirm_select(client)
    client.send_frame(C.Tx.Select(), 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
    assert (close.class_id, close.method_id) == (90, 10)


# -- transactions ----------------------------------------------------------


def test_tx_publishes_invisible_until_commit(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    tx_select(client)
    for i in range(3):
        publish(client, "", q, b"%d" % i)
    assert sync(client, q, channel=2) == (0, 0)
    client.send_frame(C.Tx.Commit(), 1)
    expect_method(client, C.Tx.CommitOk, 1)
    assert sync(client, q, channel=2) == (3, 0)
    got = [basic_get(client, q, channel=2, no_ack=True) for _ in range(3)]
    assert [g.body for g in got] == [b"0", b"1", b"2"]


def test_tx_rollback_discards_publishes(client: RawClient) -> None:
    q = declare_queue(client, exclusive=True)
    tx_select(client)
    publish(client, "", q, b"discarded")
    client.send_frame(C.Tx.Rollback(), 1)
    expect_method(client, C.Tx.RollbackOk, 1)
    assert sync(client, q, channel=2) == (0, 0)
    # The channel stays transactional.
    publish(client, "", q, b"kept")
    assert sync(client, q, channel=2) == (0, 0)
    client.send_frame(C.Tx.Commit(), 1)
    expect_method(client, C.Tx.CommitOk, 1)
    got = basic_get(client, q, channel=2, no_ack=True)
    assert got is not None and got.body == b"kept"
    assert basic_get(client, q, channel=2) is None


def test_tx_mandatory_unroutable_returned_at_commit(client: RawClient) -> None:
    tx_select(client)
    publish(client, "amq.direct", "nowhere", b"back", mandatory=True)
    client.send_frame(C.Tx.Commit(), 1)
    ch, method = next_method(client)
    assert isinstance(method, C.Basic.Return) and method.reply_code == 312
    assert read_content(client, method, ch).body == b"back"
    expect_method(client, C.Tx.CommitOk, 1)


def _two_unacked(client: RawClient, queue: str) -> None:
    declare_queue(client, queue)
    publish(client, "", queue, b"a", channel=2)
    publish(client, "", queue, b"b", channel=2)
    assert basic_get(client, queue) is not None
    assert basic_get(client, queue) is not None


def test_tx_acks_held_until_commit(client: RawClient) -> None:
    _two_unacked(client, "txq")
    tx_select(client)
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    client.send_frame(C.Tx.Commit(), 1)
    expect_method(client, C.Tx.CommitOk, 1)
    # Only the uncommitted delivery comes back when the channel closes.
    close_channel(client, 1)
    assert sync(client, "txq", channel=2) == (1, 0)
    got = basic_get(client, "txq", channel=2, no_ack=True)
    assert got is not None and (got.body, got.method.redelivered) == (b"b", True)


def test_tx_rollback_undoes_acks(client: RawClient) -> None:
    _two_unacked(client, "txq")
    tx_select(client)
    client.send_frame(C.Basic.Ack(delivery_tag=2, multiple=True), 1)
    client.send_frame(C.Tx.Rollback(), 1)
    expect_method(client, C.Tx.RollbackOk, 1)
    # Still unacknowledged: acking tag 1 again is not an unknown tag.
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    client.send_frame(C.Tx.Rollback(), 1)
    expect_method(client, C.Tx.RollbackOk, 1)
    # Closing the channel redelivers both.
    close_channel(client, 1)
    assert sync(client, "txq", channel=2) == (2, 0)
    got = [basic_get(client, "txq", channel=2, no_ack=True) for _ in range(2)]
    assert [(g.body, g.method.redelivered) for g in got] == [(b"a", True), (b"b", True)]


def test_tx_uncommitted_acks_redelivered_when_channel_closes(client: RawClient) -> None:
    _two_unacked(client, "txq")
    tx_select(client)
    client.send_frame(C.Basic.Ack(delivery_tag=1), 1)
    close_channel(client, 1)
    assert sync(client, "txq", channel=2) == (2, 0)


def test_tx_nack_requeue_applied_at_commit(client: RawClient) -> None:
    _two_unacked(client, "txq")
    tx_select(client)
    client.send_frame(C.Basic.Nack(delivery_tag=2, multiple=True, requeue=True), 1)
    assert sync(client, "txq", channel=2) == (0, 0)
    client.send_frame(C.Tx.Commit(), 1)
    expect_method(client, C.Tx.CommitOk, 1)
    assert sync(client, "txq", channel=2) == (2, 0)


@pytest.mark.parametrize(
    ("method", "method_id"),
    [(C.Tx.Commit(), 20), (C.Tx.Rollback(), 30)],
    ids=["commit", "rollback"],
)
def test_commit_or_rollback_without_select(
    client: RawClient, method: object, method_id: int
) -> None:
    client.send_frame(method, 1)
    close = expect_channel_close(client, 1)
    assert close.reply_code == 406
    assert close.reply_text == "PRECONDITION_FAILED - channel is not transactional"
    assert (close.class_id, close.method_id) == (90, method_id)


def test_pika_transactions(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    try:
        ch = conn.channel()
        other = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.tx_select()
        ch.basic_publish("", q, b"rolled back")
        ch.tx_rollback()
        ch.basic_publish("", q, b"committed")
        assert other.queue_declare(q, passive=True).method.message_count == 0
        ch.tx_commit()
        assert other.queue_declare(q, passive=True).method.message_count == 1
        method, _, body = ch.basic_get(q)
        assert body == b"committed"
        ch.basic_ack(method.delivery_tag)
        ch.tx_commit()
        with pytest.raises(ChannelClosedByBroker) as info:
            other.tx_commit()
        assert info.value.reply_code == 406
        assert info.value.reply_text == "PRECONDITION_FAILED - channel is not transactional"
        assert ch.queue_declare(q, passive=True).method.message_count == 0
    finally:
        conn.close()
