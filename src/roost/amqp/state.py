"""The AMQP connection's states and the transitions between them, sans-IO.

As h11 does it (``h11/_state.py``): the states are an enum and the
transitions a table from (state, trigger) to the state that follows. A
trigger is either a method the client sent on channel 0 (keyed by its pamqp
class) or a :class:`Signal`: something else the client did (its protocol
header, a method on another channel) or the server did (closing, hanging
up), or the socket going away.

Nothing here touches a socket or the broker. ``connection.py`` asks
:func:`next_state` about each trigger and carries out the consequences;
a client trigger the table has no entry for is refused with the
:class:`UnexpectedMethod` RabbitMQ would answer it with, or ignored in the
states that ignore everything (:data:`IGNORING`).

A handshake method moves the state as soon as it is accepted: if its
handler then refuses it (bad credentials, a tune-ok out of bounds, an
unknown vhost), the server closes, which is a transition of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from pamqp import commands as C
from pamqp.base import Frame as MethodFrame

from roost.amqp.wire import NO_METHOD, method_ids
from roost.broker import errors


class ConnectionState(enum.Enum):
    """Where a connection is. The values are RabbitMQ's names for its
    connection states (``rabbit_reader``), as the management API shows them."""

    AWAITING_HEADER = "pre_init"
    STARTING = "starting"  # connection.start sent, waiting for start-ok
    TUNING = "tuning"  # connection.tune sent, waiting for tune-ok
    OPENING = "opening"  # waiting for connection.open
    RUNNING = "running"
    # Either side sent connection.close, or the server hung up: the socket
    # is closing. Only connection.close and close-ok are read now.
    CLOSING = "closing"
    CLOSED = "closed"  # the socket is gone


class Signal(enum.Enum):
    """The triggers that are not a method on channel 0."""

    HEADER = "protocol header"  # the client's (valid) protocol header
    CHANNEL_METHOD = "channel method"  # a method on a channel other than 0
    SERVER_CLOSE = "server close"  # the server sends connection.close
    HANG_UP = "hang up"  # the server closes the socket without a close handshake
    CONNECTION_LOST = "connection lost"


Trigger = type[MethodFrame] | Signal

_S = ConnectionState
_ENDINGS: Final[dict[Trigger, ConnectionState]] = {
    # Every live state can end these ways. A client's connection.close is
    # answered in any of them, even before the handshake is done.
    C.Connection.Close: _S.CLOSING,
    Signal.SERVER_CLOSE: _S.CLOSING,
    Signal.HANG_UP: _S.CLOSING,
    Signal.CONNECTION_LOST: _S.CLOSED,
}

TRANSITIONS: Final[Mapping[ConnectionState, Mapping[Trigger, ConnectionState]]] = {
    _S.AWAITING_HEADER: {Signal.HEADER: _S.STARTING, **_ENDINGS},
    _S.STARTING: {C.Connection.StartOk: _S.TUNING, **_ENDINGS},
    _S.TUNING: {C.Connection.TuneOk: _S.OPENING, **_ENDINGS},
    _S.OPENING: {C.Connection.Open: _S.RUNNING, **_ENDINGS},
    _S.RUNNING: {
        Signal.CHANNEL_METHOD: _S.RUNNING,
        C.Connection.UpdateSecret: _S.RUNNING,
        # A client may tell the server it is blocked: nothing to do.
        C.Connection.Blocked: _S.RUNNING,
        C.Connection.Unblocked: _S.RUNNING,
        **_ENDINGS,
    },
    _S.CLOSING: {
        C.Connection.Close: _S.CLOSING,  # crossed the server's: answered
        C.Connection.CloseOk: _S.CLOSING,  # the answer to the server's: hang up
        Signal.CONNECTION_LOST: _S.CLOSED,
    },
    _S.CLOSED: {},
}

# States in which a trigger without an entry is ignored rather than refused.
IGNORING: Final = frozenset({_S.CLOSING, _S.CLOSED})

# The one method each handshake state waits for (named in its refusals).
AWAITED: Final[Mapping[ConnectionState, Trigger]] = {
    _S.AWAITING_HEADER: Signal.HEADER,
    _S.STARTING: C.Connection.StartOk,
    _S.TUNING: C.Connection.TuneOk,
    _S.OPENING: C.Connection.Open,
}


# The states before the connection is open, each waiting for one method.
HANDSHAKE: Final = frozenset(AWAITED)


class UnexpectedMethod(Exception):
    """The client sent something its connection's state does not allow:
    close the connection with ``code`` naming ``class_id``/``method_id``."""

    def __init__(self, code: int, text: str, class_id: int, method_id: int) -> None:
        super().__init__(f"{errors.REPLY_NAMES.get(code, str(code))} - {text}")
        self.code = code
        self.text = text
        self.class_id = class_id
        self.method_id = method_id


def next_state(state: ConnectionState, trigger: Trigger) -> ConnectionState | None:
    """The state ``trigger`` moves a connection in ``state`` to, or None if
    ``state`` ignores it. Raises :class:`UnexpectedMethod` if it is refused."""
    follows = TRANSITIONS[state].get(trigger)
    if follows is not None:
        return follows
    if state in IGNORING:
        return None
    raise refusal(state, trigger)


def refusal(state: ConnectionState, trigger: Trigger) -> UnexpectedMethod:
    """What RabbitMQ answers ``trigger`` with in ``state`` when the state
    does not allow it (codes as RabbitMQ's; texts are roost's where
    RabbitMQ's say less)."""
    if trigger is Signal.CHANNEL_METHOD:
        # RabbitMQ answers 505 (or closes silently before tune-ok); roost
        # names the reason (tests/e2e/test_protocol_errors.py).
        return UnexpectedMethod(
            errors.COMMAND_INVALID, "channel method before connection.open", *NO_METHOD
        )
    ids = NO_METHOD if isinstance(trigger, Signal) else method_ids(trigger.index)
    awaited = AWAITED.get(state)
    if awaited is not None:
        return UnexpectedMethod(
            errors.COMMAND_INVALID, f"expected '{_short(awaited)}', got '{_long(trigger)}'", *ids
        )
    # RabbitMQ's wording and code for any other method on channel 0.
    return UnexpectedMethod(
        errors.CHANNEL_ERROR, f"unexpected method in connection state {state.value}", *ids
    )


def _short(trigger: Trigger) -> str:
    return trigger.value if isinstance(trigger, Signal) else trigger.__name__


def _long(trigger: Trigger) -> str:
    return trigger.value if isinstance(trigger, Signal) else trigger.name
