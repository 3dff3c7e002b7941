"""A short fuzzing run against a live in-process broker (see docs/fuzzing.md
for the long version)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pamqp import commands as C
from pamqp import frame as pframe

from roost.testing import RoostBroker
from tests.fuzz.harness import ErrorLog, fuzz, nested_table, queue_declare, run_case


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_fuzz_300_cases_leave_broker_serving(
    roost_broker: RoostBroker, error_log: ErrorLog
) -> None:
    n = fuzz(
        roost_broker.port,
        seed=20261128,
        cases=300,
        check_every=100,
        broker=roost_broker,
        errors=error_log,
    )
    assert n == 300
    assert error_log.crashes() == []


def test_deeply_nested_table_closes_connection_with_frame_error(
    roost_broker: RoostBroker, error_log: ErrorLog
) -> None:
    # 10,000 levels exhaust pamqp's recursive decoder: connection.close 501.
    got = run_case(roost_broker.port, True, queue_declare(nested_table(10000), b"deep"), 0.5)
    _, _, close = pframe.unmarshal(got)
    assert isinstance(close, C.Connection.Close)
    assert close.reply_code == 501
    assert (close.class_id, close.method_id) == (50, 10)
    assert error_log.crashes() == []
