"""Encryption at rest for the message store (a roost feature; RabbitMQ has
none).

A key is 32 random bytes (AES-256), kept base64-encoded in a file (``roost
keygen FILE``) or in the ``ROOST_ENCRYPTION_KEY`` environment variable. Its
*key id* is the first 4 bytes of its SHA-256: records carry it in clear so
a store can tell which key wrote them, and ``encryption.json`` in the data
directory remembers the id of the key in use, so that starting with a
wrong key, or with none, is refused before anything on disk is touched.

A :class:`Keyring` holds the current key (new records are sealed with it)
and any earlier keys (records written under them stay readable): rotating
a key is starting with the new key plus the old one until every record
written under the old one has been consumed.

Nonces: AES-GCM must never see the same (key, nonce) twice. Each nonce is
a random 64-bit prefix, drawn when the keyring is made and again every
2**32 records, followed by a 32-bit counter. Unlike fully random 96-bit
nonces (safe only up to about 2**32 records per key, a day or so of a busy
broker), nonces within a run never repeat, and two runs collide only if
they draw the same 64-bit prefix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from roost.store import fsio
from roost.store.datadir import DataDirUnsafe, open_nofollow

KEY_SIZE = 32
KEY_ID_SIZE = 4
NONCE_SIZE = 12
TAG_SIZE = 16
MARKER_FILE = "encryption.json"
KEY_ENV = "ROOST_ENCRYPTION_KEY"
ALGORITHM = "AES-256-GCM"

_nonce = struct.Struct(">QI")
_COUNTER_LIMIT = 1 << 32


class EncryptionError(Exception):
    """A key cannot be loaded, or does not open what the data directory holds.
    The message is fit for a user."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_SIZE]


def _aead(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EncryptionError(
            "encryption at rest needs the 'cryptography' package (pip install cryptography)"
        ) from exc
    return AESGCM(key)


class Keyring:
    """The key new records are sealed with, plus earlier keys by key id."""

    def __init__(self, current: bytes, old: Sequence[bytes] = ()) -> None:
        for key in (current, *old):
            if len(key) != KEY_SIZE:
                raise EncryptionError(f"an encryption key must be {KEY_SIZE} bytes")
        self.current_id = key_id(current)
        self._current = _aead(current)
        self._keys: dict[bytes, Any] = {key_id(k): _aead(k) for k in old}
        self._keys[self.current_id] = self._current
        self._prefix = 0
        self._counter = _COUNTER_LIMIT

    @property
    def ids(self) -> set[bytes]:
        return set(self._keys)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce | ciphertext | tag`` under the current key."""
        if self._counter >= _COUNTER_LIMIT:
            self._prefix = int.from_bytes(os.urandom(8), "big")
            self._counter = 0
        nonce = _nonce.pack(self._prefix, self._counter)
        self._counter += 1
        sealed: bytes = self._current.encrypt(nonce, plaintext, aad)
        return nonce + sealed

    def open(self, kid: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """Decrypt ``nonce | ciphertext | tag``; ``ValueError`` when the key is
        unknown or the record fails authentication."""
        aead = self._keys.get(bytes(kid))
        if aead is None:
            raise ValueError(f"record is encrypted with unknown key id {bytes(kid).hex()}")
        nonce = bytes(sealed[:NONCE_SIZE])
        try:
            plain: bytes = aead.decrypt(nonce, bytes(sealed[NONCE_SIZE:]), aad)
        except Exception as exc:  # cryptography's InvalidTag
            raise ValueError(
                f"record under key id {bytes(kid).hex()} failed authentication"
            ) from exc
        return plain


# -- keys on disk and in the environment ----------------------------------


def generate_key_file(path: Path) -> bytes:
    """Write a new random key to ``path`` (mode 0600, never overwriting);
    returns its key id."""
    key = os.urandom(KEY_SIZE)
    try:
        fd = fsio.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EncryptionError(f"{path} already exists; not overwriting a key") from None
    except OSError as exc:
        raise EncryptionError(f"cannot create {path}: {exc.strerror}") from None
    try:
        fsio.write_all(fd, base64.b64encode(key) + b"\n")
        fsio.fsync(fd)
    finally:
        fsio.close(fd)
    # The file's name too: a key lost in a crash would leave what it
    # sealed unreadable.
    fsio.fsync_dir(path.parent)
    return key_id(key)


def parse_key(text: str | bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise EncryptionError(
            f"{where}: expected {KEY_SIZE} random bytes in base64 "
            "(make a key file with `roost keygen FILE`)"
        )
    return key


def read_key_file(path: str) -> bytes:
    """The key in ``path``. Refused, before it is read, when the file is a
    symbolic link or anyone but its owner may read or write it: a key
    others could read protects nothing."""
    try:
        fd = open_nofollow(Path(path), os.O_RDONLY)
    except DataDirUnsafe as exc:
        raise EncryptionError(f"encryption key file: {exc}") from None
    except OSError as exc:
        raise EncryptionError(f"cannot read encryption key file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EncryptionError(
                f"encryption key file {path} is accessible to other users (mode "
                f"{stat.S_IMODE(mode):04o}); refusing it: chmod 600 it"
            )
        text = os.read(fd, 4096)
    finally:
        fsio.close(fd)
    return parse_key(text, f"encryption key file {path}")


def load_keyring(key_file: str, old_key_files: str, environ: Mapping[str, str]) -> Keyring | None:
    """The keyring configured by ``encryption_key_file`` (or the
    ``ROOST_ENCRYPTION_KEY`` environment variable) and
    ``old_encryption_key_file`` (comma-separated), or None."""
    env_key = environ.get(KEY_ENV, "").strip()
    if key_file and env_key:
        raise EncryptionError(
            f"both encryption_key_file and {KEY_ENV} are set; set only one of them"
        )
    old_files = [p.strip() for p in old_key_files.split(",") if p.strip()]
    if key_file:
        current = read_key_file(key_file)
    elif env_key:
        current = parse_key(env_key, KEY_ENV)
    elif old_files:
        raise EncryptionError(
            "old_encryption_key_file is only used together with encryption_key_file "
            f"(or {KEY_ENV}): the current key"
        )
    else:
        return None
    return Keyring(current, [read_key_file(p) for p in old_files])


# -- the data directory's marker ------------------------------------------


def read_marker(data_dir: Path) -> bytes | None:
    """The key id ``encryption.json`` records, or None when there is none."""
    path = data_dir / MARKER_FILE
    try:
        doc = json.loads(path.read_bytes())
        return bytes.fromhex(doc["key_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EncryptionError(f"cannot read {path}: {exc}") from None


def marker_content(keyring: Keyring) -> bytes:
    doc = {"algorithm": ALGORITHM, "key_id": keyring.current_id.hex()}
    return json.dumps(doc, indent=2).encode() + b"\n"


def check_marker(data_dir: Path, keyring: Keyring | None) -> None:
    """Refuse a data directory that was encrypted with a key not given now."""
    marked = read_marker(data_dir)
    if marked is None or (keyring is not None and marked in keyring.ids):
        return
    if keyring is None:
        raise EncryptionError(
            f"data directory {data_dir} uses encryption at rest (key id {marked.hex()}), "
            "but no encryption key was given (encryption_key_file or "
            f"{KEY_ENV}); nothing was changed"
        )
    raise EncryptionError(
        f"data directory {data_dir} is encrypted with key id {marked.hex()}, but the "
        f"encryption key given has key id {keyring.current_id.hex()}; give the right key "
        "(to rotate keys, pass the old one with old_encryption_key_file); nothing was changed"
    )
