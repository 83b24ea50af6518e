"""Service secrets: rotation, by the service itself (with its current secret) or by an admin.

RotateServiceSecret and `authsvc services rotate-secret` both come here; the CLI is an admin
on this host (`Origin.local(CLI_ACTOR)`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from authsvc.clock import Clock, to_datetime
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from authsvc.inputs import check_grace_period, check_service_id
from authsvc.storage.repository import Repository
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.logins import CURRENT_ONLY, Login, SecretCredential
from authsvc.usecases.tokens import MAX_SECRET_LENGTH

__all__ = ["RotatedSecret", "Secrets"]

_ACTION = "rotate_secret"


@dataclass(frozen=True)
class RotatedSecret:
    """The new secret (shown once, stored only hashed) and when the previous one stops
    (None: it stopped at once)."""

    secret: str = field(repr=False)
    previous_until: datetime | None


class Secrets:
    def __init__(
        self,
        *,
        settings: Settings,
        repo: Repository,
        hasher: SecretHasher,
        clock: Clock,
        trail: AuditTrail,
        logins: LoginBatcher | None = None,
    ) -> None:
        """`logins`: the login batch that checks a current secret; without one (the CLI),
        only an admin may rotate."""
        self._s = settings
        self._repo = repo
        self._hasher = hasher
        self._clock = clock
        self._trail = trail
        self._logins = logins

    def check(self, service_id: str, grace_seconds: int, current_secret: str = "") -> None:
        """The request's input rules, before anyone is authenticated.

        Raises:
            InvalidArgument: a malformed id, a grace period out of bounds, a secret too long.
        """
        check_service_id(service_id)
        check_grace_period(grace_seconds, self._s.max_secret_grace_seconds)
        if len(current_secret) > MAX_SECRET_LENGTH:
            raise InvalidArgument("current_secret is too long")

    def rotate(
        self,
        service_id: str,
        grace_seconds: int,
        current_secret: str,
        origin: Origin,
        admin: Callable[[], Origin],
    ) -> RotatedSecret:
        """RotateServiceSecret: who may rotate. With a secret, the service rotates itself (its
        current secret only); without one, only an admin: `admin` resolves the call's admin
        token into its origin and is asked only then, so a self-rotation needs no bearer.

        Raises:
            InvalidArgument, Unauthenticated, PermissionDenied, ResourceExhausted, NotFound: as
                `rotate_by_self` and `rotate_by_admin`, and the admin check.
        """
        self.check(service_id, grace_seconds, current_secret)
        if current_secret:
            return self.rotate_by_self(service_id, current_secret, grace_seconds, origin)
        return self.rotate_by_admin(service_id, grace_seconds, admin())

    def rotate_by_admin(self, service_id: str, grace_seconds: int, admin: Origin) -> RotatedSecret:
        """An admin gives a service a new secret; the previous one works `grace_seconds` more.

        Raises:
            InvalidArgument: a malformed id, or a grace period out of bounds.
            NotFound: no such service (audited).
        """
        self.check(service_id, grace_seconds)
        if self._repo.fetch_service(service_id) is None:
            self._trail.record(
                admin, action=_ACTION, target=f"service:{service_id}", outcome="not_found"
            )
            raise NotFound("no such service")
        return self._rotate(service_id, grace_seconds, admin, expected=None)

    def rotate_by_self(
        self, service_id: str, current_secret: str, grace_seconds: int, origin: Origin
    ) -> RotatedSecret:
        """The service replaces its own secret; only its current secret may (a previous one in
        its grace period may only get tokens). Runs in a worker thread: it waits for the login
        batch.

        Raises:
            InvalidArgument: a malformed id or secret, or a grace period out of bounds.
            Unauthenticated, ResourceExhausted: as any login (authsvc.usecases.login_batch).
            PermissionDenied: a previous secret, or a rotation committed since this login.
        """
        self.check(service_id, grace_seconds, current_secret)
        if not current_secret:
            raise InvalidArgument("current_secret is required")
        if self._logins is None:
            raise PermissionDenied("rotating with the current secret needs the server")
        credential = SecretCredential.present(self._hasher, service_id, current_secret)
        self._logins.authenticate_sync(Login(credential, origin, _ACTION, current_only=True))
        return self._rotate(
            service_id, grace_seconds, origin.as_actor(service_id), expected=credential.digest
        )

    def _rotate(
        self, service_id: str, grace_seconds: int, origin: Origin, *, expected: bytes | None
    ) -> RotatedSecret:
        now = self._clock.now()
        secret = mint_secret()
        previous_until = to_datetime(now + grace_seconds) if grace_seconds > 0 else None
        target = f"service:{service_id}"
        # Written with the rotation, in its transaction: should the audit row fail, nothing
        # rotates, so the caller (who never sees the new secret) keeps one that works.
        event = self._trail.event(
            origin, action=_ACTION, target=target, detail=f"grace_seconds={grace_seconds}"
        )
        try:
            # `expected` (self-rotation): the hash the caller logged in with, re-checked in the
            # write's own transaction so that a rotation committed since that login wins.
            previous = self._repo.update_service_secret(
                service_id,
                self._hasher.hash(secret),
                to_datetime(now),
                previous_until,
                expected_current_hash=expected,
                audit=event,
            )
        except FailedPrecondition:
            # The presented secret is no longer the current one: the rule the login batch
            # applies, decided late.
            self._trail.record(
                origin, action=_ACTION, target=target, outcome="previous_secret_denied"
            )
            raise PermissionDenied(CURRENT_ONLY) from None
        self._trail.log(event)
        # What storage kept: no previous secret (and no grace to report) when there was no
        # current one to demote, as for a secretless service getting its first secret.
        kept = previous.expires_at if previous is not None else None
        return RotatedSecret(secret=secret, previous_until=kept)
