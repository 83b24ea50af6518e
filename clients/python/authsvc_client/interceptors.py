"""Server side: check the caller's bearer token per method, expose its claims via a contextvar."""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from authsvc_client.binding import certificate_thumbprint, peer_certificate_pem, thumbprint_matches
from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.errors import ValidatorUnavailable
from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import LocalValidator, Validator

__all__ = [
    "DEFAULT_PUBLIC_SERVICES",
    "AuthServerInterceptor",
    "Denial",
    "MethodPolicy",
    "MethodRule",
    "bearer_token",
    "call_thumbprint",
    "current_claims",
    "incoming_token",
]

_LOG = logging.getLogger(__name__)

# Public by explicit choice: load balancers and tooling must reach these without a token.
DEFAULT_PUBLIC_SERVICES: tuple[str, ...] = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


# The authenticated call being handled: its caller's claims and the bearer token they came
# from (for the delegation helper, which exchanges it to call on the caller's behalf). A plain
# tuple: one is built for every call the interceptors admit.
Caller = tuple[Claims, str]
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "authsvc_caller", default=None
)

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_AUTHORIZATION = re.compile(r"([A-Za-z]+) +(\S+)")


def current_claims() -> Claims | None:
    """The authenticated caller of the RPC being handled, or None (public method, or outside
    an RPC)."""
    caller = _CALLER.get()
    return None if caller is None else caller[0]


