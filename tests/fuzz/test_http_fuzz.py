"""A short hypothesis run of the management API fuzzer (tests/fuzz/
http_harness.py) against a live in-process broker; docs/fuzzing.md has
the long version."""

from __future__ import annotations

import logging

from roost.testing import RoostBroker
from tests.fuzz.http_harness import check_amqp, error_log, fuzz_http, prepare


def test_http_fuzz_no_500_no_hang_broker_still_serves(roost_broker: RoostBroker) -> None:
    errors = error_log()
    try:
        prepare(roost_broker)
        fuzz_http(roost_broker, examples=1000, seed_=20261205)
        check_amqp(roost_broker)
    finally:
        logging.getLogger().removeHandler(errors)
    assert errors.crashes() == []
