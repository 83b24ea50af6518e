"""In-memory state of one replica, kept in sync with storage by cursor (SPIRE's event tables).

The validation hot path reads only this: the key ring, the revocation set and the set of disabled
services. `refresh()` pulls what changed since the last cursors; the server runs it every
`sync_interval_seconds` (and at once after a write on this replica), so a change made through
any replica is seen by every replica within one interval plus one query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.crypto.kek import UnknownKek
from authsvc.errors import ConfigError
from authsvc.keys.jwks import render_jwks
from authsvc.keys.manager import KeyManager
from authsvc.keys.wrapping import NOT_HELD
from authsvc.storage.records import RevocationRecord, SigningKeyRecord
from authsvc.storage.repository import Repository
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet

log = logging.getLogger("authsvc.sync")

_PAGE = 10_000


@dataclass(frozen=True)
class Signer:
    """The active key, unwrapped once per key change rather than once per token."""

    kid: str
    private_key: rsa.RSAPrivateKey

    def __repr__(self) -> str:
        return f"Signer(kid={self.kid!r})"


def revocation_entry(record: RevocationRecord) -> RevocationEntry:
    return RevocationEntry(
        cursor=record.cursor,
        jti=record.jti,
        service_id=record.service_id,
        revoked_before=(
            int(to_timestamp(record.revoked_before)) if record.revoked_before is not None else None
        ),
        expires_at=int(to_timestamp(record.expires_at)),
    )


class RevocationFeed:
    """Recent revocations for WatchRevocations streams, owned by the event loop.

    Streams whose cursor is older than what the buffer holds replay from storage first.
    """

    def __init__(self, start_cursor: int, capacity: int = 10_000) -> None:
        self._events: deque[RevocationRecord] = deque()
        self._capacity = capacity
        # Every revocation with a cursor <= this is in storage and not in the buffer.
        self.horizon = start_cursor
        self._changed = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        """Wake every stream so it can end (server shutdown)."""
        self.closed = True
        self._changed.set()

    def publish(self, records: list[RevocationRecord]) -> None:
        for record in records:
            self._events.append(record)
            while len(self._events) > self._capacity:
                self.horizon = self._events.popleft().cursor
        if records:
            self._changed.set()
            self._changed = asyncio.Event()

    def since(self, cursor: int) -> list[RevocationRecord] | None:
        """Events after `cursor`, or None when some of them are only in storage."""
        if cursor < self.horizon:
            return None
        return [e for e in self._events if e.cursor > cursor]

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


class ServerState:
    """What this replica knows. Attributes the hot path reads are swapped whole, never mutated."""

    def __init__(
        self,
        repo: Repository,
        manager: KeyManager,
        clock: Clock,
        *,
        revocations_kept_seconds: float = 0.0,
        earliest: Callable[[], float] | None = None,
    ) -> None:
        """`revocations_kept_seconds`: how long after its token's `exp` a revocation is kept;
        `earliest`: the clock that decides what to drop (authsvc.clock.WallClock.earliest_now).
        Both so that a wrong forward jump of the clock, once corrected, finds every revocation
        whose token can validate again (authsvc.clock)."""
        self._repo = repo
        self._manager = manager
        self._clock = clock
        self._revocations_kept = revocations_kept_seconds
        self._earliest = earliest or clock.now
        # Retired keys whose publication this replica has seen end: never published again,
        # whatever the clock says later.
        self._unpublished: set[str] = set()
        self._lock = threading.Lock()
        self.revocations = RevocationSet()
        self.keyring = KeyRing({})
        self.jwks_json = render_jwks([])
        self.signer: Signer | None = None
        self.disabled: frozenset[str] = frozenset()
        self._next_key_expiry: float | None = None
        self._change_cursor = 0
        self._revocation_cursor = 0
        self.last_sync_at: float | None = None
        # Called (from the refreshing thread) with each batch of new revocations.
        self.on_revocations: Callable[[list[RevocationRecord]], None] | None = None

    @property
    def revocation_cursor(self) -> int:
        return self._revocation_cursor

    def revocation_horizon(self) -> float:
        """Revocations whose token expired before this are no longer needed (storage included)."""
        return self._earliest() - self._revocations_kept

    def is_subject_enabled(self, subject: str) -> bool:
        return subject not in self.disabled

    def load(self) -> None:
        """Full load before the server reports SERVING. Raises DecryptError on a wrong KEK."""
        with self._lock:
            # Read the cursor first: changes made while we load are applied again (idempotent).
            self._change_cursor = self._repo.fetch_latest_change_cursor()
            self._reload_keys()
            self._reload_disabled()
            self._load_revocations()
            self.last_sync_at = self._clock.now()

    def refresh(self) -> list[RevocationRecord]:
        """Apply what changed in storage since the last call; returns the new revocations."""
        with self._lock:
            kinds: set[str] = set()
            while True:
                changes = self._repo.list_changes(self._change_cursor)
                if not changes:
                    break
                kinds.update(c.kind for c in changes)
                self._change_cursor = changes[-1].cursor
            now = self._clock.now()
            if "key" in kinds or (
                self._next_key_expiry is not None and now >= self._next_key_expiry
            ):
                self._reload_keys()
            if "service" in kinds:
                self._reload_disabled()
            new = self._pull_revocations()
            self.revocations.prune(self.revocation_horizon())
            self.last_sync_at = now
        return new

    def _load_revocations(self) -> None:
        """Every revocation in force, before SERVING. Nothing is published (no stream can be
        open yet) or kept: a million revocations load page by page, as the few fields held."""
        now = to_datetime(self.revocation_horizon())
        while True:
            page = self._repo.list_held_revocations(self._revocation_cursor, now, _PAGE)
            self.revocations.add_all(RevocationEntry(*held) for held in page)
            if page:
                self._revocation_cursor = page[-1].cursor
            if len(page) < _PAGE:
                break

    def _pull_revocations(self) -> list[RevocationRecord]:
        """Revocations made since the last pull: applied, published to streams, returned."""
        new: list[RevocationRecord] = []
        now = to_datetime(self.revocation_horizon())
        while True:
            page = self._repo.list_revocations(self._revocation_cursor, now, _PAGE)
            for record in page:
                self.revocations.add(revocation_entry(record))
            if page:
                self._revocation_cursor = page[-1].cursor
                new.extend(page)
            if len(page) < _PAGE:
                break
        if new and self.on_revocations is not None:
            self.on_revocations(new)
        return new

    def _reload_disabled(self) -> None:
        self.disabled = frozenset(self._repo.list_disabled_service_ids())

    def _reload_keys(self) -> None:
        now = self._clock.now()
        records = self._repo.list_signing_keys()
        self._unpublished &= {r.kid for r in records}
        published: list[SigningKeyRecord] = []
        next_expiry: float | None = None
        for r in records:
            if r.state in ("active", "next"):
                published.append(r)
            elif (
                r.state == "retired"
                and r.publish_until is not None
                and r.kid not in self._unpublished
            ):
                until = to_timestamp(r.publish_until)
                if until > now:
                    published.append(r)
                    next_expiry = until if next_expiry is None else min(next_expiry, until)
                else:
                    self._unpublished.add(r.kid)
        jwks = [json.loads(r.public_jwk) for r in published]
        active = next((r for r in records if r.state == "active"), None)
        signer = self.signer
        if active is None:
            signer = None
        elif signer is None or signer.kid != active.kid:
            try:
                private = self._manager.private_key(active)
            except UnknownKek:
                # A replica left on the old KEK after `authsvc kek rotate`: say what to fix.
                raise ConfigError(NOT_HELD) from None
            signer = Signer(kid=active.kid, private_key=private)
        self.jwks_json = render_jwks(jwks)
        self.keyring = KeyRing.from_jwks_json(self.jwks_json)
        self.signer = signer
        self._next_key_expiry = next_expiry