def incoming_token() -> str | None:
    """The bearer token of the RPC being handled, as the interceptor accepted it, or None.

    For `authsvc_client.delegation`: a handler that calls the next service on its caller's
    behalf exchanges this token. It is the caller's credential: never log it, and pass it on
    only to authsvc (ExchangeToken), never to the next service itself.
    """
    caller = _CALLER.get()
    return None if caller is None else caller[1]


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a call is refused, as the status the client sees. Details never hold the token."""

    code: grpc.StatusCode
    details: str


_MISSING = Denial(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
_MALFORMED_HEADER = Denial(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata")
_SEVERAL = Denial(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization value")
_NOT_ALLOWED = Denial(grpc.StatusCode.PERMISSION_DENIED, "method is not open to any caller")
_UNAVAILABLE = Denial(grpc.StatusCode.UNAVAILABLE, "authentication is unavailable")
_INSUFFICIENT = Denial(grpc.StatusCode.PERMISSION_DENIED, "insufficient scope")


def _invalid(reason_name: str) -> Denial:
    return Denial(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {reason_name}")


_BY_REASON: dict[int, Denial] = {
    value: _invalid(auth_pb2.ValidationFailure.Name(value))
    for value in auth_pb2.ValidationFailure.values()
    if value not in (auth_pb2.VALIDATION_FAILURE_UNSPECIFIED, auth_pb2.INSUFFICIENT_SCOPE)
}
_BY_REASON[auth_pb2.INSUFFICIENT_SCOPE] = _INSUFFICIENT

ALL_DENIALS: tuple[Denial, ...] = (
    _MISSING,
    _MALFORMED_HEADER,
    _SEVERAL,
    _NOT_ALLOWED,
    _UNAVAILABLE,
    *_BY_REASON.values(),
)


_MISMATCH = _BY_REASON[auth_pb2.CERTIFICATE_MISMATCH]

# PEM of a peer leaf -> its x5t#S256. A connection's calls all present the same leaf, so the
# parse is paid once per certificate, not per call; cleared when full (plain dict get/set).
_THUMBPRINTS: dict[bytes, str] = {}
_THUMBPRINTS_KEPT = 1024

_TLS_TERMINATED_WARNING = (
    "tls_terminated_upstream: client certificates do not reach this service, so "
    "certificate-bound tokens (RFC 8705) cannot be checked here; they will be REFUSED "
    "(CERTIFICATE_MISMATCH), never accepted as bearer tokens"
)
_NO_CERTIFICATE_WARNING = (
    "a certificate-bound token arrived on a call without a client certificate and was "
    "refused (CERTIFICATE_MISMATCH); serve this port over mTLS so bound tokens can be used "
    "(logged once)"
)


def call_thumbprint(context: Any) -> str | None:
    """The RFC 8705 `x5t#S256` of the verified client certificate the call arrived with
    (gRPC auth context `x509_pem_cert`), None without mTLS. Never raises."""
    try:
        pem = peer_certificate_pem(context.auth_context())
    except Exception:
        return None
    if pem is None:
        return None
    thumbprint = _THUMBPRINTS.get(pem)
    if thumbprint is None:
        try:
            thumbprint = certificate_thumbprint(pem)
        except ValueError:
            return None  # gRPC verified it, so this does not happen; fail closed if it does
        if len(_THUMBPRINTS) >= _THUMBPRINTS_KEPT:
            _THUMBPRINTS.clear()
        _THUMBPRINTS[pem] = thumbprint
    return thumbprint


def takes_thumbprint(validator: Any) -> bool:
    """Whether `validator.validate` accepts `client_cert_thumbprint` (every validator of this
    package does). One written against the older Validator protocol is still called, without
    it; the interceptor then enforces the binding on the claims it returns."""
    try:
        parameters = inspect.signature(validator.validate).parameters.values()
    except (AttributeError, TypeError, ValueError):
        return False
    return any(
        p.name == "client_cert_thumbprint" or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in parameters
    )


def _bound(outcome: Claims | Denial) -> bool:
    """The outcome of a check made without a thumbprint that the certificate could change."""
    if isinstance(outcome, Claims):
        return bool(outcome.cert_thumbprint)  # a validator that ignored the binding
    return outcome == _MISMATCH


# A check of the call's token given the thumbprint of the certificate it arrived with.
SyncCheck = Callable[[str | None], Claims | Denial]


class Binding:
    """The certificate side of an interceptor (sync and aio): which thumbprint a call
    presents, when it is read, and whether the accepted claims may be used with it.

    Reading the auth context costs microseconds on every call. A LocalValidator answers an
    unbound token the same with or without a thumbprint, and a bound one CERTIFICATE_MISMATCH
    without it, so with one the certificate is read only when the token turns out bound (and
    the now cached token checked again with it). A remote check must carry the thumbprint from
    the start. Whatever the validator did, claims bound to another certificate never pass.
    """

    def __init__(self, validator: Any, *, tls_terminated_upstream: bool) -> None:
        self.passes_thumbprint = takes_thumbprint(validator)
        self.ignores_peer = tls_terminated_upstream
        self.reads_lazily = self.passes_thumbprint and isinstance(validator, LocalValidator)
        self._warned = False
        if tls_terminated_upstream:
            _LOG.warning(_TLS_TERMINATED_WARNING)

    def thumbprint(self, context: Any) -> str | None:
        # Behind a TLS-terminating proxy the peer certificate, if any, is the proxy's own.
        return None if self.ignores_peer else call_thumbprint(context)

    def upfront(self, context: Any) -> str | None:
        """The thumbprint to check with first (None: none, or not read yet)."""
        return None if self.reads_lazily else self.thumbprint(context)

    def second_look(self, outcome: Claims | Denial) -> bool:
        """Whether a lazily made check must read the certificate after all."""
        return self.reads_lazily and not self.ignores_peer and _bound(outcome)

    def check_sync(self, check: SyncCheck, context: Any) -> Claims | Denial:
        thumbprint = self.upfront(context)
        outcome = check(thumbprint)
        if self.second_look(outcome):
            thumbprint = self.thumbprint(context)
            if thumbprint is not None and outcome == _MISMATCH:
                outcome = check(thumbprint)
        return self.admit(outcome, thumbprint)

    def admit(self, outcome: Claims | Denial, thumbprint: str | None) -> Claims | Denial:
        """The validator's verdict, with the binding enforced here as well."""
        if isinstance(outcome, Claims):
            bound_to = outcome.cert_thumbprint
            if not bound_to or thumbprint_matches(bound_to, thumbprint):
                return outcome
            outcome = _MISMATCH
        if outcome == _MISMATCH and thumbprint is None and not self.ignores_peer:
            if not self._warned:
                self._warned = True
                _LOG.warning(_NO_CERTIFICATE_WARNING)
        return outcome


