"""Back-pressure decisions (roost.amqp.flow_control), without a transport.

tests/e2e/test_connection.py and tests/e2e/test_alarms.py check the same
rules through a real socket.
"""

from __future__ import annotations

from roost.amqp.flow_control import FlowControl


def test_starts_readable_and_writable() -> None:
    flow = FlowControl()
    assert flow.writable
    assert not flow.reading_paused
    assert flow.heartbeats_expected


def test_writing_pauses_and_resumes() -> None:
    flow = FlowControl()
    flow.pause_writing()
    assert not flow.writable
    flow.pause_writing()
    assert not flow.writable
    flow.resume_writing()
    assert flow.writable


def test_writing_and_reading_are_independent() -> None:
    flow = FlowControl()
    flow.pause_writing()
    flow.blocked_publish()
    assert flow.pause_reading()
    assert flow.unblocked()
    assert not flow.writable


def test_a_connection_that_did_not_publish_keeps_being_read() -> None:
    flow = FlowControl()
    assert not flow.pause_reading()
    assert not flow.reading_paused
    assert flow.heartbeats_expected


def test_a_publisher_is_paused_once() -> None:
    flow = FlowControl()
    flow.blocked_publish()
    assert flow.pause_reading()
    assert flow.reading_paused
    # Already paused: the transport is not asked again.
    assert not flow.pause_reading()
    assert flow.reading_paused


def test_heartbeats_are_not_expected_while_reading_is_paused() -> None:
    flow = FlowControl()
    flow.blocked_publish()
    flow.pause_reading()
    assert not flow.heartbeats_expected
    flow.unblocked()
    assert flow.heartbeats_expected


def test_unblocked_resumes_reading_only_if_paused() -> None:
    flow = FlowControl()
    assert not flow.unblocked()
    flow.blocked_publish()
    assert flow.pause_reading()
    assert flow.unblocked()
    assert not flow.reading_paused
    assert not flow.unblocked()


def test_unblocked_forgets_the_publish() -> None:
    """A publish during one alarm does not pause the connection in the next."""
    flow = FlowControl()
    flow.blocked_publish()
    flow.unblocked()
    assert not flow.pause_reading()
    flow.blocked_publish()
    assert flow.pause_reading()
