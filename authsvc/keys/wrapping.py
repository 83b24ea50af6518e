"""Key material at rest under the KEK: the secret-hash key, the start-up check, `kek rotate`.

Every wrapped item is stored with the kek id of the KEK that wraps it (a check value, not the
key), so a server tells at start which of its KEKs to use, and refuses, naming the variables,
when the database is wrapped under a KEK it was not given. The KEK new data is wrapped under is
the one the database names (Repository.fetch_wrapping_kek_id), not this process's choice: during
a roll, replicas with the old KEK only and replicas with both keep reading each other's writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from authsvc.crypto.kek import KekRing, KeyEncryptionKey, UnknownKek
from authsvc.errors import ConfigError, DecryptError
from authsvc.storage.records import SECRET_HASH_KEY, SigningKeyRecord, WrappedKeyRecord
from authsvc.storage.repository import AuditEvent, Repository

__all__ = [
    "KekRotation",
    "check_wrapped_keys",
    "load_secret_hash_key",
    "rotate_kek",
    "wrapping_kek",
]

_HASH_KEY_BYTES = 32
NOT_HELD = (
    "the stored keys are wrapped under a key-encryption key that is neither AUTHSVC_KEK nor "
    "AUTHSVC_KEK_PREVIOUS (a wrong KEK, or one that `authsvc kek rotate` replaced: AUTHSVC_KEK "
    "must then be the new KEK and, during the roll, AUTHSVC_KEK_PREVIOUS the old one)"
)
CANNOT_DECRYPT = "AUTHSVC_KEK cannot decrypt the stored keys (wrong key-encryption key?)"


def wrapping_kek(repo: Repository, ring: KekRing) -> KeyEncryptionKey:
    """The KEK to wrap new data under: the database's, if held; the primary for a new database.

    Raises:
        ConfigError: the database wraps under a KEK this process does not hold (it was started
            before `authsvc kek rotate` with the old KEK only).
    """
    current = repo.fetch_wrapping_kek_id()
    if current is None:
        return ring.primary
    try:
        return ring.get(current)
    except UnknownKek:
        raise ConfigError(NOT_HELD) from None


def load_secret_hash_key(repo: Repository, ring: KekRing, now: datetime) -> bytes:
    """The secret-hash key, unwrapped; a new database gets 32 random bytes (first writer wins).

    Raises:
        ConfigError: not wrapped under a held KEK, or a held KEK fails to unwrap it.
    """
    record = repo.fetch_wrapped_key(SECRET_HASH_KEY)
    if record is None:
        kek = ring.primary
        blob = kek.wrap_named(os.urandom(_HASH_KEY_BYTES), name=SECRET_HASH_KEY)
        record = repo.create_wrapped_key(SECRET_HASH_KEY, kek.kek_id, blob, now)
    return _unwrap_named(ring, record)


def check_wrapped_keys(repo: Repository, ring: KekRing) -> None:
    """Refuse to start, naming the variables, when a stored private key is not wrapped under a
    held KEK (before any of them is needed, so a replica never half-starts)."""
    for record in repo.list_signing_keys():
        if record.private_key_enc is not None and record.kek_id is not None:
            if record.kek_id not in ring.kek_ids:
                raise ConfigError(NOT_HELD)


def _unwrap_named(ring: KekRing, record: WrappedKeyRecord) -> bytes:
    try:
        return ring.get(record.kek_id).unwrap_named(record.wrapped, name=record.name)
    except UnknownKek:
        raise ConfigError(NOT_HELD) from None
    except DecryptError:
        raise ConfigError(CANNOT_DECRYPT) from None


@dataclass(frozen=True)
class KekRotation:
    rewrapped: int
    kek_id: str


def rotate_kek(
    repo: Repository,
    ring: KekRing,
    new: KeyEncryptionKey,
    now: datetime,
    *,
    audit: Callable[[int], AuditEvent] | None = None,
) -> KekRotation:
    """Re-wrap every stored key under `new`, in one transaction (all or nothing).

    Items already under `new` are left as they are, so running it again after a crash, or
    after it succeeded, is safe. `ring` holds the KEKs the items are wrapped under now.
    `audit(rewrapped)` gives the audit row, written in that transaction.

    Raises:
        ConfigError: an item is wrapped under a KEK neither in `ring` nor `new`, or fails to
            unwrap (nothing is changed then).
    """
    sources = KekRing(new, *ring.keks)

    def signing(record: SigningKeyRecord) -> tuple[str, bytes] | None:
        if record.kek_id == new.kek_id or record.private_key_enc is None:
            return None
        try:
            plain = sources.unwrap(record.private_key_enc, kid=record.kid, kek_id=record.kek_id)
        except UnknownKek:
            raise ConfigError(NOT_HELD) from None
        except DecryptError:
            raise ConfigError(CANNOT_DECRYPT) from None
        return new.kek_id, new.wrap(plain, kid=record.kid)

    def named(record: WrappedKeyRecord) -> tuple[str, bytes] | None:
        if record.kek_id == new.kek_id:
            return None
        plain = _unwrap_named(sources, record)
        return new.kek_id, new.wrap_named(plain, name=record.name)

    rewrapped = repo.rewrap_keys(signing, named, now, audit=audit)
    return KekRotation(rewrapped=rewrapped, kek_id=new.kek_id)
