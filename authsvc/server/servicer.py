"""AuthService over grpc.aio: proto <-> domain translation; errors become status in one place.

Every rule is in the use-case layer (`authsvc.usecases`); a method here reads the request,
calls one use case and builds the response. `handle_errors` is the only place an error becomes
a status, for unary and streaming RPCs alike (`authsvc.server.status` holds the table).

Validation runs inline on the event loop (pure CPU, no I/O). Anything touching the database or
signing runs in worker threads (or the login batch's thread) so that open WatchRevocations
streams and slow queries never starve other calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.clock import Clock, to_timestamp
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import AuthsvcError, StorageUnavailable, Unauthenticated
from authsvc.logs import current_request_id, request_id_from
from authsvc.server.status import status_of, trailers_of
from authsvc.storage.records import (
    AudienceGrant,
    ServiceCredentials,
    ServiceRecord,
    SigningKeyRecord,
)
from authsvc.storage.repository import Repository
from authsvc.sync import RevocationFeed, ServerState
from authsvc.tokens.issuer import IssuedToken
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.callers import Callers
from authsvc.usecases.revocation import Revocations
from authsvc.usecases.secrets import Secrets
from authsvc.usecases.services import CredentialChange, GrantChange, ServiceRegistry
from authsvc.usecases.signing_keys import SigningKeys
from authsvc.usecases.tokens import ExchangeRequest, TokenRequest, Tokens
from authsvc.usecases.watch import RevocationWatch
from authsvc.workload.certificates import binding_thumbprint
from authsvc_client.binding import peer_certificate_pem
from authsvc_client.claims import ACCESS_TOKEN_TYPE, ValidationResult
from authsvc_client.interceptors import bearer_token
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("authsvc.server")


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


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The id the RPC interceptor gave this call, so audit rows and log lines agree."""
    return current_request_id() or request_id_from(context.invocation_metadata())


def _origin(context: grpc.aio.ServicerContext[Any, Any], actor: str = "") -> Origin:
    """The call as the origin of what it changes; `actor` once the caller is known."""
    return Origin(actor=actor, peer=_peer_address(context), request_id=_request_id(context))


def _bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's bearer token by the client package's parser (the one parser), None when
    the call has no authorization metadata at all."""
    metadata = tuple(context.invocation_metadata() or ())
    found = bearer_token(metadata)
    if isinstance(found, str):
        return found
    if not any(key == "authorization" for key, _ in metadata):
        return None
    raise Unauthenticated(found.details)


def _peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The client certificate TLS verified on this call (PEM), "" without one.

    gRPC puts it in the auth context only after the handshake verified it against
    AUTHSVC_TLS_CLIENT_CA; behind a proxy that ends TLS there is none, so a certificate login
    is refused there (README: TLS termination) rather than trusting a header.
    """
    pem = peer_certificate_pem(context.auth_context())
    return "" if pem is None else pem.decode("ascii", "replace")


