"""KEK rotation (`authsvc kek rotate`): every stored key re-wrapped under a new KEK, audited.

The re-wrap itself is `authsvc.keys.wrapping.rotate_kek` (one transaction, all or nothing);
this is the use case around it, so the audit row is written by the same rule whoever runs it:
in that transaction, so a failed audit write re-wraps nothing and the servers' KEK stays the
one the database is wrapped under.
"""

from __future__ import annotations

from authsvc.clock import Clock, to_datetime
from authsvc.crypto.kek import KekRing, KeyEncryptionKey
from authsvc.keys.wrapping import KekRotation, rotate_kek
from authsvc.storage.repository import Repository
from authsvc.usecases.audit import AuditTrail, Origin

__all__ = ["rotate_kek_audited"]


def rotate_kek_audited(
    repo: Repository,
    ring: KekRing,
    new: KeyEncryptionKey,
    clock: Clock,
    trail: AuditTrail,
    origin: Origin,
) -> KekRotation:
    """Re-wrap every stored key under `new` and audit it: `already_rotated` when nothing was
    left to re-wrap, so a second run after a crash or a success reads as what it was.

    Raises:
        ConfigError: see `rotate_kek` (nothing is changed, nothing is audited).
    """
    # Built inside the re-wrap's one transaction, from what it re-wrapped, and written there:
    # the re-wrap and its row commit together. A run with nothing left to re-wrap changes
    # nothing and writes its `already_rotated` row there too.
    audit = trail.counted(
        lambda rewrapped: trail.event(
            origin,
            action="rotate_kek",
            target=f"kek:{new.kek_id}",
            outcome="ok" if rewrapped else "already_rotated",
            detail=f"rewrapped={rewrapped}",
        )
    )
    result = rotate_kek(repo, ring, new, to_datetime(clock.now()), audit=audit)
    audit.log()
    return result
