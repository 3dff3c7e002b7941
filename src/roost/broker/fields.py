"""Field-table values as RabbitMQ compares and names them in its error texts,
and as JSON shows them (definitions, the management API, ``roost ctl``).

RabbitMQ keeps each argument's wire type (``signedint``, ``longstr`` ...)
and prints it in messages such as ``inequivalent arg 'x-message-ttl' ...:
received none but current is the value '10000' of type 'signedint'``. The
decoded Python values no longer carry the wire type, so it is inferred the
way pika and py-amqp (kombu) encode them: an ``int`` that fits 32 bits is
``signedint``, a larger one ``long``. Clients built on pamqp (aio-pika,
amqpstorm) pick the smallest integer type instead, so for them RabbitMQ may
name ``byte`` or ``short`` where roost says ``signedint``.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Mapping
from typing import Any

# rabbit_misc:type_class/1: integer types compare equal across widths, as do
# float and double; every other type only equals itself.
_INT_CLASS = "int"
_FLOAT_CLASS = "float"


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


# An argument the table does not have (distinct from a void/None value).
MISSING: Any = _Missing()


def type_name(value: Any) -> str:
    """The AMQP field type RabbitMQ would report for ``value``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -(2**31) <= value < 2**31 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "longstr"
    if isinstance(value, bytes | bytearray | memoryview):
        return "binary"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, decimal.Decimal):
        return "decimal"
    if isinstance(value, datetime.datetime):
        return "timestamp"
    if value is None:
        return "void"
    return type(value).__name__


def _type_class(value: Any) -> str:
    name = type_name(value)
    if name in ("signedint", "long", "decimal"):
        return _INT_CLASS
    if name == "double":
        return _FLOAT_CLASS
    return name


def equivalent(a: Any, b: Any) -> bool:
    """Whether two argument values are equal as RabbitMQ's
    ``rabbit_misc:assert_args_equivalence`` sees them (same type class and
    value: ``True`` is not ``1``, ``"1"`` is not ``1``)."""
    return _type_class(a) == _type_class(b) and a == b


def headers_equal(pattern: Any, value: Any) -> bool:
    """Header value equality as Erlang's ``==`` sees it in the headers
    exchange: types are not compared, but a boolean is never a number, and a
    ``longstr`` equals a ``binary`` with the same bytes."""
    if isinstance(pattern, bool) or isinstance(value, bool):
        return isinstance(pattern, bool) and isinstance(value, bool) and pattern == value
    if isinstance(pattern, str) and isinstance(value, bytes | bytearray):
        return pattern.encode("utf-8") == value
    if isinstance(value, str) and isinstance(pattern, bytes | bytearray):
        return value.encode("utf-8") == pattern
    return bool(pattern == value)


def _term(value: Any) -> str:
    """``value`` printed as Erlang's ``~tp`` prints the decoded field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "undefined"
    if isinstance(value, str):
        return '<<"' + value + '">>'
    if isinstance(value, bytes | bytearray | memoryview):
        return '<<"' + bytes(value).decode("utf-8", "replace") + '">>'
    if isinstance(value, dict):
        return (
            "["
            + ",".join(f'{{<<"{k}">>,{type_name(v)},{_term(v)}}}' for k, v in value.items())
            + "]"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(f"{{{type_name(v)},{_term(v)}}}" for v in value) + "]"
    return str(value)


def plain(value: Any) -> str:
    """A bare value: ``'10000'`` (``rabbit_misc:val/1`` on an untyped value)."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bytes | bytearray | memoryview):
        return "'" + bytes(value).decode("utf-8", "replace") + "'"
    return f"'{_term(value)}'"


def typed(value: Any) -> str:
    """A value with its type, or ``none`` when absent:
    ``the value '10000' of type 'signedint'`` (``rabbit_misc:val/1``)."""
    if value is MISSING:
        return "none"
    if isinstance(value, str):
        shown = value
    elif isinstance(value, bytes | bytearray | memoryview):
        shown = bytes(value).decode("utf-8", "replace")
    else:
        shown = _term(value)
    return f"the value '{shown}' of type '{type_name(value)}'"


def inequivalence(table_have: dict[str, Any], table_want: dict[str, Any], key: str) -> str | None:
    """The ``received ... but current is ...`` clause when ``key`` differs
    between the existing (``have``) and requested (``want``) tables, else None.

    Mirrors ``rabbit_misc:assert_args_equivalence1``: when both tables have
    the key, the values are shown bare; when one lacks it, the other is shown
    with its type and the missing one as ``none``.
    """
    have = table_have.get(key, MISSING)
    want = table_want.get(key, MISSING)
    if have is MISSING and want is MISSING:
        return None
    if have is not MISSING and want is not MISSING:
        if equivalent(have, want):
            return None
        return f"received {plain(want)} but current is {plain(have)}"
    return f"received {typed(want)} but current is {typed(have)}"


def jsonable(table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` as JSON can carry it: binary values as UTF-8 text, nested
    tables likewise, and values JSON has no type for (timestamps, decimals)
    as their ``str``."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, bytes | bytearray):
            v = bytes(v).decode("utf-8", "replace")
        elif isinstance(v, dict):
            v = jsonable(v)
        elif not isinstance(v, str | int | float | bool | list | type(None)):
            v = str(v)
        out[k] = v
    return out
