"""In-memory revocations, applied by cursor from WatchRevocations or storage, read lock-free."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from authsvc_client.v1 import auth_pb2

__all__ = ["RevocationEntry", "RevocationKind", "RevocationSet"]

# What an entry revokes. "service_disabled" is a service entry written when the service was
# disabled: its tokens are SERVICE_DISABLED rather than REVOKED, as authsvc itself says.
RevocationKind = Literal["token", "service_tokens", "service_disabled"]

_KIND_FROM_PROTO: dict[int, RevocationKind] = {
    auth_pb2.REVOCATION_KIND_TOKEN: "token",
    auth_pb2.REVOCATION_KIND_SERVICE_TOKENS: "service_tokens",
    auth_pb2.REVOCATION_KIND_SERVICE_DISABLED: "service_disabled",
}


@dataclass(frozen=True, slots=True)
class RevocationEntry:
    """One revocation event; times in epoch seconds.

    A jti entry revokes that one token. A service entry (service_id with revoked_before) revokes
    every token of that service with iat < revoked_before. expires_at is when the entry stops
    mattering because every token it covers has expired.
    """

    cursor: int
    jti: str | None
    service_id: str | None
    revoked_before: int | None
    expires_at: int
    kind: RevocationKind = "token"

    @classmethod
    def from_proto(cls, msg: auth_pb2.RevocationEvent) -> RevocationEntry:
        # An older server sends no kind: the target says which of the first two it is.
        kind = _KIND_FROM_PROTO.get(msg.kind, "service_tokens" if msg.service_id else "token")
        return cls(
            cursor=int(msg.cursor),
            jti=msg.jti or None,
            service_id=msg.service_id or None,
            revoked_before=(
                int(msg.revoked_before.seconds) if msg.HasField("revoked_before") else None
            ),
            expires_at=int(msg.expires_at.seconds),
            kind=kind,
        )


class RevocationSet:
    """Revoked jtis and per-service cutoffs.

    Writers (add, prune) serialise on a lock; is_revoked takes no lock: it does two dict
    lookups, each atomic, and values are replaced whole, never mutated in place.

    Memory is kept to one dict entry per jti (jti -> expires_at); entries are also filed in
    per-second expiry buckets so that prune touches only what has expired.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jtis: dict[str, int] = {}
        # service_id -> (revoked_before, expires_at)
        self._services: dict[str, tuple[int, int]] = {}
        # service_id -> (revoked_before, expires_at) of its "service_disabled" entries only
        self._disabled: dict[str, tuple[int, int]] = {}
        # expires_at second -> (that second, jtis filed under it); a jti may sit in several
        self._buckets: dict[int, tuple[int, list[str]]] = {}
        self._bucket_heap: list[int] = []
        self._cursor = 0
        # Moves on every add(), after the add has taken effect: a verdict computed while it
        # read N may be reused only while it still reads N (TokenVerifier's verdict memo).
        # prune() leaves it alone: it drops only what covers tokens already expired, which no
        # reused verdict can be about (a verdict is reused only before its token's exp).
        self.version = 0
        # Called with each newly revoked jti, under the lock (TokenVerifier drops it from its
        # cache); a callback must be quick and must not call back into this set.
        self._jti_watchers: list[Callable[[str], None]] = []

    @property
    def cursor(self) -> int:
        """The highest cursor applied so far (0 before any)."""
        return self._cursor

    def __len__(self) -> int:
        return len(self._jtis) + len(self._services)

    def __repr__(self) -> str:
        return (
            f"RevocationSet(jtis={len(self._jtis)}, services={len(self._services)}, "
            f"cursor={self._cursor})"
        )

    def watch_jtis(self, callback: Callable[[str], None]) -> None:
        """Call `callback(jti)` for every jti revoked from now on."""
        with self._lock:
            self._jti_watchers.append(callback)

    def add(self, entry: RevocationEntry) -> None:
        """Apply one entry; applying it again (a replayed event) changes nothing."""
        with self._lock:
            self._add(entry)

    def add_all(self, entries: Iterable[RevocationEntry]) -> None:
        """add() for many entries under one lock (a replica loading what storage holds)."""
        with self._lock:
            for entry in entries:
                self._add(entry)

    def _add(self, entry: RevocationEntry) -> None:
        """Callers hold the lock."""
        if entry.jti is not None:
            current = self._jtis.get(entry.jti)
            if current is None or entry.expires_at > current:
                bucket = self._buckets.get(entry.expires_at)
                if bucket is None:
                    bucket = self._buckets[entry.expires_at] = (entry.expires_at, [])
                    heapq.heappush(self._bucket_heap, entry.expires_at)
                bucket[1].append(entry.jti)
                # Share the bucket's int object: one per second instead of one per jti.
                self._jtis[entry.jti] = bucket[0]
                if current is None:
                    for watcher in self._jti_watchers:
                        watcher(entry.jti)
        if entry.service_id is not None and entry.revoked_before is not None:
            _merge_cutoff(self._services, entry.service_id, entry.revoked_before, entry.expires_at)
            if entry.kind == "service_disabled":
                _merge_cutoff(
                    self._disabled, entry.service_id, entry.revoked_before, entry.expires_at
                )
        if entry.cursor > self._cursor:
            self._cursor = entry.cursor
        self.version += 1

    def is_revoked(self, jti: str, subject: str, issued_at: int) -> bool:
        """True when this jti is revoked, or every token of `subject` issued before a cutoff
        later than issued_at is."""
        if jti in self._jtis:
            return True
        service = self._services.get(subject)
        return service is not None and issued_at < service[0]

    def revoked_link(
        self, parents: Iterable[str], actors: Iterable[str], issued_at: int
    ) -> str | None:
        """What revokes a delegated token issued at `issued_at` through its chain: "" when a
        token it was exchanged from (`parents`, by jti) is revoked, else the id of the first
        actor service whose tokens issued then are revoked; None when no link is.

        The one statement of that rule (DESIGN: revoking the subject token's service revokes
        what was derived from it): the verifier and the remote validator's cache both ask it.
        """
        jtis = self._jtis
        for parent in parents:
            if parent in jtis:
                return ""
        for actor in actors:
            if self.is_revoked("", actor, issued_at):
                return actor
        return None

    def is_disabled(self, subject: str, issued_at: int) -> bool:
        """True when a token of `subject` issued at `issued_at` is revoked because its service
        was disabled (the reason is then SERVICE_DISABLED, not REVOKED)."""
        disabled = self._disabled.get(subject)
        return disabled is not None and issued_at < disabled[0]

    def prune(self, now: float) -> int:
        """Drop entries with expires_at <= now; returns how many were dropped."""
        dropped = 0
        with self._lock:
            heap = self._bucket_heap
            while heap and heap[0] <= now:
                second = heapq.heappop(heap)
                for jti in self._buckets.pop(second)[1]:
                    # A jti re-added with a later expiry also sits in a later bucket.
                    expires = self._jtis.get(jti)
                    if expires is not None and expires <= now:
                        del self._jtis[jti]
                        dropped += 1
            expired = [sid for sid, (_, exp) in self._services.items() if exp <= now]
            for sid in expired:
                del self._services[sid]
            dropped += len(expired)
            for sid in [sid for sid, (_, exp) in self._disabled.items() if exp <= now]:
                del self._disabled[sid]
        return dropped


def _merge_cutoff(
    into: dict[str, tuple[int, int]], service_id: str, revoked_before: int, expires_at: int
) -> None:
    """Callers hold the lock. A later cutoff covers every token an earlier one did."""
    current = into.get(service_id)
    if current is not None:
        revoked_before = max(current[0], revoked_before)
        expires_at = max(current[1], expires_at)
    into[service_id] = (revoked_before, expires_at)