def _peer_thumbprint(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The x5t#S256 of the call's verified client certificate, "" without one: what a token
    the caller presents (admin, follower) may be bound to."""
    return binding_thumbprint(_peer_certificate(context))


def _issued_proto(issued: IssuedToken) -> auth_pb2.IssueTokenResponse:
    claims = issued.claims
    return auth_pb2.IssueTokenResponse(
        access_token=issued.token,
        token_type="Bearer",  # noqa: S106 - the RFC 6750 scheme, not a secret
        issued_token_type=ACCESS_TOKEN_TYPE,
        expires_in=claims.expires_at - claims.issued_at,
        expires_at=timestamp(claims.expires_at),
        key_id=claims.key_id,
        scopes=list(claims.scopes),
    )


def _service_proto(record: ServiceRecord, credentials: ServiceCredentials) -> auth_pb2.Service:
    """A service as the admin RPCs show it: grants, and its credentials by id (key ids, SANs,
    subjects), never key material."""
    return auth_pb2.Service(
        service_id=record.service_id,
        audiences=list(record.audiences),
        scopes=list(record.scopes),
        disabled=record.disabled,
        created_at=timestamp(to_timestamp(record.created_at)),
        grants=[auth_pb2.Grant(audience=g.audience, scopes=list(g.scopes)) for g in record.grants],
        has_secret=credentials.has_secret,
        public_key_ids=[kid for kid, _ in credentials.public_keys],
        tls_sans=list(credentials.tls_sans),
        federated_subjects=[
            auth_pb2.FederatedSubject(trust=trust, subject=subject)
            for trust, subject in credentials.federated
        ],
    )


def _subjects(subjects: Iterable[auth_pb2.FederatedSubject]) -> tuple[tuple[str, str], ...]:
    return tuple((f.trust, f.subject) for f in subjects)


def _grants(grants: Iterable[auth_pb2.Grant]) -> tuple[AudienceGrant, ...]:
    return tuple(AudienceGrant(g.audience, tuple(g.scopes)) for g in grants)


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


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: AuthsvcError) -> None:
    """End the call with the error's status, message and trailers (`status.py`'s table)."""
    trailers = trailers_of(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(status_of(exc), str(exc))


async def _abort_for(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, name: str
) -> None:
    if isinstance(exc, AuthsvcError):
        await _abort(context, exc)
        return
    # The exception may carry request data; log its type only, never its text.
    log.exception("unexpected error in %s", name)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class _Answers:
    """The ValidateTokenResponse of each ValidationResult object, built once.

    The verifier answers every use of a cached token with the one result object it keeps
    for it (and one shared object per failure reason), so building the message on every
    call is repeated work: 7-13 µs a check on a loaded server (BENCHMARKS, issue 16's fourth
    round). Keyed by identity; each entry holds its result, so no key is reused while its
    entry lives. The messages go only to gRPC to be serialized and are never changed. Read
    and written on the event loop only, hence no lock; the oldest entry goes first.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._by_id: dict[int, tuple[ValidationResult, auth_pb2.ValidateTokenResponse]] = {}

    def __call__(self, result: ValidationResult) -> auth_pb2.ValidateTokenResponse:
        seen = self._by_id.get(id(result))
        if seen is not None and seen[0] is result:
            return seen[1]
        answer = result.to_proto()
        by_id = self._by_id
        while len(by_id) >= self._size:
            del by_id[next(iter(by_id))]
        by_id[id(result)] = (result, answer)
        return answer


