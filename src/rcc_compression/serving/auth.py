"""API keys for the model server: stored hashed, compared in constant time, each allowed a list of models.

A key is 32 random bytes (``secrets.token_urlsafe``) with a short public prefix, so a SHA-256 of it
is as strong as a slow KDF would be (the KDF exists to stretch low-entropy passwords; a 256-bit
random key needs no stretching) and costs microseconds per request. The key file holds only the
hashes::

    {"format": "rcc-api-keys", "version": 1,
     "keys": [{"id": "alice", "sha256": "<64 hex digits>", "models": ["rcc-clip-world"]},
              {"id": "ops", "sha256": "...", "models": ["*"]}]}

``models`` lists the model names the key may use (``"*"``: all of them). The plain key is shown
once, when it is made (``rcc serve`` without ``--keys``, or ``rcc keys add``), and never written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils.io import atomic_write_json

KEY_FILE_FORMAT = "rcc-api-keys"
KEY_PREFIX = "rcc_"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a key (what the key file stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A fresh random API key: ``rcc_`` + 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    """One key as the server knows it: an id, the hash, and the models it may use."""

    id: str
    sha256: str
    models: tuple[str, ...] = ("*",)

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass
class KeyStore:
    """The hashed keys a server accepts. ``verify`` never exits early on a match, so its time
    does not depend on which stored key (if any) the presented one equals."""

    records: list[KeyRecord] = field(default_factory=list)

    def verify(self, presented: str | None) -> KeyRecord | None:
        """The record of ``presented`` or ``None``."""
        if not presented or len(presented) > 256:
            return None
        digest = hash_key(presented).encode("ascii")
        found = None
        for rec in self.records:
            if hmac.compare_digest(digest, rec.sha256.encode("ascii")):
                found = rec
        return found

    def add(self, key_id: str, models: list[str] | tuple[str, ...]) -> str:
        """Make a new key allowed ``models``; store its hash; return the plain key (shown once)."""
        if not _ID.match(key_id):
            raise ConfigError(f"key id {key_id!r}: use 1-64 letters, digits, '_', '.', '-'")
        if any(r.id == key_id for r in self.records):
            raise ConfigError(f"key id {key_id!r} exists already")
        key = generate_key()
        self.records.append(KeyRecord(key_id, hash_key(key), _models(models, key_id)))
        return key

    def to_json(self) -> dict[str, Any]:
        return {"format": KEY_FILE_FORMAT, "version": 1,
                "keys": [{"id": r.id, "sha256": r.sha256, "models": list(r.models)} for r in self.records]}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically with mode 0600 (it holds hashes only)."""
        atomic_write_json(Path(path), self.to_json(), mode=0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyStore:
        """Read and check a key file; bad content raises :class:`ConfigError` naming the file and entry."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: key file not found (make one with `rcc keys add {path} --id NAME`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable JSON key file ({str(exc)[:200]})") from None
        if not isinstance(data, dict) or data.get("format") != KEY_FILE_FORMAT or data.get("version") != 1:
            raise ConfigError(f"{path}: not an {KEY_FILE_FORMAT} file of version 1")
        if set(data) - {"format", "version", "keys"}:
            raise ConfigError(f"{path}: unknown fields {sorted(set(data) - {'format', 'version', 'keys'})}")
        entries = data.get("keys")
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: 'keys' must be a list")
        store = cls()
        for i, e in enumerate(entries):
            where = f"{path}: keys[{i}]"
            if not isinstance(e, dict) or set(e) - {"id", "sha256", "models"}:
                raise ConfigError(f"{where}: an entry has exactly the fields id, sha256, models")
            if "key" in e or not isinstance(e.get("sha256"), str) or not _HEX.match(e["sha256"]):
                raise ConfigError(f"{where}: 'sha256' must be 64 lower-case hex digits (plain keys are never stored)")
            if not isinstance(e.get("id"), str) or not _ID.match(e["id"]):
                raise ConfigError(f"{where}: 'id' must be 1-64 letters, digits, '_', '.', '-'")
            if any(r.id == e["id"] for r in store.records):
                raise ConfigError(f"{where}: duplicate id {e['id']!r}")
            store.records.append(KeyRecord(e["id"], e["sha256"], _models(e.get("models", ["*"]), where)))
        return store


def _models(models: Any, where: str) -> tuple[str, ...]:
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: 'models' must be a list of model names or ['*']")
    return tuple(models)


def bearer_key(headers: dict[bytes, bytes] | list[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (raw ASGI headers)."""
    items = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif lname == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None
