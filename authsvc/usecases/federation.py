"""The trusted external issuers as this replica holds them, for ExchangeToken.

Trusts live in storage (`authsvc trust add`), so every replica trusts the same issuers; a
change is a 'trust' change, and each replica rebuilds its verifier from storage at the next
sync (within one sync interval, as for services and keys). Keys from a `--jwks-file` are stored
with the trust; keys from a `--jwks-url` are fetched by each replica (`JwksCache`: HTTPS only,
loopback excepted; bounded time and size; no redirects; only RS256/ES256 keys kept, and the
last good keys kept when a refresh fails or brings none of those), refreshed by the
maintenance loop and early when a token names an unknown `kid`. A cache survives a reload
when its trust's name and URL are unchanged, so a trust change elsewhere does not drop good
keys here.
"""

from __future__ import annotations

import logging
import threading

from authsvc.clock import Clock
from authsvc.config import Settings
from authsvc.errors import InvalidArgument
from authsvc.storage.records import TrustRecord
from authsvc.storage.repository import Repository
from authsvc.workload.federation import (
    FederatedIdentity,
    FederationVerifier,
    KeySource,
    TrustedIssuer,
    parse_jwks_document,
    usable_for_federation,
)
from authsvc.workload.jwks_fetch import FetchPolicy, JwksCache

__all__ = ["TrustStore"]

log = logging.getLogger("authsvc.server")


class TrustStore:
    """The verifier of federated workload tokens over the trusts in storage."""

    def __init__(self, repo: Repository, clock: Clock, settings: Settings) -> None:
        self._repo = repo
        self._clock = clock
        self._policy = FetchPolicy(
            timeout=settings.jwks_fetch_timeout_seconds,
            refresh_interval=settings.jwks_refresh_seconds,
            ca_file=settings.jwks_fetch_ca,
        )
        self._leeway = settings.leeway_seconds
        self._lock = threading.Lock()
        self._caches: dict[tuple[str, str], JwksCache] = {}
        self._verifier = FederationVerifier((), leeway=self._leeway)

    def reload(self) -> None:
        """Rebuild from storage (at start, and on a 'trust' change). A stored trust that no
        longer parses is skipped with a warning naming it, so one bad row cannot take every
        other trust down."""
        records = self._repo.list_trusts()
        with self._lock:
            trusts: list[TrustedIssuer] = []
            caches: dict[tuple[str, str], JwksCache] = {}
            for record in records:
                try:
                    keys = self._keys(record, caches)
                    trusts.append(
                        TrustedIssuer(
                            name=record.name,
                            issuer=record.issuer,
                            audience=record.audience,
                            keys=keys,
                            max_lifetime=record.max_lifetime_seconds,
                        )
                    )
                except InvalidArgument as exc:
                    log.warning("trust %r skipped: %s", record.name, exc)
            try:
                verifier = FederationVerifier(trusts, leeway=self._leeway)
            except InvalidArgument as exc:  # storage forbids it; never trust half a config
                log.warning("trusted issuers not reloaded: %s", exc)
                return
            self._caches = caches
            self._verifier = verifier

    def _keys(self, record: TrustRecord, caches: dict[tuple[str, str], JwksCache]) -> KeySource:
        if record.jwks_url is None:
            return parse_jwks_document(record.jwks_json or "", f"trust {record.name!r} keys")
        key = (record.name, record.jwks_url)
        cache = self._caches.get(key) or JwksCache(
            record.jwks_url,
            clock=self._clock,
            policy=self._policy,
            name=record.name,
            usable=usable_for_federation,
        )
        caches[key] = cache
        return cache

    def verify(self, token: str, *, now: float) -> FederatedIdentity:
        """Verify a federated token (may fetch its issuer's keys once, bounded: call it off
        the event loop). Raises WorkloadAuthError with the reason."""
        return self._verifier.verify(token, now=now)

    def refresh_due(self) -> int:
        """Refresh every URL's keys whose time has come (the maintenance loop); returns how
        many refreshed. A failure keeps the last good keys (JwksCache logs it)."""
        with self._lock:
            caches = list(self._caches.values())
        return sum(1 for cache in caches if cache.refresh_if_due())

    @property
    def trust_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._verifier.trusts)