def bearer_token(metadata: Iterable[Any] | None) -> str | Denial:
    """The token of the single `authorization: Bearer <token>` value (scheme in any case)."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return _MISSING
    if len(values) > 1:
        return _SEVERAL
    value = values[0]
    if not isinstance(value, str):
        return _MALFORMED_HEADER
    match = _AUTHORIZATION.fullmatch(value.strip(" "))
    if match is None or match.group(1).lower() != "bearer":
        return _MALFORMED_HEADER
    token = match.group(2)
    if _B64TOKEN.fullmatch(token) is None:
        return _MALFORMED_HEADER
    return token


@dataclass(frozen=True)
class MethodRule:
    """What one method asks of its caller: scopes, and how it may be reached by delegation.

    A delegated token (RFC 8693, `Claims.actors` = the chain, nearest actor first) carries its
    subject's identity through services acting on its behalf. `max_delegation_depth` bounds
    that chain for this method (0: direct callers only; None: whatever authsvc issued, at most
    AUTHSVC_DELEGATION_MAX_DEPTH). `allowed_actors` names the services that may call this method
    on someone else's behalf: a delegated token is admitted only if its nearest actor (the
    service calling now, `actors[0]`) is one of them; None admits any. Tokens without
    delegation are not affected by either. A refusal is PERMISSION_DENIED: the token is valid,
    the chain is not allowed here.
    """

    scopes: tuple[str, ...] = ()
    max_delegation_depth: int | None = None
    allowed_actors: frozenset[str] | None = None

    def __init__(
        self,
        scopes: Sequence[str] = (),
        *,
        max_delegation_depth: int | None = None,
        allowed_actors: Iterable[str] | None = None,
    ) -> None:
        if isinstance(scopes, str):
            raise ValueError("scopes must be a sequence of scope names, not one string")
        if any(not isinstance(s, str) or not s for s in scopes):
            raise ValueError("scopes must be non-empty strings")
        if max_delegation_depth is not None and (
            isinstance(max_delegation_depth, bool)
            or not isinstance(max_delegation_depth, int)
            or max_delegation_depth < 0
        ):
            raise ValueError("max_delegation_depth must be an int >= 0 (0: direct callers only)")
        actors: frozenset[str] | None = None
        if allowed_actors is not None:
            if isinstance(allowed_actors, str):
                raise ValueError("allowed_actors must be a collection of service ids")
            actors = frozenset(allowed_actors)
            if any(not isinstance(a, str) or not a for a in actors):
                raise ValueError("allowed_actors must be non-empty service ids")
        object.__setattr__(self, "scopes", tuple(scopes))
        object.__setattr__(self, "max_delegation_depth", max_delegation_depth)
        object.__setattr__(self, "allowed_actors", actors)

    def refusal(self, claims: Claims) -> Denial | None:
        """Why this method refuses the (valid) caller, or None."""
        depth = len(claims.actors)
        if not depth:
            return None
        limit = self.max_delegation_depth
        if limit is not None and depth > limit:
            if limit == 0:
                return _DIRECT_ONLY
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                f"delegation chain of {depth} is longer than the {limit} this method allows",
            )
        if self.allowed_actors is not None and claims.actors[0] not in self.allowed_actors:
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{claims.actors[0]!r} may not call this method on another service's behalf",
            )
        return None

    def admit(self, outcome: Claims | Denial) -> Claims | Denial:
        """The interceptors' last step: a valid caller, unless this method refuses its chain
        (only a delegated token is looked at, so a direct call pays one attribute test)."""
        if isinstance(outcome, Claims) and outcome.actors:
            return self.refusal(outcome) or outcome
        return outcome


_DIRECT_ONLY = Denial(
    grpc.StatusCode.PERMISSION_DENIED, "this method takes direct callers only, not delegated tokens"
)


class MethodPolicy:
    """Which scopes and delegation each method allows; methods in no map and no public list
    are refused."""

    def __init__(
        self,
        method_scopes: Mapping[str, Sequence[str] | MethodRule],
        *,
        public_methods: Iterable[str] = (),
        public_services: Iterable[str] = DEFAULT_PUBLIC_SERVICES,
    ) -> None:
        """Args:
        method_scopes: full method name ("/pkg.Service/Method") -> the scopes it requires (an
            empty sequence: any authenticated caller of this audience), or a MethodRule for
            scopes plus delegation limits.
        public_methods: full method names served without a token.
        public_services: full service names ("pkg.Service") whose methods are all public.
        """
        for name in (*method_scopes, *public_methods):
            if not name.startswith("/") or name.count("/") != 2:
                raise ValueError(f"not a full method name: {name!r} (want '/pkg.Service/Method')")
        self._rules = {
            name: rule if isinstance(rule, MethodRule) else MethodRule(rule)
            for name, rule in method_scopes.items()
        }
        self._public_methods = frozenset(public_methods)
        self._public_services = frozenset(public_services)

    def is_public(self, method: str) -> bool:
        if method in self._public_methods:
            return True
        service = method[1:].split("/", 1)[0] if method.startswith("/") else ""
        return service in self._public_services

    def rule(self, method: str) -> MethodRule | None:
        """None: the method is not open to anyone."""
        return self._rules.get(method)

    def required_scopes(self, method: str) -> tuple[str, ...] | None:
        """None: the method is not open to anyone."""
        rule = self._rules.get(method)
        return None if rule is None else rule.scopes


def decide(result: ValidationResult) -> Denial | None:
    if result.valid:
        return None
    return _BY_REASON.get(result.reason, _invalid("MALFORMED"))


def admit(result: ValidationResult) -> Claims | Denial:
    """The caller's claims, or the denial a result means (sync and aio interceptors)."""
    denial = decide(result)
    if denial is not None or result.claims is None:
        return denial or _UNAVAILABLE
    return result.claims


