"""The connection state machine (roost.amqp.state), without a connection.

The codes and texts pinned here are the ones the end-to-end tests and the
connection property test expect on the wire (tests/e2e/test_connection.py,
tests/e2e/test_protocol_errors.py, tests/amqp/test_connection_state_machine.py).
"""

from __future__ import annotations

import pytest
from pamqp import commands as C
from pamqp.base import Frame

from roost.amqp.state import (
    AWAITED,
    HANDSHAKE,
    IGNORING,
    TRANSITIONS,
    ConnectionState,
    Signal,
    Trigger,
    UnexpectedMethod,
    next_state,
)
from roost.amqp.wire import CONNECTION_CLASS, method_ids
from roost.broker import errors

S = ConnectionState
CONNECTION_METHODS: list[Trigger] = [
    cls
    for cls in vars(C.Connection).values()
    if isinstance(cls, type) and hasattr(cls, "index") and cls.index >> 16 == CONNECTION_CLASS
]
# Methods of other classes a client might send on channel 0 by mistake.
OTHER_METHODS: list[Trigger] = [C.Channel.Open, C.Basic.Qos, C.Basic.Publish, C.Queue.Declare]
TRIGGERS: list[Trigger] = [*Signal, *CONNECTION_METHODS, *OTHER_METHODS]
SERVER_SIGNALS = (Signal.SERVER_CLOSE, Signal.HANG_UP, Signal.CONNECTION_LOST)
LIVE = [s for s in S if s not in IGNORING]


def name(value: object) -> str:
    """Test ids: the state's or signal's name, the method's (Connection.Open)."""
    return str(getattr(value, "name", value))


def test_connection_methods_are_all_there() -> None:
    assert len(CONNECTION_METHODS) == 14  # start ... update-secret-ok


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize(
    ("state", "trigger", "after"),
    [(s, t, a) for s, row in TRANSITIONS.items() for t, a in row.items()],
    ids=name,
)
def test_every_entry_behaves_as_the_table_says(
    state: ConnectionState, trigger: Trigger, after: ConnectionState
) -> None:
    assert next_state(state, trigger) is after


@pytest.mark.parametrize("state", list(S), ids=name)
@pytest.mark.parametrize("trigger", TRIGGERS, ids=name)
def test_every_pair_is_taken_ignored_or_refused(state: ConnectionState, trigger: Trigger) -> None:
    """The whole (state, trigger) product: the table's entry, else ignored in
    the ignoring states, else refused with RabbitMQ's code."""
    if trigger in TRANSITIONS[state]:
        assert next_state(state, trigger) is TRANSITIONS[state][trigger]
    elif state in IGNORING:
        assert next_state(state, trigger) is None
    else:
        with pytest.raises(UnexpectedMethod) as info:
            next_state(state, trigger)
        code = errors.CHANNEL_ERROR if state is S.RUNNING else errors.COMMAND_INVALID
        assert info.value.code == code
        if isinstance(trigger, Signal):
            assert (info.value.class_id, info.value.method_id) == (0, 0)
        else:
            assert (info.value.class_id, info.value.method_id) == method_ids(trigger.index)


def test_the_handshake_leads_to_running() -> None:
    state = S.AWAITING_HEADER
    for trigger in (Signal.HEADER, C.Connection.StartOk, C.Connection.TuneOk, C.Connection.Open):
        assert state in HANDSHAKE
        assert AWAITED[state] is trigger
        after = next_state(state, trigger)
        assert after is not None
        state = after
    assert state is S.RUNNING
    assert {S.AWAITING_HEADER, S.STARTING, S.TUNING, S.OPENING} == HANDSHAKE


@pytest.mark.parametrize("state", LIVE, ids=name)
def test_every_live_state_can_end(state: ConnectionState) -> None:
    assert next_state(state, C.Connection.Close) is S.CLOSING
    assert next_state(state, Signal.SERVER_CLOSE) is S.CLOSING
    assert next_state(state, Signal.HANG_UP) is S.CLOSING
    assert next_state(state, Signal.CONNECTION_LOST) is S.CLOSED


