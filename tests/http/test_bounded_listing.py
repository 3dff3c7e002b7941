"""Listing 20,000 queues over the management API does not stall AMQP
clients for the length of the request (issue 12, item 4): the listing is
rendered in chunks and the broker answers AMQP in between. Real in-process
broker, raw AMQP socket, real HTTP."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import urllib.request

import pytest
from pamqp import commands as C
from pamqp import frame as pframe

from roost.testing import RoostBroker
from tests.e2e.basic_helpers import connect

pytestmark = pytest.mark.timeout(300)

QUEUES = 20_000


def test_a_long_listing_lets_amqp_clients_in(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    client.sock.settimeout(60)
    declares = [
        pframe.marshal(C.Queue.Declare(queue=f"many-{i}", nowait=True), 1) for i in range(QUEUES)
    ]
    for start in range(0, QUEUES, 1000):
        client.send(b"".join(declares[start : start + 1000]))

    def round_trip() -> float:
        client.send_frame(C.Queue.Declare(queue="many-0", passive=True), 1)
        client.expect(C.Queue.DeclareOk)
        return time.monotonic()

    round_trip()
    request = urllib.request.Request(roost_broker.http_url + "/api/queues")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())

    def longest_wait_while_listing() -> tuple[float, float]:
        """(longest wait between two AMQP answers, the listing's duration)."""
        listed: list[bytes] = []

        def fetch() -> None:
            # Only the bytes here: parsing them would hold this process's
            # GIL (which the in-process broker shares) and count against it.
            with urllib.request.urlopen(request, timeout=60) as resp:
                listed.append(resp.read())

        http = threading.Thread(target=fetch)
        started = time.monotonic()
        http.start()
        answers = [started]
        while http.is_alive():
            answers.append(round_trip())
        http.join()
        took = time.monotonic() - started
        assert len(json.loads(listed[0])) == QUEUES
        return max(b - a for a, b in itertools.pairwise(answers)), took

    # Held for the whole listing (as before), the longest wait is nearly
    # all of it, every time; in chunks, a small part of it (measured: about
    # a fifth). Up to three tries, so one stall of a shared machine's
    # scheduler does not fail the test.
    for _ in range(3):
        longest, took = longest_wait_while_listing()
        if longest < 0.5 * took:
            break
    assert longest < 0.5 * took, (longest, took)


def _get(broker: RoostBroker, path: str) -> object:
    request = urllib.request.Request(broker.http_url + path)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def test_bindings_connections_and_channels_are_paginated(roost_broker: RoostBroker) -> None:
    client = connect(roost_broker.port)
    for i in range(30):
        client.send_frame(C.Queue.Declare(queue=f"bq-{i}"), 1)
        client.expect(C.Queue.DeclareOk)
        client.send_frame(C.Queue.Bind(queue=f"bq-{i}", exchange="amq.topic", routing_key="k"), 1)
        client.expect(C.Queue.BindOk)
    # 30 default-exchange bindings and 30 to amq.topic.
    page = _get(roost_broker, "/api/bindings/%2F?page=2&page_size=25")
    assert isinstance(page, dict)
    assert (page["total_count"], page["page_count"], page["item_count"]) == (60, 3, 25)
    only = _get(roost_broker, "/api/bindings?page=1&name=bq-7&use_regex=false")
    assert isinstance(only, dict)
    assert {(b["source"], b["destination"]) for b in only["items"]} == {
        ("", "bq-7"),
        ("amq.topic", "bq-7"),
    }
    assert len(_get(roost_broker, "/api/bindings/%2F")) == 60  # type: ignore[arg-type]
    conns = _get(roost_broker, "/api/connections?page=1&page_size=1")
    chans = _get(roost_broker, "/api/channels?page=1&page_size=1")
    assert isinstance(conns, dict) and isinstance(chans, dict)
    assert conns["total_count"] == chans["total_count"] == 1
    assert chans["items"][0]["connection_details"]["name"] == conns["items"][0]["name"]
