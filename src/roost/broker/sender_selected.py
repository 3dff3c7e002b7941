"""Sender-selected distribution: the ``CC`` and ``BCC`` headers.

As in RabbitMQ (``rabbit_basic:header_routes/1``), a message is routed with
its routing key plus every string in its ``CC`` and ``BCC`` arrays (other
elements are ignored), each queue getting it once; the ``BCC`` header is
removed before the message is stored, delivered or returned. A ``CC`` or
``BCC`` header that is not an array makes the publish fail with 406.
"""

from __future__ import annotations

from roost import properties
from roost.broker import fields
from roost.broker.errors import precondition

ROUTING_HEADERS = ("CC", "BCC")


def maybe_present(raw: bytes) -> bool:
    """Cheap pre-check on the raw property bytes: could the message carry a
    CC or BCC header? (A field-table key is a length byte and the name.)"""
    return b"\x02CC" in raw or b"\x03BCC" in raw


def extract(raw: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The properties to keep (without ``BCC``) and the extra routing keys.

    ``raw`` must already be a well-formed property list
    (:func:`roost.properties.scan`).
    """
    headers = properties.headers_of(raw)
    if not headers:
        return raw, ()
    keys: list[str] = []
    for name in ROUTING_HEADERS:
        value = headers.get(name, fields.MISSING)
        if value is fields.MISSING:
            continue
        if not isinstance(value, list):
            raise precondition(
                f'invalid message: {{unacceptable_type_in_header,"{name}",'
                f"{fields.type_name(value)}}}"
            )
        keys.extend(k for k in value if isinstance(k, str))
    if "BCC" in headers:
        raw = properties.remove_header(raw, "BCC")
    return raw, tuple(keys)
