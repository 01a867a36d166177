"""Optional encryption at rest (AES-256-GCM, ``cryptography``) for saved checkpoints.

The key is 32 bytes, read from ``RCC_CHECKPOINT_KEY`` (hex or base64) or a key file (hex, base64
or the raw bytes); files are ``MAGIC | nonce (12 bytes) | ciphertext+tag``, with a fresh random
nonce per file. A wrong key or a modified file fails authentication and raises
:class:`~rcc_compression.errors.CheckpointError`; a manifest records :func:`key_id` so that a
wrong key is named as such before any decryption is tried.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from ..errors import CheckpointError

MAGIC = b"RCCENC01"
KEY_ENV = "RCC_CHECKPOINT_KEY"


def _aesgcm(key: bytes):  # noqa: ANN202 - cryptography type
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - optional dependency
        raise CheckpointError(
            "encryption needs the 'cryptography' package: pip install rcc-compression[crypto]") from None
    if len(key) != 32:
        raise CheckpointError(f"encryption key must be 32 bytes (AES-256), got {len(key)}")
    return AESGCM(key)


def parse_key(text: str) -> bytes:
    """A 32-byte key from 64 hex digits or base64 text."""
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError("encryption key must be 64 hex digits or base64 of 32 bytes") from None
    if len(key) != 32:
        raise CheckpointError(f"encryption key must be 32 bytes (AES-256), got {len(key)}")
    return key


def load_key(key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The key from ``key_file`` if given, else from ``RCC_CHECKPOINT_KEY``, else ``None``.

    A key file holds 64 hex digits, base64 text, or exactly 32 raw bytes.
    """
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise CheckpointError(f"{path}: key file not found")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read key file: {exc.strerror or exc}") from None
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = None
        if text is None or not text.strip().isprintable():
            if len(raw) == 32:  # raw key bytes (random bytes are almost never all printable text)
                return raw
            raise CheckpointError(f"{path}: not a key file (64 hex digits, base64 text, or 32 raw bytes)")
        try:
            return parse_key(text)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    env = os.environ.get(KEY_ENV)
    if not env:
        return None
    try:
        return parse_key(env)
    except CheckpointError as exc:
        raise CheckpointError(f"{KEY_ENV}: {exc}") from None


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (16 hex digits), stored in the manifest.

    It lets a load with the wrong key say so plainly instead of failing authentication; it is a
    hash of the key under a fixed label, so it reveals nothing usable about the key.
    """
    return hashlib.sha256(b"rcc-checkpoint-key-id\x00" + key).hexdigest()[:16]


def generate_key() -> bytes:
    """A fresh random 32-byte key."""
    return os.urandom(32)


def encrypt_bytes(data: bytes, key: bytes) -> bytes:
    """Encrypt and authenticate ``data``."""
    nonce = os.urandom(12)
    return MAGIC + nonce + _aesgcm(key).encrypt(nonce, data, MAGIC)


def decrypt_bytes(blob: bytes, key: bytes, what: str = "file") -> bytes:
    """Decrypt ``blob``; a wrong key or a modified file raises :class:`CheckpointError`."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 12 + 16:
        raise CheckpointError(f"{what}: not an encrypted rcc file")
    nonce = blob[len(MAGIC):len(MAGIC) + 12]
    try:
        from cryptography.exceptions import InvalidTag

        return _aesgcm(key).decrypt(nonce, blob[len(MAGIC) + 12:], MAGIC)
    except InvalidTag:
        raise CheckpointError(f"{what}: decryption failed: wrong key or the file was modified") from None
