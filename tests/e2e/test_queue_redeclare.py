"""A queue deleted and declared again under the same name is reachable
through the default exchange (its implicit binding is renewed)."""

from __future__ import annotations

import pika

from roost.testing import RoostBroker


def test_redeclared_queue_gets_messages_via_default_exchange(roost_broker: RoostBroker) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    ch = conn.channel()
    for durable in (False, True, False):
        ch.queue_declare("again", durable=durable)
        ch.basic_publish("", "again", b"first")
        ch.queue_delete("again")
        ch.queue_declare("again", durable=durable)
        ch.basic_publish("", "again", b"second")
        method, _, body = ch.basic_get("again", auto_ack=True)
        assert method is not None and body == b"second"
        ch.queue_delete("again")
    conn.close()
