"""AuthService over grpc.aio: proto <-> domain translation; errors become status in one place.

Validation runs inline on the event loop (pure CPU, no I/O). Anything touching the database or
signing runs in worker threads so that open WatchRevocations streams and slow queries never
starve other calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import (
    AuthsvcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from authsvc.inputs import (
    check_audiences,
    check_grace_period,
    check_name,
    check_new_service_id,
    check_scopes,
    check_service_id,
)
from authsvc.logs import current_request_id, request_id_from
from authsvc.server.ledger import CURRENT_ONLY, Grant, Login, LoginLedger
from authsvc.server.status import status_of, trailers_of
from authsvc.services import disable_service, register_service, rotate_service_secret
from authsvc.storage.records import ServiceRecord, SigningKeyRecord
from authsvc.storage.repository import Repository
from authsvc.sync import RevocationFeed, ServerState, Signer, held_event
from authsvc.tokens.issuer import IssuedToken, TokenIssuer
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.signing_keys import SigningKeys
from authsvc_client.claims import ADMIN_SCOPE, Claims, ValidationResult
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.verifier import TokenVerifier

log = logging.getLogger("authsvc.server")

# A replay reads storage this many revocations at a time, in a worker thread; a live stream
# sends at most _WATCH_BATCH events before it lets other calls run.
_WATCH_PAGE = 1000
_WATCH_BATCH = 100
_STREAM_MALFORMED = ValidationResult.fail(auth_pb2.MALFORMED)

T = TypeVar("T")


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1_000_000_000))
    return ts


def _peer_address(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The peer without its port, so one host's connections count as one peer."""
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> list[str]:
    return [str(v) for k, v in (context.invocation_metadata() or ()) if k == key]


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The id the RPC interceptor gave this call, so audit rows and log lines agree."""
    return current_request_id() or request_id_from(context.invocation_metadata())


def _service_proto(record: ServiceRecord) -> auth_pb2.Service:
    return auth_pb2.Service(
        service_id=record.service_id,
        audiences=list(record.audiences),
        scopes=list(record.scopes),
        disabled=record.disabled,
        created_at=timestamp(to_timestamp(record.created_at)),
    )


def _key_proto(record: SigningKeyRecord) -> auth_pb2.SigningKey:
    msg = auth_pb2.SigningKey(
        key_id=record.kid, state=record.state, created_at=timestamp(to_timestamp(record.created_at))
    )
    if record.activated_at is not None:
        msg.activated_at.CopyFrom(timestamp(to_timestamp(record.activated_at)))
    if record.retired_at is not None:
        msg.retired_at.CopyFrom(timestamp(to_timestamp(record.retired_at)))
    if record.publish_until is not None:
        msg.publish_until.CopyFrom(timestamp(to_timestamp(record.publish_until)))
    return msg


def unverified_audience(token: str) -> str | None:
    """Read `aud` without trusting it, only to choose what to verify the token against."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    aud = payload.get("aud") if isinstance(payload, dict) else None
    return aud if isinstance(aud, str) and aud else None


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: AuthsvcError) -> None:
    """End the call with the error's status, message and trailers (`status.py`'s table)."""
    trailers = trailers_of(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(status_of(exc), str(exc))


def handle_errors(
    method: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    """Turn domain errors into status codes: the only place that does."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await method(self, request, context)
        except AuthsvcError as exc:
            await _abort(context, exc)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            # The exception may carry request data; log its type only, never its text.
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def local_audit(
    repo: Repository,
    clock: Clock,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str = "ok",
    detail: str = "",
) -> None:
    """Audit a change made on this host without a gRPC peer (CLI, scheduler)."""
    AuditTrail(repo, clock).record(
        Origin.local(actor), action=action, target=target, outcome=outcome, detail=detail
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        settings: Settings,
        repo: Repository,
        state: ServerState,
        signing_keys: SigningKeys,
        verifier: TokenVerifier,
        issuer: TokenIssuer,
        hasher: SecretHasher,
        clock: Clock,
        feed: RevocationFeed,
        ledger: LoginLedger,
    ) -> None:
        self._s = settings
        self._repo = repo
        self._state = state
        self._keys = signing_keys
        self._verifier = verifier
        self._issuer = issuer
        self._hasher = hasher
        self._clock = clock
        self._feed = feed
        self._ledger = ledger
        self._trail = AuditTrail(repo, clock)

    # -- helpers ---------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Make a write on this replica visible here at once, not at the next sync tick."""
        await asyncio.to_thread(self._state.refresh)

    def _bearer(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        values = _metadata(context, "authorization")
        if not values:
            return None
        if len(values) > 1:
            raise Unauthenticated("more than one authorization value")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        return token.strip()

    def _admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> Origin:
        """The admin caller of this RPC (from its bearer token), as the origin of its changes."""
        token = self._bearer(context)
        if token is None:
            raise Unauthenticated("this call needs an admin bearer token")
        claims = self._admin_from_token(token)
        return Origin(
            actor=claims.subject, peer=_peer_address(context), request_id=_request_id(context)
        )

    def _admin_from_token(self, token: str) -> Claims:
        if len(token) > self._s.max_token_bytes:
            raise Unauthenticated("admin token rejected: MALFORMED")
        result = self._verifier.verify(
            token, audience=self._s.admin_audience, required_scopes=(ADMIN_SCOPE,)
        )
        if result.valid and result.claims is not None:
            return result.claims
        if result.reason == auth_pb2.INSUFFICIENT_SCOPE:
            raise PermissionDenied(f"this call needs scope {ADMIN_SCOPE}")
        raise Unauthenticated(f"admin token rejected: {result.reason_name}")

    def _audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        peer: str,
        request_id: str,
        detail: str = "",
    ) -> None:
        self._trail.record(
            Origin(actor=actor, peer=peer, request_id=request_id),
            action=action,
            target=target,
            outcome=outcome,
            detail=detail,
        )

    # -- IssueToken ------------------------------------------------------------------------

    @handle_errors
    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.IssueTokenResponse:
        check_service_id(request.service_id)
        if not request.service_secret or len(request.service_secret) > 256:
            raise InvalidArgument("service_secret is required")
        check_name(request.audience, "audience")
        check_scopes(request.scopes, "scopes")
        if request.ttl_seconds < 0:
            raise InvalidArgument("ttl_seconds must not be negative")
        return await self._issue(request, _peer_address(context), _request_id(context))

    def _login(
        self,
        service_id: str,
        secret: str,
        peer: str,
        request_id: str,
        action: str,
        authorize: Callable[[ServiceRecord], Grant] | None = None,
    ) -> Login:
        # The HMAC is computed here for every login, known id or not, so an unknown id costs
        # what a known one does; only the digest travels on.
        return Login(
            service_id=service_id,
            digest=self._hasher.hash(secret),
            peer=peer,
            request_id=request_id,
            action=action,
            authorize=authorize,
        )

    def _authorize_issue(
        self, request: auth_pb2.IssueTokenRequest, signer: Signer
    ) -> Callable[[ServiceRecord], Grant]:
        """IssueToken's policy for an authenticated service, run inside the ledger's
        transaction: the audience and scopes it may have, then the token, prepared (jti and
        all) so that its audit row is written before it is signed."""
        ttl = min(request.ttl_seconds or self._s.default_ttl_seconds, self._s.max_ttl_seconds)

        def authorize(service: ServiceRecord) -> Grant:
            wanted = list(dict.fromkeys(request.scopes))
            if request.audience not in service.audiences:
                # Any registered service may follow WatchRevocations, which takes a token for
                # authsvc itself: such a token carries no scope, so it is no admin token.
                if request.audience != self._s.admin_audience or wanted:
                    return Grant(
                        "audience_denied",
                        request.audience,
                        error=PermissionDenied("audience not allowed for this service"),
                    )
            else:
                wanted = wanted or list(service.scopes)
            denied = [s for s in wanted if s not in service.scopes]
            if denied:
                return Grant(
                    "scope_denied",
                    request.audience,
                    error=PermissionDenied(
                        "scope not allowed for this service: " + " ".join(denied)
                    ),
                )
            unsigned = self._issuer.prepare(
                key_bits=signer.private_key.key_size,
                kid=signer.kid,
                subject=service.service_id,
                audience=request.audience,
                scopes=wanted,
                ttl_seconds=ttl,
                now=self._clock.now(),
            )
            return Grant(
                "ok",
                request.audience,
                f"jti={unsigned.claims.jti}",
                complete=functools.partial(self._issuer.sign, unsigned, signer.private_key),
            )

        return authorize

    async def _issue(
        self, request: auth_pb2.IssueTokenRequest, peer: str, request_id: str
    ) -> auth_pb2.IssueTokenResponse:
        signer = self._state.signer
        if signer is None:
            raise AuthsvcError("no active signing key")
        result = await self._ledger.settle(
            self._login(
                request.service_id,
                request.service_secret,
                peer,
                request_id,
                "issue_token",
                self._authorize_issue(request, signer),
            )
        )
        issued: IssuedToken = result.value
        claims = issued.claims
        return auth_pb2.IssueTokenResponse(
            access_token=issued.token,
            token_type="Bearer",  # noqa: S106 - the RFC 6750 scheme, not a secret
            expires_in=claims.expires_at - claims.issued_at,
            expires_at=timestamp(claims.expires_at),
            key_id=claims.key_id,
            scopes=list(claims.scopes),
        )

    # -- ValidateToken ---------------------------------------------------------------------

    @handle_errors
    async def ValidateToken(
        self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ValidateTokenResponse:
        return self._validate(request).to_proto()

    async def ValidateTokenStream(
        self,
        request_iterator: AsyncIterator[auth_pb2.ValidateTokenRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[auth_pb2.ValidateTokenResponse]:
        """ValidateToken's check per message. A request ValidateToken refuses with
        INVALID_ARGUMENT is answered valid=false MALFORMED here instead: ending the stream would
        fail every other check the client multiplexes on it.

        One message is read, checked and answered at a time; HTTP/2 flow control holds the
        rest, so a stream never has more than one check in flight on the server and yields to
        the event loop between messages (unary calls are not starved)."""
        async for request in request_iterator:
            try:
                result = self._validate(request)
            except InvalidArgument:
                result = _STREAM_MALFORMED
            yield result.to_proto()

    def _validate(self, request: auth_pb2.ValidateTokenRequest) -> ValidationResult:
        """The request rules and the verify, shared by ValidateToken and its stream.

        Raises:
            InvalidArgument: empty token or audience, token over the size limit, bad scopes.
        """
        if not request.token:
            raise InvalidArgument("token is required")
        if len(request.token) > self._s.max_token_bytes:
            raise InvalidArgument(f"token is longer than {self._s.max_token_bytes} bytes")
        if not request.audience:
            raise InvalidArgument("audience is required (the validating service's own id)")
        check_scopes(request.required_scopes, "required_scopes")
        return self._verifier.verify(
            request.token, audience=request.audience, required_scopes=request.required_scopes
        )

    # -- RevokeToken -----------------------------------------------------------------------

    @handle_errors
    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RevokeTokenResponse:
        target = request.WhichOneof("target")
        peer, request_id = _peer_address(context), _request_id(context)
        reason = request.reason[:256]
        if target is None:
            raise InvalidArgument("one of token, jti or service_id is required")
        if target == "token":
            if len(request.token) > self._s.max_token_bytes:
                raise InvalidArgument(f"token is longer than {self._s.max_token_bytes} bytes")
            if not request.token:
                raise InvalidArgument("token is required")
            revoked = await self._revoke_presented(request.token, reason, peer, request_id)
        else:
            caller = self._admin(context)
            if target == "jti":
                check_name(request.jti, "jti")
                revoked = await asyncio.to_thread(
                    self._revoke_jti,
                    request.jti,
                    None,
                    caller.actor,
                    reason,
                    peer,
                    request_id,
                )
            else:
                check_name(request.service_id, "service_id")
                revoked = await self._revoke_service(
                    request.service_id, caller.actor, reason, peer, request_id
                )
        await self._refresh()
        return auth_pb2.RevokeTokenResponse(revoked=revoked)

    async def _revoke_presented(self, token: str, reason: str, peer: str, request_id: str) -> bool:
        """RFC 7009: whoever holds a token may revoke it. An invalid token revokes nothing."""
        audience = unverified_audience(token)
        if audience is None:
            return False
        result = self._verifier.verify(token, audience=audience)
        if result.reason == auth_pb2.REVOKED:
            return True
        if result.claims is None:
            return False
        claims = result.claims
        return await asyncio.to_thread(
            self._revoke_jti,
            claims.jti,
            claims.expires_at,
            claims.subject,
            reason,
            peer,
            request_id,
        )

    def _revoke_jti(
        self,
        jti: str,
        expires_at: int | None,
        actor: str,
        reason: str,
        peer: str,
        request_id: str,
    ) -> bool:
        now = self._clock.now()
        if expires_at is None:
            # Unknown token: keep the revocation as long as any token could live.
            expires_at = math.ceil(now) + self._s.max_ttl_seconds
        self._repo.create_revocation(
            jti=jti,
            service_id=None,
            revoked_before=None,
            expires_at=to_datetime(expires_at + self._s.leeway_seconds),
            reason=reason,
            now=to_datetime(now),
        )
        self._audit(
            actor=actor,
            action="revoke_token",
            target=f"jti:{jti}",
            outcome="ok",
            peer=peer,
            request_id=request_id,
        )
        return True

    async def _revoke_service(
        self, service_id: str, actor: str, reason: str, peer: str, request_id: str
    ) -> bool:
        """Revoke every token of a service issued until this call returns.

        `iat` has whole-second resolution, so a cutoff inside a second could not tell a token
        issued just before the call from one issued just after. The cutoff is therefore the next
        whole second and the call returns only once that second has begun: every token issued
        before the return has iat < cutoff (revoked), every token issued after has iat >= cutoff.
        """
        now = self._clock.now()
        cutoff = math.floor(now) + 1

        def write() -> None:
            if self._repo.fetch_service(service_id) is None:
                raise NotFound("no such service")
            self._repo.create_revocation(
                jti=None,
                service_id=service_id,
                revoked_before=to_datetime(cutoff),
                expires_at=to_datetime(cutoff + self._s.max_ttl_seconds + self._s.leeway_seconds),
                reason=reason,
                now=to_datetime(now),
            )
            self._audit(
                actor=actor,
                action="revoke_service_tokens",
                target=f"service:{service_id}",
                outcome="ok",
                peer=peer,
                request_id=request_id,
            )

        await asyncio.to_thread(write)
        remaining = cutoff - self._clock.now()
        if remaining > 0:
            await asyncio.to_thread(self._clock.sleep, remaining)
        return True

    # -- RotateServiceSecret ---------------------------------------------------------------

    @handle_errors
    async def RotateServiceSecret(
        self,
        request: auth_pb2.RotateServiceSecretRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> auth_pb2.RotateServiceSecretResponse:
        check_service_id(request.service_id)
        check_grace_period(request.grace_period_seconds, self._s.max_secret_grace_seconds)
        if len(request.current_secret) > 256:
            raise InvalidArgument("current_secret is too long")
        peer, request_id = _peer_address(context), _request_id(context)
        admin: Origin | None = None
        if not request.current_secret:
            admin = self._admin(context)
        return await asyncio.to_thread(self._rotate_secret, request, admin, peer, request_id)

    def _rotate_secret(
        self,
        request: auth_pb2.RotateServiceSecretRequest,
        admin: Origin | None,
        peer: str,
        request_id: str,
    ) -> auth_pb2.RotateServiceSecretResponse:
        expected: bytes | None = None
        if admin is None:
            login = replace(
                self._login(
                    request.service_id, request.current_secret, peer, request_id, "rotate_secret"
                ),
                current_secret_only=True,
            )
            self._ledger.settle_sync(login)
            actor, expected = request.service_id, login.digest
        else:
            actor = admin.actor
            if self._repo.fetch_service(request.service_id) is None:
                self._audit(
                    actor=actor,
                    action="rotate_secret",
                    target=f"service:{request.service_id}",
                    outcome="not_found",
                    peer=peer,
                    request_id=request_id,
                )
                raise NotFound("no such service")
        try:
            secret, previous_until = rotate_service_secret(
                self._repo,
                self._hasher,
                self._clock,
                request.service_id,
                request.grace_period_seconds,
                expected_current_hash=expected,
            )
        except FailedPrecondition:
            # Another rotation committed since this login: the presented secret is no longer
            # the current one, which is the rule the ledger applies, decided late.
            self._audit(
                actor=actor,
                action="rotate_secret",
                target=f"service:{request.service_id}",
                outcome="previous_secret_denied",
                peer=peer,
                request_id=request_id,
            )
            raise PermissionDenied(CURRENT_ONLY) from None
        self._audit(
            actor=actor,
            action="rotate_secret",
            target=f"service:{request.service_id}",
            outcome="ok",
            peer=peer,
            request_id=request_id,
            detail=f"grace_seconds={request.grace_period_seconds}",
        )
        response = auth_pb2.RotateServiceSecretResponse(service_secret=secret)
        if previous_until is not None:
            response.previous_secret_expires_at.CopyFrom(timestamp(to_timestamp(previous_until)))
        return response

    # -- Keys ------------------------------------------------------------------------------

    @handle_errors
    async def RotateSigningKey(
        self, request: auth_pb2.RotateSigningKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RotateSigningKeyResponse:
        origin = self._admin(context)
        result = await asyncio.to_thread(
            self._keys.rotate, origin, revoke_previous=request.revoke_previous
        )
        await self._refresh()
        key = result.key
        activated = key.activated_at or key.created_at
        return auth_pb2.RotateSigningKeyResponse(
            key_id=key.kid, activated_at=timestamp(to_timestamp(activated))
        )

    @handle_errors
    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(jwks_json=self._keys.jwks())

    @handle_errors
    async def ListSigningKeys(
        self, request: auth_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListSigningKeysResponse:
        self._admin(context)
        keys = await asyncio.to_thread(self._keys.list)
        return auth_pb2.ListSigningKeysResponse(keys=[_key_proto(k) for k in keys])

    # -- Services --------------------------------------------------------------------------

    @handle_errors
    async def CreateService(
        self, request: auth_pb2.CreateServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.CreateServiceResponse:
        caller = self._admin(context)
        check_new_service_id(request.service_id)
        if not request.audiences:
            raise InvalidArgument("at least one audience is required")
        check_audiences(request.audiences)
        check_scopes(request.scopes, "scopes")
        peer, request_id = _peer_address(context), _request_id(context)

        def create() -> tuple[ServiceRecord, str]:
            record, secret = register_service(
                self._repo,
                self._hasher,
                self._clock,
                request.service_id,
                request.audiences,
                request.scopes,
            )
            self._audit(
                actor=caller.actor,
                action="create_service",
                target=f"service:{record.service_id}",
                outcome="ok",
                peer=peer,
                request_id=request_id,
            )
            return record, secret

        record, secret = await asyncio.to_thread(create)
        return auth_pb2.CreateServiceResponse(service=_service_proto(record), service_secret=secret)

    @handle_errors
    async def ListServices(
        self, request: auth_pb2.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListServicesResponse:
        self._admin(context)
        services = await asyncio.to_thread(self._repo.list_services)
        return auth_pb2.ListServicesResponse(services=[_service_proto(s) for s in services])

    @handle_errors
    async def DisableService(
        self, request: auth_pb2.DisableServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.DisableServiceResponse:
        caller = self._admin(context)
        check_name(request.service_id, "service_id")
        peer, request_id = _peer_address(context), _request_id(context)

        def disable() -> ServiceRecord:
            record = disable_service(
                self._repo,
                self._clock,
                request.service_id,
                token_lifetime_seconds=self._s.max_ttl_seconds + self._s.leeway_seconds,
            )
            self._audit(
                actor=caller.actor,
                action="disable_service",
                target=f"service:{record.service_id}",
                outcome="ok",
                peer=peer,
                request_id=request_id,
            )
            return record

        record = await asyncio.to_thread(disable)
        await self._refresh()
        return auth_pb2.DisableServiceResponse(service=_service_proto(record))

    # -- WatchRevocations ------------------------------------------------------------------

    def _follower(self, context: grpc.aio.ServicerContext[Any, Any]) -> Claims:
        """A registered service following revocations: a token for the server's own audience,
        scopes or none (IssueToken gives one to any enabled service), or an admin token."""
        token = self._bearer(context)
        if token is None:
            raise Unauthenticated(
                f"WatchRevocations needs a bearer token for audience {self._s.admin_audience}"
            )
        if len(token) > self._s.max_token_bytes:
            raise Unauthenticated("follower token rejected: MALFORMED")
        result = self._verifier.verify(token, audience=self._s.admin_audience)
        if result.valid and result.claims is not None:
            return result.claims
        raise Unauthenticated(f"follower token rejected: {result.reason_name}")

    async def WatchRevocations(
        self,
        request: auth_pb2.WatchRevocationsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[auth_pb2.RevocationEvent]:
        peer = _peer_address(context)
        try:
            self._follower(context)
            if request.after_cursor < 0:
                raise InvalidArgument("after_cursor must be >= 0")
            self._feed.acquire(peer)
        except AuthsvcError as exc:
            await _abort(context, exc)
        try:
            async for event in self._follow(request.after_cursor):
                yield event
        except AuthsvcError as exc:
            await _abort(context, exc)
        finally:
            self._feed.release(peer)

    async def _follow(self, cursor: int) -> AsyncIterator[auth_pb2.RevocationEvent]:
        """Every event after `cursor`: from storage while the stream is behind the shared log,
        then from the log by position."""
        feed = self._feed
        position: int | None = None
        while True:
            if position is None:
                position = feed.position(cursor)
            if position is None:
                horizon = feed.horizon
                async for event in self._replay(cursor):
                    yield event
                    cursor = event.cursor
                # Everything up to the horizon was in storage when the replay ran; what it did
                # not return had expired.
                cursor = max(cursor, horizon)
                continue
            batch = feed.read(position, _WATCH_BATCH)
            if batch is None:
                position = None  # the log moved past this stream: catch up from storage
                continue
            for event in batch:
                yield event
                cursor = event.cursor
            position += len(batch)
            if len(batch) == _WATCH_BATCH:
                await asyncio.sleep(0)  # a long backlog must not hold the loop
                continue
            if feed.closed:
                return
            if position == feed.end:
                await feed.wait(timeout=30.0)

    async def _replay(self, cursor: int) -> AsyncIterator[auth_pb2.RevocationEvent]:
        """Page by page from storage; each page is read and turned into messages in a worker
        thread, and the loop runs other calls between pages."""

        def page_after(after: int) -> list[auth_pb2.RevocationEvent]:
            held = self._repo.list_held_revocations(
                after, to_datetime(self._clock.now()), _WATCH_PAGE
            )
            return [held_event(h) for h in held]

        while True:
            page = await asyncio.to_thread(page_after, cursor)
            for i, event in enumerate(page):
                yield event
                if i % _WATCH_BATCH == _WATCH_BATCH - 1:
                    await asyncio.sleep(0)
            if len(page) < _WATCH_PAGE:
                return
            cursor = page[-1].cursor
