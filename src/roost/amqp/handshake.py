"""The handshake's protocol logic, sans-IO: what connection.start offers,
the credentials in a start-ok's SASL response, and whether tune-ok's values
are within the server's.

Deciding whether the credentials log anyone in (users, the login throttle,
loopback-only users) is the broker's business; ``connection.py`` asks it.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from pamqp import commands as C
from pamqp import decode, exceptions

from roost import __version__
from roost.amqp.wire import FRAME_MIN_SIZE

# Clients switch features on these (RabbitMQ's set).
CAPABILITIES: Final = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}


def connection_start(offer_external: bool) -> C.Connection.Start:
    """connection.start; ``offer_external``: the client presented a
    verified certificate, which may stand in for a password (as
    rabbitmq_auth_mechanism_ssl offers EXTERNAL only then)."""
    return C.Connection.Start(
        version_major=0,
        version_minor=9,
        server_properties={
            "product": "roost",
            "version": __version__,
            "platform": "Python",
            "copyright": "roost contributors",
            "information": "https://pypi.org/project/roost/",
            "cluster_name": "roost",
            "capabilities": dict(CAPABILITIES),
        },
        mechanisms="PLAIN AMQPLAIN EXTERNAL" if offer_external else "PLAIN AMQPLAIN",
        locales="en_US",
    )


class Credentials(NamedTuple):
    user: str
    # None for EXTERNAL: the verified certificate vouches for the user.
    password: str | None


class UnknownMechanism(Exception):
    """A SASL mechanism the server did not offer: a 503, not a failed login."""


def sasl_credentials(
    mechanism: str, response: str | bytes | None, cert_name: str | None
) -> Credentials | None:
    """The user and password in a start-ok's ``response``; None if the
    response is malformed (answered as a failed login). ``cert_name`` is
    the CN of the client's verified certificate, if it presented one."""
    raw = response.encode("utf-8") if isinstance(response, str) else bytes(response or b"")
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            return None
        user, password = parts[1], parts[2]
    elif mechanism == "AMQPLAIN":
        # The response is a field table the client wrote: any decoding
        # failure (pamqp recurses into nested tables, so a deep one exhausts
        # the stack) is a malformed response, refused as a failed login.
        try:
            _, table = decode.field_table(struct.pack(">I", len(raw)) + raw)
        except (
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            struct.error,
            RecursionError,
            exceptions.PAMQPException,
        ):
            return None
        login, pw = table.get("LOGIN", ""), table.get("PASSWORD", "")
        # RabbitMQ's rabbit_auth_mechanism_amqplain takes only strings for
        # both: a table, array or number there is a refused login.
        if not isinstance(login, str | bytes | bytearray):
            return None
        if not isinstance(pw, str | bytes | bytearray):
            return None
        user = login.encode() if isinstance(login, str) else bytes(login)
        password = pw.encode() if isinstance(pw, str) else bytes(pw)
    elif mechanism == "EXTERNAL" and cert_name is not None:
        return Credentials(cert_name, None)
    else:
        # RabbitMQ's wording differs for a mechanism it knows but did not
        # offer on this connection (EXTERNAL without a client certificate).
        known = "invalid" if mechanism == "EXTERNAL" else "unknown"
        raise UnknownMechanism(f"{known} authentication mechanism '{mechanism}'")
    return Credentials(user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))


def tune_ok_refusal(
    channel_max: int, frame_max: int, server_channel_max: int, server_frame_max: int
) -> str | None:
    """Why the client's tune-ok values are refused (530, RabbitMQ's texts),
    or None if they are within the server's (zero: the server's value)."""
    if channel_max > server_channel_max:
        return f"channel_max={channel_max} > {server_channel_max} max"
    if frame_max and frame_max < FRAME_MIN_SIZE:
        return f"frame_max={frame_max} < {FRAME_MIN_SIZE} min"
    if frame_max > server_frame_max:
        return f"frame_max={frame_max} > {server_frame_max} max"
    return None
