"""The administrative commands, as plain functions of a ``Broker``.

The same functions serve a running broker (called by the control socket on
the broker's event loop) and a stopped one (called by ``roost ctl`` on a
broker loaded from the data directory's definitions), so both give the
same results and the same errors.

A command takes its arguments as a JSON object and returns something JSON
can encode: a list of rows for the ``list_*`` commands, ``{"message": ...}``
for the others. It raises ``ControlError`` with a message for the user.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from roost import safe_regex
from roost.broker.broker import Broker
from roost.broker.errors import CONNECTION_FORCED
from roost.broker.users import (
    BLANK_PASSWORD,
    MD5,
    SHA256,
    SHA512,
    User,
    hash_password,
    is_blank,
)

Command = Callable[[Broker, dict[str, Any]], Any]


class ControlError(Exception):
    """A command that cannot be done; the message is for the user."""


def str_arg(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise ControlError(f"'{key}' must be a string")
    return value


def _tags(args: dict[str, Any]) -> tuple[str, ...]:
    raw = args.get("tags") or []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise ControlError("'tags' must be a list of strings")
    # "a,b" and "a b" both name two tags, as rabbitmqctl accepts either.
    return tuple(dict.fromkeys(t for item in raw for t in re.split(r"[,\s]+", item) if t))


def _user(broker: Broker, name: str) -> User:
    user = broker.users.users.get(name)
    if user is None:
        raise ControlError(f"user '{name}' does not exist")
    return user


def vhost_name_arg(broker: Broker, args: dict[str, Any]) -> str:
    name = str_arg(args, "vhost", "/")
    if name not in broker.vhosts:
        raise ControlError(f"vhost '{name}' does not exist")
    return name


def _password_hash(args: dict[str, Any]) -> str:
    password = str_arg(args, "password")
    if is_blank(password):
        raise ControlError(BLANK_PASSWORD)
    return hash_password(password)


def _done(message: str) -> dict[str, str]:
    return {"message": message}


# -- users ----------------------------------------------------------------


def add_user(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    if not name:
        raise ControlError("user name must not be empty")
    if name in broker.users.users:
        raise ControlError(f"user '{name}' already exists")
    broker.users.put(User(name, _password_hash(args), _tags(args)))
    broker.definitions_changed()
    return _done(f"added user '{name}'")


def delete_user(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    _user(broker, name)
    del broker.users.users[name]
    # As in RabbitMQ, a user's permissions go with it.
    for key in [k for k in broker.permissions if k[0] == name]:
        del broker.permissions[key]
    broker.definitions_changed()
    # And so do its connections (RabbitMQ 3.10 closes them the same way).
    for conn in [c for c in getattr(broker, "connections", ()) if c.username == name]:
        conn.close(CONNECTION_FORCED, f"user '{name}' is deleted")
    return _done(f"deleted user '{name}'")


def change_password(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    user = _user(broker, name)
    # Always stored with the default algorithm, whatever an import used.
    broker.users.put(User(name, _password_hash(args), user.tags))
    broker.definitions_changed()
    return _done(f"changed the password of user '{name}'")


def set_tags(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    user = _user(broker, name)
    user.tags = _tags(args)
    broker.definitions_changed()
    shown = ", ".join(user.tags) if user.tags else "none"
    return _done(f"set the tags of user '{name}' to: {shown}")


def put_user(broker: Broker, args: dict[str, Any]) -> Any:
    """Create or replace a user, as the management API's PUT /api/users:
    with a ``password``, a ``password_hash`` (and ``hashing_algorithm``) in
    RabbitMQ's format, or neither (then no password logs it in, or an
    existing user keeps its own). ``created`` tells which it was."""
    name = str_arg(args, "name")
    if not name:
        raise ControlError("user name must not be empty")
    tags = _tags(args)
    existing = broker.users.users.get(name)
    algorithm = str_arg(args, "hashing_algorithm", SHA256)
    if algorithm not in (SHA256, SHA512, MD5):
        raise ControlError(f"unknown hashing algorithm '{algorithm}'")
    if "password_hash" in args:
        password_hash = str_arg(args, "password_hash")
        try:
            valid = password_hash == "" or len(base64.b64decode(password_hash, validate=True)) > 4
        except (ValueError, binascii.Error):
            valid = False
        if not valid:
            raise ControlError("invalid password_hash: not a salted hash in base64")
    elif "password" in args:
        password_hash, algorithm = _password_hash(args), SHA256
    elif existing is not None:
        password_hash, algorithm = existing.password_hash, existing.algorithm
    else:
        password_hash = ""
    broker.users.put(User(name, password_hash, tags, algorithm))
    broker.definitions_changed()
    verb = "updated" if existing is not None else "added"
    return {"message": f"{verb} user '{name}'", "created": existing is None}


def list_users(broker: Broker, args: dict[str, Any]) -> Any:
    return [
        {"name": u.name, "tags": list(u.tags)}
        for u in sorted(broker.users.users.values(), key=lambda u: u.name)
    ]


# -- vhosts ---------------------------------------------------------------


def add_vhost(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    if not name:
        raise ControlError("vhost name must not be empty")
    if name in broker.vhosts:
        raise ControlError(f"vhost '{name}' already exists")
    broker.add_vhost(name)
    return _done(f"added vhost '{name}'")


def delete_vhost(broker: Broker, args: dict[str, Any]) -> Any:
    name = str_arg(args, "name")
    vh = broker.vhosts.get(name)
    if vh is None:
        raise ControlError(f"vhost '{name}' does not exist")
    delete = getattr(broker, "delete_vhost", None)
    if delete is not None:
        delete(name)
    else:
        # Without Broker.delete_vhost: drop its queues (their stored
        # messages go with them) and exchanges, then the vhost itself.
        for q in list(vh.queues.values()):
            vh.remove_queue(q)
        vh.exchanges.clear()
        del broker.vhosts[name]
    for key in [k for k in broker.permissions if k[1] == name]:
        del broker.permissions[key]
    broker.definitions_changed()
    return _done(f"deleted vhost '{name}'")


def list_vhosts(broker: Broker, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in sorted(broker.vhosts)]


# -- permissions ----------------------------------------------------------


def set_permissions(broker: Broker, args: dict[str, Any]) -> Any:
    vhost = vhost_name_arg(broker, args)
    user = str_arg(args, "user")
    _user(broker, user)
    patterns = []
    for key in ("configure", "write", "read"):
        pattern = str_arg(args, key)
        try:
            safe_regex.compile_pattern(pattern)
        except safe_regex.InvalidPattern as exc:
            raise ControlError(f"invalid {key} pattern {pattern!r}: {exc}") from None
        patterns.append(pattern)
    broker.permissions[(user, vhost)] = (patterns[0], patterns[1], patterns[2])
    broker.definitions_changed()
    return _done(f"set permissions of user '{user}' in vhost '{vhost}'")


def clear_permissions(broker: Broker, args: dict[str, Any]) -> Any:
    vhost = vhost_name_arg(broker, args)
    user = str_arg(args, "user")
    _user(broker, user)
    if broker.permissions.pop((user, vhost), None) is not None:
        broker.definitions_changed()
    return _done(f"cleared permissions of user '{user}' in vhost '{vhost}'")


def list_permissions(broker: Broker, args: dict[str, Any]) -> Any:
    vhost = vhost_name_arg(broker, args)
    return [
        {"user": user, "configure": c, "write": w, "read": r}
        for (user, vh), (c, w, r) in sorted(broker.permissions.items())
        if vh == vhost
    ]


COMMANDS: dict[str, Command] = {
    "add_user": add_user,
    "delete_user": delete_user,
    "change_password": change_password,
    "set_tags": set_tags,
    "list_users": list_users,
    "add_vhost": add_vhost,
    "delete_vhost": delete_vhost,
    "list_vhosts": list_vhosts,
    "set_permissions": set_permissions,
    "clear_permissions": clear_permissions,
    "list_permissions": list_permissions,
}
# Commands that only read: run on a stopped data directory, they leave it as is.
READ_ONLY = frozenset({"list_users", "list_vhosts", "list_permissions"})


def execute(broker: Broker, command: str, args: dict[str, Any]) -> Any:
    fn = COMMANDS.get(command)
    if fn is None:
        raise ControlError(f"unknown command '{command}'")
    if not isinstance(args, dict):
        raise ControlError("'args' must be an object")
    return fn(broker, args)