def handle_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into status codes: the only place that does, for unary methods and
    for streaming ones (async generators) alike."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            inner = method(self, request, context)
            try:
                async for item in inner:
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await _abort_for(context, exc, method.__name__)
            finally:
                # A client that goes away closes this generator: close the method's at once,
                # so its own clean-up (a stream's slot) runs now, not at garbage collection.
                await inner.aclose()

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(context, exc, method.__name__)
        raise AssertionError("unreachable")  # pragma: no cover

    return unary


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        settings: Settings,
        repo: Repository,
        state: ServerState,
        signing_keys: SigningKeys,
        hasher: SecretHasher,
        clock: Clock,
        feed: RevocationFeed,
        tokens: Tokens,
        revocations: Revocations,
        secrets: Secrets,
        callers: Callers,
    ) -> None:
        self._state = state
        self._keys = signing_keys
        self._tokens = tokens
        self._revocations = revocations
        self._secrets = secrets
        self._callers = callers
        self._answers = _Answers()
        self._services = ServiceRegistry(repo, hasher, clock, settings, AuditTrail(repo, clock))
        self._watch = RevocationWatch(repo=repo, clock=clock, feed=feed, callers=callers)

    # -- helpers ---------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Make a write on this replica visible here at once, not at the next sync tick.

        The write has committed by now: if this refresh fails (the database away for a
        moment), the replica shows the change at a later sync, and the call still answers
        OK. Answering the failure instead would say a persisted write did not happen, and
        invite a retry that repeats it (a second rotation, a second revocation).
        """
        try:
            await asyncio.to_thread(self._state.refresh)
        except StorageUnavailable:
            log.warning(
                "the change is committed; this replica shows it at its next sync "
                "(database unavailable)"
            )
        except AuthsvcError as exc:
            # A reload this replica cannot make (ServerState.refresh: a key its KEK cannot
            # unwrap): the sync loop keeps reporting it; the write itself stands.
            log.warning("the change is committed; this replica could not reload: %s", exc)

    def _admin(self, context: grpc.aio.ServicerContext[Any, Any]) -> Origin:
        """The admin caller of this RPC (from its bearer token), as the origin of its changes."""
        claims = self._callers.admin(_bearer(context), _peer_thumbprint(context))
        return _origin(context, claims.subject)

    # -- IssueToken ------------------------------------------------------------------------

    @handle_errors
    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.IssueTokenResponse:
        issued = await self._tokens.issue(
            TokenRequest(
                service_id=request.service_id,
                secret=request.service_secret,
                audience=request.audience,
                scopes=tuple(request.scopes),
                ttl_seconds=request.ttl_seconds,
                client_assertion=request.client_assertion,
                client_certificate=_peer_certificate(context),
            ),
            _origin(context, request.service_id),
        )
        return _issued_proto(issued)

    @handle_errors
    async def ExchangeToken(
        self, request: auth_pb2.ExchangeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.IssueTokenResponse:
        issued = await self._tokens.exchange(
            ExchangeRequest(
                subject_token=request.subject_token,
                subject_token_type=request.subject_token_type,
                audience=request.audience,
                scopes=tuple(request.scopes),
                ttl_seconds=request.ttl_seconds,
                service_id=request.service_id,
                secret=request.service_secret,
                client_assertion=request.client_assertion,
                client_certificate=_peer_certificate(context),
            ),
            _origin(context, request.service_id),
        )
        return _issued_proto(issued)

    # -- ValidateToken ---------------------------------------------------------------------

    @handle_errors
    async def ValidateToken(
        self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ValidateTokenResponse:
        result = self._tokens.validate(
            request.token,
            request.audience,
            request.required_scopes,
            request.client_cert_thumbprint,
        )
        return self._answers(result)

    @handle_errors
    async def ValidateTokenStream(
        self,
        request_iterator: AsyncIterator[auth_pb2.ValidateTokenRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[auth_pb2.ValidateTokenResponse]:
        """ValidateToken's check per message (`Tokens.validate_in_stream`).

        One message is read, checked and answered at a time; HTTP/2 flow control holds the
        rest, so a stream never has more than one check in flight on the server and yields to
        the event loop between messages (unary calls are not starved)."""
        async for request in request_iterator:
            result = self._tokens.validate_in_stream(
                request.token,
                request.audience,
                request.required_scopes,
                request.client_cert_thumbprint,
            )
            yield self._answers(result)

    # -- RevokeToken -----------------------------------------------------------------------

    @handle_errors
    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RevokeTokenResponse:
        target = request.WhichOneof("target")
        revoked = await self._revocations.revoke(
            target,
            "" if target is None else getattr(request, target),
            request.reason,
            functools.partial(_bearer, context),
            _origin(context),
            _peer_thumbprint(context),
        )
        await self._refresh()
        return auth_pb2.RevokeTokenResponse(revoked=revoked)

    # -- RotateServiceSecret ---------------------------------------------------------------

    @handle_errors
    async def RotateServiceSecret(
        self,
        request: auth_pb2.RotateServiceSecretRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> auth_pb2.RotateServiceSecretResponse:
        rotated = await asyncio.to_thread(
            self._secrets.rotate,
            request.service_id,
            request.grace_period_seconds,
            request.current_secret,
            _origin(context, request.service_id),
            lambda: self._admin(context),
        )
        response = auth_pb2.RotateServiceSecretResponse(service_secret=rotated.secret)
        if rotated.previous_until is not None:
            response.previous_secret_expires_at.CopyFrom(
                timestamp(to_timestamp(rotated.previous_until))
            )
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

        def create() -> tuple[ServiceRecord, str | None, ServiceCredentials]:
            record, secret = self._services.create(
                caller,
                request.service_id,
                list(request.audiences),
                list(request.scopes),
                _grants(request.grants),
                secret=not request.no_secret,
                public_keys=list(request.public_keys),
                tls_sans=list(request.tls_sans),
                federated_subjects=_subjects(request.federated_subjects),
            )
            return record, secret, self._services.credentials_of(record.service_id)

        record, secret, credentials = await asyncio.to_thread(create)
        # A secretless service: the field stays empty (proto3 has no null string).
        return auth_pb2.CreateServiceResponse(
            service=_service_proto(record, credentials), service_secret=secret or ""
        )

    @handle_errors
    async def ListServices(
        self, request: auth_pb2.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListServicesResponse:
        self._admin(context)
        listed = await asyncio.to_thread(self._services.list_with_credentials)
        return auth_pb2.ListServicesResponse(services=[_service_proto(s, c) for s, c in listed])

    @handle_errors
    async def UpdateService(
        self, request: auth_pb2.UpdateServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.UpdateServiceResponse:
        caller = self._admin(context)
        change = GrantChange(
            add_audiences=tuple(request.add_audiences),
            remove_audiences=tuple(request.remove_audiences),
            add_scopes=tuple(request.add_scopes),
            remove_scopes=tuple(request.remove_scopes),
            grants=_grants(request.grants),
            revoke_grants=_grants(request.revoke_grants),
        )
        credentials = CredentialChange(
            add_public_keys=tuple(request.add_public_keys),
            remove_public_key_ids=tuple(request.remove_public_key_ids),
            add_tls_sans=tuple(request.add_tls_sans),
            remove_tls_sans=tuple(request.remove_tls_sans),
            add_federated_subjects=_subjects(request.add_federated_subjects),
            remove_federated_subjects=_subjects(request.remove_federated_subjects),
        )

        def update() -> auth_pb2.Service:
            return self._with_credentials(
                self._services.update(caller, request.service_id, change, credentials)
            )

        service = await asyncio.to_thread(update)
        return auth_pb2.UpdateServiceResponse(service=service)

    def _with_credentials(self, record: ServiceRecord) -> auth_pb2.Service:
        """A service the call just changed, with its credentials (read in a worker thread)."""
        return _service_proto(record, self._services.credentials_of(record.service_id))

    @handle_errors
    async def DisableService(
        self, request: auth_pb2.DisableServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.DisableServiceResponse:
        caller = self._admin(context)
        record = await asyncio.to_thread(self._services.disable, caller, request.service_id)
        await self._refresh()
        service = await asyncio.to_thread(self._with_credentials, record)
        return auth_pb2.DisableServiceResponse(service=service)

    @handle_errors
    async def EnableService(
        self, request: auth_pb2.EnableServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.EnableServiceResponse:
        caller = self._admin(context)
        record = await asyncio.to_thread(self._services.enable, caller, request.service_id)
        await self._refresh()
        service = await asyncio.to_thread(self._with_credentials, record)
        return auth_pb2.EnableServiceResponse(service=service)

    # -- WatchRevocations ------------------------------------------------------------------

    @handle_errors
    async def WatchRevocations(
        self,
        request: auth_pb2.WatchRevocationsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[auth_pb2.RevocationEvent]:
        events = self._watch.follow(
            _bearer(context),
            request.after_cursor,
            _peer_address(context),
            _peer_thumbprint(context),
        )
        # Closed with this generator (a client that leaves): the stream's slot is given back now.
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
