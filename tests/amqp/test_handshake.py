"""The handshake's protocol logic (roost.amqp.handshake), without a connection.

tests/e2e/test_connection.py and tests/e2e/security check the same through
real clients and sockets.
"""

from __future__ import annotations

import pytest
from pamqp import encode

from roost.amqp.handshake import (
    CAPABILITIES,
    Credentials,
    UnknownMechanism,
    connection_start,
    sasl_credentials,
    tune_ok_refusal,
)


def amqplain(**fields: object) -> bytes:
    # The response is a field table without its length prefix.
    return encode.field_table(fields)[4:]  # type: ignore[arg-type]


def test_connection_start_offers_external_only_with_a_certificate() -> None:
    assert connection_start(offer_external=False).mechanisms == "PLAIN AMQPLAIN"
    assert connection_start(offer_external=True).mechanisms == "PLAIN AMQPLAIN EXTERNAL"


def test_connection_start_properties() -> None:
    start = connection_start(offer_external=False)
    assert (start.version_major, start.version_minor) == (0, 9)
    assert start.server_properties is not None
    assert start.server_properties["product"] == "roost"
    assert start.server_properties["capabilities"] == CAPABILITIES
    # Each connection gets its own copy.
    assert start.server_properties["capabilities"] is not CAPABILITIES


@pytest.mark.parametrize("response", ["\0guest\0secret", b"\0guest\0secret"])
def test_plain(response: str | bytes) -> None:
    assert sasl_credentials("PLAIN", response, None) == Credentials("guest", "secret")


def test_plain_ignores_the_authorization_identity() -> None:
    assert sasl_credentials("PLAIN", b"admin\0guest\0pw", None) == Credentials("guest", "pw")


@pytest.mark.parametrize("response", [b"", b"guest", b"\0guest", b"\0a\0b\0c", None])
def test_malformed_plain_is_a_failed_login(response: bytes | None) -> None:
    assert sasl_credentials("PLAIN", response, None) is None


def test_undecodable_credentials_are_replaced_not_refused() -> None:
    assert sasl_credentials("PLAIN", b"\0gu\xffest\0pw", None) == Credentials("gu\ufffdest", "pw")


def test_amqplain() -> None:
    response = amqplain(LOGIN="guest", PASSWORD="secret")
    assert sasl_credentials("AMQPLAIN", response, None) == Credentials("guest", "secret")


def test_amqplain_with_byte_array_values() -> None:
    # Type "x" (byte array), as some clients send the password.
    response = amqplain(LOGIN="guest") + b"\x08PASSWORDx\x00\x00\x00\x06secret"
    assert sasl_credentials("AMQPLAIN", response, None) == Credentials("guest", "secret")


def test_amqplain_missing_fields_are_empty() -> None:
    assert sasl_credentials("AMQPLAIN", amqplain(LOGIN="guest"), None) == Credentials("guest", "")


@pytest.mark.parametrize("response", [b"\x05LOGIN!", b"\x05LOG", b"\xff"])
def test_malformed_amqplain_is_a_failed_login(response: bytes) -> None:
    assert sasl_credentials("AMQPLAIN", response, None) is None


def test_external_names_the_certificate_user() -> None:
    assert sasl_credentials("EXTERNAL", b"", "alice") == Credentials("alice", None)


def test_external_without_a_certificate_is_not_offered() -> None:
    with pytest.raises(UnknownMechanism) as info:
        sasl_credentials("EXTERNAL", b"", None)
    assert str(info.value) == "invalid authentication mechanism 'EXTERNAL'"


def test_unknown_mechanism() -> None:
    with pytest.raises(UnknownMechanism) as info:
        sasl_credentials("CRAM-MD5", b"x", "alice")
    assert str(info.value) == "unknown authentication mechanism 'CRAM-MD5'"


@pytest.mark.parametrize(
    ("channel_max", "frame_max", "refusal"),
    [
        (0, 0, None),
        (2047, 131072, None),
        (10, 4096, None),
        (2048, 131072, "channel_max=2048 > 2047 max"),
        (0, 4095, "frame_max=4095 < 4096 min"),
        (0, 131073, "frame_max=131073 > 131072 max"),
    ],
)
def test_tune_ok_refusal(channel_max: int, frame_max: int, refusal: str | None) -> None:
    assert tune_ok_refusal(channel_max, frame_max, 2047, 131072) == refusal
