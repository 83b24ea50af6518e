"""Revocation: of a presented token (RFC 7009), of a jti, of every token of a service.

The whole-second cut-off rule for a service's tokens lives here (`revoke_service_tokens`), for
RevokeToken by service and for disabling a service alike.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Literal

from authsvc.clock import Clock, to_datetime
from authsvc.config import Settings
from authsvc.errors import InvalidArgument, NotFound
from authsvc.inputs import check_name, check_service_id
from authsvc.storage.records import RevocationKind
from authsvc.storage.repository import AuditEvent, Repository
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.callers import Callers
from authsvc.usecases.tokens import check_token_size
from authsvc_client.unverified import unverified_audience
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import TokenVerifier

__all__ = [
    "MAX_REASON_LENGTH",
    "Revocations",
    "RevokeTarget",
    "revoke_service_tokens",
    "service_cutoff",
]

# What a RevokeToken names (its `target` oneof).
RevokeTarget = Literal["token", "jti", "service_id"]

MAX_REASON_LENGTH = 256


def service_cutoff(now: float) -> int:
    """The `revoked_before` of a revocation of a service's tokens made at `now`.

    `iat` has whole-second resolution, so a cutoff inside a second could not tell a token
    issued just before the call from one issued just after. The cutoff is therefore the next
    whole second: every token issued until then has iat < cutoff (revoked). A caller that must
    also let tokens issued after it returns live waits until the cutoff has begun
    (`Revocations.revoke_service`); disabling a service need not, since a disabled service
    gets no new token.
    """
    return math.floor(now) + 1


def revoke_service_tokens(
    repo: Repository,
    service_id: str,
    *,
    now: float,
    token_lifetime_seconds: int,
    reason: str,
    kind: RevocationKind | None = None,
    audit: AuditEvent | None = None,
) -> int:
    """Record the revocation of every token of `service_id` issued before the cutoff, kept as
    long as any of them could still validate; returns the cutoff (epoch seconds).

    `kind`: None for a plain revocation ("service_tokens"), "service_disabled" when a disable
    causes it. `token_lifetime_seconds`: the longest a token lives, leeway included. `audit`:
    the revocation's audit row, written in its transaction.
    """
    cutoff = service_cutoff(now)
    repo.create_revocation(
        jti=None,
        service_id=service_id,
        revoked_before=to_datetime(cutoff),
        expires_at=to_datetime(cutoff + token_lifetime_seconds),
        reason=reason,
        now=to_datetime(now),
        kind=kind,
        audit=audit,
    )
    return cutoff


class Revocations:
    def __init__(
        self,
        *,
        settings: Settings,
        repo: Repository,
        verifier: TokenVerifier,
        clock: Clock,
        trail: AuditTrail,
        callers: Callers,
    ) -> None:
        self._s = settings
        self._repo = repo
        self._verifier = verifier
        self._clock = clock
        self._trail = trail
        self._callers = callers

    async def revoke(
        self,
        target: RevokeTarget | None,
        value: str,
        reason: str,
        bearer: Callable[[], str | None],
        origin: Origin,
        thumbprint: str = "",
    ) -> bool:
        """RevokeToken: who may revoke what. Whoever holds a token may revoke it (no caller
        identity needed, RFC 7009); a jti or a whole service only an admin. `bearer` reads the
        call's bearer token, and only for those: a revocation by token ignores the header.

        Raises:
            InvalidArgument: no target, or a malformed one.
            Unauthenticated, PermissionDenied: a jti or service target without an admin token.
            NotFound: no such service.
        """
        if target is None:
            raise InvalidArgument("one of token, jti or service_id is required")
        if target == "token":
            return await self.revoke_presented(value, reason, origin, thumbprint)
        admin = origin.as_actor(self._callers.admin(bearer(), thumbprint).subject)
        if target == "jti":
            return await self.revoke_jti(value, reason, admin)
        return await self.revoke_service(value, reason, admin)

    @property
    def _token_lifetime(self) -> int:
        return self._s.max_ttl_seconds + self._s.leeway_seconds

    async def revoke_presented(
        self, token: str, reason: str, origin: Origin, thumbprint: str = ""
    ) -> bool:
        """RFC 7009: whoever holds a token may revoke it, audited as its subject. A token this
        server would not accept revokes nothing (False); one already revoked is True.

        A certificate-bound token is held only with its certificate (RFC 8705 section 3), so it
        is checked against the call's (`thumbprint`): the workload revokes its own bound token
        over its mTLS connection, a thief replaying it from another certificate revokes nothing.

        Raises:
            InvalidArgument: an empty token, or one over the size limit.
        """
        check_token_size(token, self._s.max_token_bytes)
        audience = unverified_audience(token)
        if audience is None:
            return False
        # On the caller's thread (the event loop), like every other verify.
        result = self._verifier.verify(
            token, audience=audience, client_cert_thumbprint=thumbprint or None
        )
        if result.reason == auth_pb2.REVOKED:
            return True
        if result.claims is None:
            return False
        claims = result.claims
        await asyncio.to_thread(
            self._revoke_jti,
            claims.jti,
            claims.expires_at,
            reason,
            origin.as_actor(claims.subject),
        )
        return True

    async def revoke_jti(self, jti: str, reason: str, origin: Origin) -> bool:
        """An admin's revocation of one token by its jti, whether or not it was ever seen.

        Raises:
            InvalidArgument: an empty or malformed jti.
        """
        check_name(jti, "jti")
        return await asyncio.to_thread(self._revoke_jti, jti, None, reason, origin)

    def _revoke_jti(
        self, jti: str, expires_at: int | None, reason: str, origin: Origin
    ) -> bool:
        now = self._clock.now()
        if expires_at is None:
            # Unknown token: keep the revocation as long as any token could live.
            expires_at = math.ceil(now) + self._s.max_ttl_seconds
        # Written with the revocation, in its transaction: should the audit row fail, nothing
        # is revoked and the caller is told so, instead of an error for a revocation in force.
        event = self._trail.event(origin, action="revoke_token", target=f"jti:{jti}")
        self._repo.create_revocation(
            jti=jti,
            service_id=None,
            revoked_before=None,
            expires_at=to_datetime(expires_at + self._s.leeway_seconds),
            reason=reason[:MAX_REASON_LENGTH],
            now=to_datetime(now),
            audit=event,
        )
        self._trail.log(event)
        return True

    async def revoke_service(self, service_id: str, reason: str, origin: Origin) -> bool:
        """Revoke every token of a service issued until this call returns: it returns only
        once the cutoff second has begun, so every token issued after it is live.

        Raises:
            InvalidArgument: a malformed service id.
            NotFound: no such service.
        """
        check_service_id(service_id)

        def write() -> int:
            if self._repo.fetch_service(service_id) is None:
                raise NotFound("no such service")
            # Written with the revocation, in its transaction (as for a jti).
            event = self._trail.event(
                origin, action="revoke_service_tokens", target=f"service:{service_id}"
            )
            cutoff = revoke_service_tokens(
                self._repo,
                service_id,
                now=self._clock.now(),
                token_lifetime_seconds=self._token_lifetime,
                reason=reason[:MAX_REASON_LENGTH],
                audit=event,
            )
            self._trail.log(event)
            return cutoff

        cutoff = await asyncio.to_thread(write)
        remaining = cutoff - self._clock.now()
        if remaining > 0:
            await asyncio.to_thread(self._clock.sleep, remaining)
        return True