def validate_sync(
    validator: Validator,
    token: str,
    scopes: Sequence[str],
    thumbprint: str | None = None,
    *,
    pass_thumbprint: bool = True,
) -> Claims | Denial:
    """Run a validator and turn every outcome, failures included, into claims or a denial."""
    try:
        if pass_thumbprint:
            result = validator.validate(
                token, required_scopes=scopes, client_cert_thumbprint=thumbprint
            )
        else:
            result = validator.validate(token, required_scopes=scopes)
    except ValidatorUnavailable:
        return _UNAVAILABLE
    except Exception:
        _LOG.exception("token validator failed; denying the call")
        return _UNAVAILABLE
    return admit(result)


# --- the one shape -> handler table ---------------------------------------------------------
# A handler's RPC shape, (request_streaming, response_streaming), names the attribute holding
# its behaviour and the factory that wraps a behaviour of that shape. Every interceptor of
# the package (sync and grpc.aio, auth and tracing) rebuilds handlers through these helpers.

Shape = tuple[bool, bool]

_HANDLER_KINDS: dict[Shape, tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}
SHAPES: tuple[Shape, ...] = tuple(_HANDLER_KINDS)


def shape_of(handler: Any) -> Shape:
    """A handler's shape; None (no such method) counts as unary."""
    if handler is None:
        return (False, False)
    return (bool(handler.request_streaming), bool(handler.response_streaming))


def behavior_of(handler: Any) -> Callable[..., Any]:
    """The application function a handler wraps."""
    return getattr(handler, _HANDLER_KINDS[shape_of(handler)][0])  # type: ignore[no-any-return]


def handler_for(shape: Shape, behavior: Callable[..., Any], **serdes: Any) -> grpc.RpcMethodHandler:
    return _HANDLER_KINDS[shape][1](behavior, **serdes)