@pytest.mark.parametrize("state", list(S), ids=name)
@pytest.mark.parametrize("signal", SERVER_SIGNALS, ids=name)
def test_the_server_side_is_never_refused(state: ConnectionState, signal: Signal) -> None:
    next_state(state, signal)


def test_closing_reads_only_close_and_close_ok() -> None:
    assert next_state(S.CLOSING, C.Connection.Close) is S.CLOSING
    assert next_state(S.CLOSING, C.Connection.CloseOk) is S.CLOSING
    assert next_state(S.CLOSING, Signal.CONNECTION_LOST) is S.CLOSED
    # A second close from the server, a channel method, anything else: ignored.
    assert next_state(S.CLOSING, Signal.SERVER_CLOSE) is None
    assert next_state(S.CLOSING, Signal.CHANNEL_METHOD) is None
    assert next_state(S.CLOSING, C.Connection.StartOk) is None


def test_closed_is_final() -> None:
    assert TRANSITIONS[S.CLOSED] == {}
    for trigger in TRIGGERS:
        assert next_state(S.CLOSED, trigger) is None


def test_only_a_lost_connection_is_closed() -> None:
    for state, row in TRANSITIONS.items():
        for trigger, after in row.items():
            if after is S.CLOSED:
                assert trigger is Signal.CONNECTION_LOST, (state, trigger)


@pytest.mark.parametrize(
    ("state", "method", "text"),
    [
        (S.STARTING, C.Connection.TuneOk, "expected 'StartOk', got 'Connection.TuneOk'"),
        (S.TUNING, C.Connection.Open, "expected 'TuneOk', got 'Connection.Open'"),
        (S.OPENING, C.Connection.StartOk, "expected 'Open', got 'Connection.StartOk'"),
        (S.OPENING, C.Basic.Qos, "expected 'Open', got 'Basic.Qos'"),
    ],
)
def test_out_of_order_handshake_method(
    state: ConnectionState, method: type[Frame], text: str
) -> None:
    with pytest.raises(UnexpectedMethod) as info:
        next_state(state, method)
    exc = info.value
    assert (exc.code, exc.text) == (errors.COMMAND_INVALID, text)
    assert (exc.class_id, exc.method_id) == method_ids(method.index)
    assert str(exc) == f"COMMAND_INVALID - {text}"


@pytest.mark.parametrize("method", [C.Connection.StartOk, C.Connection.CloseOk, C.Basic.Publish])
def test_unexpected_method_when_running(method: type[Frame]) -> None:
    with pytest.raises(UnexpectedMethod) as info:
        next_state(S.RUNNING, method)
    exc = info.value
    assert exc.code == errors.CHANNEL_ERROR
    assert exc.text == "unexpected method in connection state running"
    assert (exc.class_id, exc.method_id) == method_ids(method.index)


@pytest.mark.parametrize("state", [S.STARTING, S.TUNING, S.OPENING], ids=name)
def test_channel_method_before_open(state: ConnectionState) -> None:
    with pytest.raises(UnexpectedMethod) as info:
        next_state(state, Signal.CHANNEL_METHOD)
    exc = info.value
    assert (exc.code, exc.text) == (errors.COMMAND_INVALID, "channel method before connection.open")
    assert (exc.class_id, exc.method_id) == (0, 0)


def test_running_takes_what_a_client_may_send() -> None:
    for trigger in (
        Signal.CHANNEL_METHOD,
        C.Connection.UpdateSecret,
        C.Connection.Blocked,
        C.Connection.Unblocked,
    ):
        assert next_state(S.RUNNING, trigger) is S.RUNNING


def test_values_are_rabbitmq_state_names() -> None:
    # The management API shows them (http/connections.py).
    assert S.RUNNING.value == "running"
    assert {s.value for s in S} == {
        "pre_init",
        "starting",
        "tuning",
        "opening",
        "running",
        "closing",
        "closed",
    }
