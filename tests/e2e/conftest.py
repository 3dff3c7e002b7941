"""Fixtures shared by the end-to-end tests: a pika connection to the
in-process broker and a channel on it."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from roost.testing import RoostBroker


@pytest.fixture
def conn(roost_broker: RoostBroker) -> Iterator[pika.BlockingConnection]:
    c = pika.BlockingConnection(pika.URLParameters(roost_broker.url))
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ch(conn: pika.BlockingConnection) -> BlockingChannel:
    return conn.channel()
