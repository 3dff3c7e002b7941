"""Errors the broker model raises, carrying RabbitMQ's reply codes.

The codes are AMQP's, but they are also the vocabulary RabbitMQ's semantics
are described in, so the model owns them; a protocol layer maps them onto
its own close frames.
"""

from __future__ import annotations

CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

REPLY_NAMES = {
    CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE",
    NO_ROUTE: "NO_ROUTE",
    NO_CONSUMERS: "NO_CONSUMERS",
    CONNECTION_FORCED: "CONNECTION_FORCED",
    INVALID_PATH: "INVALID_PATH",
    ACCESS_REFUSED: "ACCESS_REFUSED",
    NOT_FOUND: "NOT_FOUND",
    RESOURCE_LOCKED: "RESOURCE_LOCKED",
    PRECONDITION_FAILED: "PRECONDITION_FAILED",
    FRAME_ERROR: "FRAME_ERROR",
    SYNTAX_ERROR: "SYNTAX_ERROR",
    COMMAND_INVALID: "COMMAND_INVALID",
    CHANNEL_ERROR: "CHANNEL_ERROR",
    UNEXPECTED_FRAME: "UNEXPECTED_FRAME",
    RESOURCE_ERROR: "RESOURCE_ERROR",
    NOT_ALLOWED: "NOT_ALLOWED",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    INTERNAL_ERROR: "INTERNAL_ERROR",
}

# Codes that RabbitMQ treats as hard errors: they close the whole connection.
CONNECTION_LEVEL = frozenset(
    {
        CONNECTION_FORCED,
        INVALID_PATH,
        FRAME_ERROR,
        SYNTAX_ERROR,
        COMMAND_INVALID,
        CHANNEL_ERROR,
        UNEXPECTED_FRAME,
        RESOURCE_ERROR,
        NOT_ALLOWED,
        NOT_IMPLEMENTED,
        INTERNAL_ERROR,
    }
)


class BrokerError(Exception):
    """An operation failed with an AMQP reply code.

    ``text`` is the explanation without the code-name prefix; ``reply_text``
    is the full text as RabbitMQ words it (``"NOT_FOUND - no queue 'q' ..."``).
    """

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{REPLY_NAMES.get(code, str(code))} - {text}")
        self.code = code
        self.text = text

    @property
    def reply_text(self) -> str:
        return str(self)

    @property
    def closes_connection(self) -> bool:
        return self.code in CONNECTION_LEVEL


def not_found(kind: str, name: str, vhost: str) -> BrokerError:
    return BrokerError(NOT_FOUND, f"no {kind} '{name}' in vhost '{vhost}'")


def precondition(text: str) -> BrokerError:
    return BrokerError(PRECONDITION_FAILED, text)


def access_refused(text: str) -> BrokerError:
    return BrokerError(ACCESS_REFUSED, text)