def rebuild(handler: Any, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """`handler` with `behavior` instead of its own, same shape and (de)serializers."""
    return handler_for(
        shape_of(handler),
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def terminators(
    abort: Callable[[Denial], Callable[..., Any]],
) -> dict[Denial, dict[Shape, grpc.RpcMethodHandler]]:
    """Prebuilt refusals (as in grpc's examples): one handler per denial and per shape,
    each running `abort(denial)`."""
    return {
        denial: {shape: handler_for(shape, abort(denial)) for shape in SHAPES}
        for denial in ALL_DENIALS
    }


def _abort_behavior(denial: Denial) -> Callable[[Any, grpc.ServicerContext], Any]:
    def terminate(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(denial.code, denial.details)

    return terminate


_TERMINATORS = terminators(_abort_behavior)


def terminator(denial: Denial, handler: Any) -> grpc.RpcMethodHandler:
    return _TERMINATORS[denial][shape_of(handler)]


class AuthServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """For `grpc.server(..., interceptors=[AuthServerInterceptor(validator, {...})])`.

    Checks every call: a method must be public or in `method_scopes`, and then needs exactly
    one `authorization: Bearer <token>` value with a token the validator accepts for this
    service's audience and the method's scopes. Refusals go through prebuilt handlers that
    abort with UNAUTHENTICATED, PERMISSION_DENIED or, when the validator cannot decide,
    UNAVAILABLE; the interceptor itself never raises. Validation runs on the server's worker
    thread for the call (not on gRPC's polling thread), and the handler reads the caller
    with current_claims().

    `validator` is anything with the Validator protocol (RemoteValidator, LocalValidator, or
    the authsvc server's in-process verifier). A LocalValidator follows WatchRevocations as a
    registered service (its `token_source`, a token for audience "authsvc" with no scopes).

    Certificate-bound tokens (RFC 8705 section 3): the interceptor reads the verified client
    certificate of the call from gRPC's auth context (with a LocalValidator only when the
    token is bound), hands its thumbprint to the validator (LocalValidator checks it,
    RemoteValidator sends it in ValidateTokenRequest), and checks the accepted claims'
    `cert_thumbprint` against it once more itself. A bound token on a
    call without that certificate is refused UNAUTHENTICATED "invalid token:
    CERTIFICATE_MISMATCH"; unbound tokens are unaffected. Serve over mTLS
    (`grpc.ssl_server_credentials(..., require_client_auth=True)`) for bound tokens to work.

    `tls_terminated_upstream=True` is for a service behind a proxy that ends TLS (RFC 8705
    section 6.5): the client's certificate never reaches this process, and a certificate on
    the proxy's own connection is the proxy's, so none is read. Binding then cannot be
    checked and bound tokens are REFUSED (CERTIFICATE_MISMATCH), never accepted as bearer
    tokens: the interceptor logs one WARNING saying so when it is built. (A certificate passed
    on in a header by the proxy is not trusted.) Unbound tokens work as before.
    """

    def __init__(
        self,
        validator: Validator,
        method_scopes: Mapping[str, Sequence[str] | MethodRule],
        *,
        public_methods: Iterable[str] = (),
        public_services: Iterable[str] = DEFAULT_PUBLIC_SERVICES,
        tls_terminated_upstream: bool = False,
    ) -> None:
        self._validator = validator
        self.policy = MethodPolicy(
            method_scopes, public_methods=public_methods, public_services=public_services
        )
        self.binding = Binding(validator, tls_terminated_upstream=tls_terminated_upstream)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        try:
            return self._intercept(continuation, handler_call_details)
        except Exception:
            _LOG.exception("auth interceptor failed; denying the call")
            return terminator(_UNAVAILABLE, None)

    def _intercept(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        if self.policy.is_public(method):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        rule = self.policy.rule(method)
        if rule is None:
            return terminator(_NOT_ALLOWED, handler)
        token = bearer_token(details.invocation_metadata)
        if isinstance(token, Denial):
            return terminator(token, handler)
        return rebuild(handler, self._guarded(handler, token, rule))

    def _guarded(self, handler: Any, token: str, rule: MethodRule) -> Callable[..., Any]:
        behavior = behavior_of(handler)
        validator = self._validator
        binding = self.binding
        passes = binding.passes_thumbprint
        streaming_response = bool(handler.response_streaming)
        scopes = rule.scopes

        def check(thumbprint: str | None) -> Claims | Denial:
            return validate_sync(validator, token, scopes, thumbprint, pass_thumbprint=passes)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            outcome = rule.admit(binding.check_sync(check, context))
            if isinstance(outcome, Denial):
                return _abort_behavior(outcome)(request, context)
            # A copied context scopes the caller to this call, whatever thread runs it.
            ctx = contextvars.copy_context()
            ctx.run(_CALLER.set, (outcome, token))
            if not streaming_response:
                return ctx.run(behavior, request, context)
            return _run_iterator_in(ctx, ctx.run(behavior, request, context))

        return guarded


def _run_iterator_in(ctx: contextvars.Context, iterator: Any) -> Iterator[Any]:
    iterator = iter(iterator)
    while True:
        try:
            item = ctx.run(next, iterator)
        except StopIteration:
            return
        yield item
