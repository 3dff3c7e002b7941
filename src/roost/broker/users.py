"""Users and password hashes in RabbitMQ's format.

Hashes are RabbitMQ's ``rabbit_password_hashing_sha256``: base64 of a 4-byte
salt followed by SHA-256(salt + password), so definitions exported from
RabbitMQ import unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def check_password(password: str, password_hash: str) -> bool:
    try:
        raw = base64.b64decode(password_hash)
    except ValueError:
        return False
    if len(raw) < 5:
        return False
    salt = raw[:4]
    return hmac.compare_digest(hash_password(password, salt), password_hash)


class User:
    __slots__ = ("name", "password_hash", "tags")

    def __init__(self, name: str, password_hash: str, tags: tuple[str, ...] = ()) -> None:
        self.name = name
        self.password_hash = password_hash
        self.tags = tags


class UserStore:
    def __init__(self) -> None:
        self.users: dict[str, User] = {}

    def add(self, name: str, password: str, tags: tuple[str, ...] = ()) -> User:
        user = User(name, hash_password(password), tags)
        self.users[name] = user
        return user

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.users.get(name)
        if user is None or not check_password(password, user.password_hash):
            return None
        return user
