"""Importing definitions JSON into a broker, the same way for every
importer: ``roost definitions import`` (a stopped broker's data
directory), ``roost ctl import`` (a running broker, through the control
socket) and ``POST /api/definitions``.

A document ``definitions.apply`` cannot read as definitions (a section
that is not a list, an entry without a name, a flag that is not a
boolean ...) is refused whole before anything is applied, so bad input
never leaves a broker half-changed. What only applying finds (a
redeclaration that differs from the existing queue, a vhost that does not
exist) is a problem: reported, and the rest imported.
"""

from __future__ import annotations

import logging
from typing import Any

from roost.broker.broker import Broker
from roost.broker.users import BLANK_PASSWORD, MD5, SHA256, SHA512, is_blank
from roost.store import definitions

SECTIONS = ("users", "vhosts", "permissions", "exchanges", "queues", "bindings")
# RabbitMQ sections roost has no equivalent for. ``global_parameters`` is
# left out: every RabbitMQ export carries its cluster name and id there.
UNSUPPORTED = ("topic_permissions", "parameters", "policies")
_ALGORITHMS = (SHA256, SHA512, MD5)
_STR_FIELDS = {
    "users": ("name",),
    "vhosts": ("name",),
    "permissions": ("user", "vhost", "configure", "write", "read"),
    "exchanges": ("name",),
    "queues": ("name",),
    "bindings": ("source", "destination"),
}
_OPTIONAL_STR = ("vhost", "type", "routing_key", "destination_type", "password_hash")
_OPTIONAL_BOOL = ("durable", "auto_delete", "internal")
# Errors shown in a refusal; a wrong file can have thousands.
_MAX_SHOWN = 10
log = logging.getLogger("roost.definitions")


class ImportRefused(definitions.DefinitionsError):
    """The document is not definitions; nothing of it was applied."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("not a definitions file: " + "; ".join(errors[:_MAX_SHOWN]))
        self.errors = errors


def errors(data: Any) -> list[str]:
    """What would stop ``definitions.apply`` from reading ``data`` at all."""
    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"]
    if not any(key in data for key in SECTIONS):
        return ["it has none of " + ", ".join(repr(s) for s in SECTIONS)]
    found: list[str] = []
    for section in (*SECTIONS, *UNSUPPORTED):
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            found.append(f"{section!r} must be a list")
            continue
        if section in UNSUPPORTED:
            continue
        for i, entry in enumerate(entries):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict):
                found.append(f"{where} must be an object")
                continue
            for key in _STR_FIELDS[section]:
                if not isinstance(entry.get(key), str):
                    found.append(f"{where} needs a string {key!r}")
            for key in _OPTIONAL_STR:
                if key in entry and not isinstance(entry[key], str):
                    found.append(f"{where}: {key!r} must be a string")
            for key in _OPTIONAL_BOOL:
                if key in entry and not isinstance(entry[key], bool):
                    found.append(f"{where}: {key!r} must be true or false")
            if entry.get("arguments") is not None and not isinstance(entry["arguments"], dict):
                found.append(f"{where}: 'arguments' must be an object")
            password = entry.get("password")
            if section == "users" and password is not None:
                if not isinstance(password, str):
                    found.append(f"{where}: 'password' must be a string")
                elif is_blank(password):
                    found.append(f"{where}: {BLANK_PASSWORD}")
            tags = entry.get("tags")
            if section == "users" and tags is not None and not isinstance(tags, str | list):
                found.append(f"{where}: 'tags' must be a list or a string")
    return found


def validated(data: Any) -> dict[str, Any]:
    """``data``, when it can be imported; raises ``ImportRefused`` if not."""
    found = errors(data)
    if found:
        raise ImportRefused(found)
    return dict(data)


def unusable_users(data: dict[str, Any]) -> list[str]:
    problems = []
    for u in data.get("users") or []:
        algorithm = u.get("hashing_algorithm", SHA256)
        if "password_hash" in u and algorithm not in _ALGORITHMS:
            problems.append(
                f"user {u['name']!r}: unsupported hashing_algorithm {algorithm!r}; "
                "the user cannot log in until its password is set again"
            )
    return problems


def import_into(broker: Broker, data: Any) -> list[str]:
    """Merge ``data`` into ``broker``'s definitions; returns the problems.
    Raises ``ImportRefused``, having changed nothing, when ``data`` is not
    definitions."""
    data = validated(data)
    # Another data directory's queue ids mean nothing here: new queues get
    # ids from this broker's own counter.
    if data.pop("roost", None) is not None:
        log.warning("definitions import: ignored the 'roost' section (another broker's ids)")
    problems = unusable_users(data) + definitions.apply(broker, data)
    # Users and permissions are not vhost definitions: have them saved too.
    broker.definitions_changed()
    return problems
