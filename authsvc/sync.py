"""In-memory state of one replica, kept in sync with storage by cursor (SPIRE's event tables).

The validation hot path reads only this: the key ring, the revocation set and the set of disabled
services. `refresh()` pulls what changed since the last cursors; the server runs it every
`sync_interval_seconds` (and at once after a write on this replica), so a change made through
any replica is seen by every replica within one interval plus one query.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.crypto.kek import UnknownKek
from authsvc.errors import ConfigError, ResourceExhausted
from authsvc.keys.jwks import render_jwks
from authsvc.keys.manager import KeyManager
from authsvc.keys.wrapping import NOT_HELD
from authsvc.storage.records import HeldRevocation, RevocationRecord, SigningKeyRecord
from authsvc.storage.repository import Repository
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.v1 import auth_pb2

_PAGE = 10_000
# Streams a publish wakes per turn of the event loop: calls that arrive during a fan-out to
# thousands of streams wait for one batch, not for all of them.
_WAKE_BATCH = 64


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
        kind=record.kind,
    )


_EVENT_KIND = {
    "token": auth_pb2.REVOCATION_KIND_TOKEN,
    "service_tokens": auth_pb2.REVOCATION_KIND_SERVICE_TOKENS,
    "service_disabled": auth_pb2.REVOCATION_KIND_SERVICE_DISABLED,
}


def held_event(held: HeldRevocation) -> auth_pb2.RevocationEvent:
    """The WatchRevocations message for a revocation as storage lists it for a replay."""
    event = auth_pb2.RevocationEvent(
        cursor=held.cursor,
        jti=held.jti or "",
        service_id=held.service_id or "",
        expires_at=Timestamp(seconds=held.expires_at),
        kind=_EVENT_KIND[held.kind],
    )
    if held.revoked_before is not None:
        event.revoked_before.seconds = held.revoked_before
    return event


def revocation_event(record: RevocationRecord) -> auth_pb2.RevocationEvent:
    """The WatchRevocations message for a new revocation; whole seconds, as a replay sends."""
    entry = revocation_entry(record)
    return held_event(
        HeldRevocation(
            entry.cursor,
            entry.jti,
            entry.service_id,
            entry.revoked_before,
            entry.expires_at,
            entry.kind,
        )
    )


class RevocationFeed:
    """Recent revocations for WatchRevocations streams: one shared log, owned by the event loop.

    A stream holds a position in the log (a sequence number), so a new event costs each stream
    one slice of what it has not sent, never a scan; the message is built once, at publish,
    not once per stream. Streams whose cursor is older than the log replay from storage first.
    The feed also counts open streams, per peer and in total, since each one is woken by every
    revocation.
    """

    def __init__(
        self,
        start_cursor: int,
        capacity: int = 10_000,
        *,
        streams_per_peer: int = 8,
        streams_max: int = 1000,
    ) -> None:
        self._log: list[auth_pb2.RevocationEvent] = []
        # Sequence number of self._log[0]: positions stay valid as the head is trimmed.
        self._first = 0
        self._capacity = capacity
        # Every revocation with a cursor <= this is in storage and not in the log.
        self.horizon = start_cursor
        # Streams waiting for the next publish (dict: insertion order, O(1) removal).
        self._waiters: dict[asyncio.Future[None], None] = {}
        self.closed = False
        self._streams_per_peer = streams_per_peer
        self._streams_max = streams_max
        self._streams: dict[str, int] = {}
        self.open_streams = 0

    def close(self) -> None:
        """Wake every stream so it can end (server shutdown)."""
        self.closed = True
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def acquire(self, peer: str) -> None:
        """Take one stream slot for `peer`; release() gives it back.

        Raises:
            ResourceExhausted: the peer or the server already has as many streams as allowed.
        """
        held = self._streams.get(peer, 0)
        if held >= self._streams_per_peer:
            raise ResourceExhausted(
                f"too many WatchRevocations streams from this peer (limit "
                f"{self._streams_per_peer})",
                retry_after=30,
            )
        if self.open_streams >= self._streams_max:
            raise ResourceExhausted(
                f"too many WatchRevocations streams (limit {self._streams_max})", retry_after=30
            )
        self._streams[peer] = held + 1
        self.open_streams += 1

    def release(self, peer: str) -> None:
        self.open_streams -= 1
        left = self._streams[peer] - 1
        if left:
            self._streams[peer] = left
        else:
            del self._streams[peer]

    @property
    def end(self) -> int:
        """The position the next published event will take."""
        return self._first + len(self._log)

    def publish(self, records: list[RevocationRecord]) -> None:
        self._log.extend(revocation_event(record) for record in records)
        # Trim in chunks so the head is cut (a list copy) once per capacity/2 events, not per
        # event: at most 1.5 x capacity are held.
        excess = len(self._log) - self._capacity
        if excess > self._capacity // 2:
            self.horizon = self._log[excess - 1].cursor
            del self._log[:excess]
            self._first += excess
        if records and self._waiters:
            waiters, self._waiters = list(self._waiters), {}
            self._wake(waiters, 0)

    def _wake(self, waiters: list[asyncio.Future[None]], start: int) -> None:
        """Wake one batch, and the next on the following turn of the loop (behind whatever
        arrived meanwhile, such as a ValidateToken call)."""
        for waiter in waiters[start : start + _WAKE_BATCH]:
            if not waiter.done():
                waiter.set_result(None)
        start += _WAKE_BATCH
        if start < len(waiters):
            asyncio.get_running_loop().call_soon(self._wake, waiters, start)

    def position(self, cursor: int) -> int | None:
        """The position of the first event after `cursor`, or None when some events after it
        are only in storage."""
        if cursor < self.horizon:
            return None
        return self._first + bisect.bisect_right(self._log, cursor, key=_cursor_of)

    def read(self, position: int, limit: int) -> list[auth_pb2.RevocationEvent] | None:
        """Up to `limit` events from `position` on, or None when the log was trimmed past it
        (the stream then replays from storage)."""
        if position < self._first:
            return None
        start = position - self._first
        return self._log[start : start + limit]

    async def wait(self, timeout: float) -> None:
        """Until the next publish (or close), at most `timeout` seconds."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters[waiter] = None
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.pop(waiter, None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _cursor_of(event: auth_pb2.RevocationEvent) -> int:
    return int(event.cursor)


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
        # Change kinds read from storage whose reload has not succeeded yet (refresh).
        self._pending: set[str] = set()
        self._revocation_cursor = 0
        self.last_sync_at: float | None = None
        # Called (from the refreshing thread) with each batch of new revocations.
        self.on_revocations: Callable[[list[RevocationRecord]], None] | None = None
        # Called (from the refreshing thread) when trusted issuers changed in storage.
        self.on_trusts_changed: Callable[[], None] | None = None

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
        """Apply what changed in storage since the last call; returns the new revocations.

        Revocations come first and never wait on a reload: a reload that keeps failing (a key
        this replica's KEK cannot unwrap, after `authsvc kek rotate` on another host) must not
        leave revoked tokens valid here. A failed reload stays pending and is tried again at
        every refresh, however many changes came since, and its error is raised after the
        revocations are in (the sync loop logs it; `last_sync_at` stays put, so /readyz says
        this replica is behind).
        """
        with self._lock:
            cursor = self._change_cursor
            while True:
                changes = self._repo.list_changes(cursor)
                if not changes:
                    break
                self._pending.update(c.kind for c in changes)
                cursor = changes[-1].cursor
            # What was read is now pending, so the cursor may move whatever happens next.
            self._change_cursor = cursor
            now = self._clock.now()
            new = self._pull_revocations()
            self.revocations.prune(self.revocation_horizon())
            if self._next_key_expiry is not None and now >= self._next_key_expiry:
                self._pending.add("key")
            if "key" in self._pending:
                self._reload_keys()
                self._pending.discard("key")
            if "service" in self._pending:
                self._reload_disabled()
                self._pending.discard("service")
            if "trust" in self._pending:
                if self.on_trusts_changed is not None:
                    self.on_trusts_changed()
                self._pending.discard("trust")
            self._pending.clear()  # kinds nothing here reloads
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
