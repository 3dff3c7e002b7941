"""Users and password hashes in RabbitMQ's formats.

Hashes are base64 of a 4-byte salt followed by H(salt + password), with H
SHA-256 (``rabbit_password_hashing_sha256``, the default), SHA-512 or MD5
as RabbitMQ names them, so definitions exported from RabbitMQ import
unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

SHA256 = "rabbit_password_hashing_sha256"
SHA512 = "rabbit_password_hashing_sha512"
MD5 = "rabbit_password_hashing_md5"
_HASHES = {SHA256: hashlib.sha256, SHA512: hashlib.sha512, MD5: hashlib.md5}
BLANK_PASSWORD = "password must not be blank"


def is_blank(password: str) -> bool:
    """Blank passwords are refused wherever one is set, and never log in
    (as in RabbitMQ): a user without a password uses another mechanism."""
    return not password.strip()


def hash_password(password: str, salt: bytes | None = None, algorithm: str = SHA256) -> str:
    salt = os.urandom(4) if salt is None else salt
    digest = _HASHES[algorithm](salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def check_password(password: str, password_hash: str, algorithm: str = SHA256) -> bool:
    if algorithm not in _HASHES or not password_hash or is_blank(password):
        return False
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except (ValueError, binascii.Error):
        return False
    if len(raw) < 5:
        return False
    return hmac.compare_digest(hash_password(password, raw[:4], algorithm), password_hash)


class User:
    __slots__ = ("algorithm", "name", "password_hash", "tags")

    def __init__(
        self,
        name: str,
        password_hash: str,
        tags: tuple[str, ...] = (),
        algorithm: str = SHA256,
    ) -> None:
        self.name = name
        self.password_hash = password_hash
        self.tags = tags
        self.algorithm = algorithm


class UserStore:
    def __init__(self) -> None:
        self.users: dict[str, User] = {}

    def add(self, name: str, password: str, tags: tuple[str, ...] = ()) -> User:
        user = User(name, hash_password(password), tags)
        self.users[name] = user
        return user

    def put(self, user: User) -> None:
        self.users[user.name] = user

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.users.get(name)
        if user is None or not check_password(password, user.password_hash, user.algorithm):
            return None
        return user
