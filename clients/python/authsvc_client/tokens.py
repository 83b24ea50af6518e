"""Token sources: get access tokens with IssueToken, cache them and refresh them ahead of expiry."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import grpc

from authsvc_client.errors import (
    AuthsvcClientError,
    CredentialsError,
    TokenRefused,
    TokenUnavailable,
    status_of,
)
from authsvc_client.logins import (
    ENV_SERVICE_ID,
    ENV_SERVICE_SECRET,
    ENV_SERVICE_SECRET_FILE,
    ENV_TARGET,
    EnvLogin,
    Login,
    LoginRequest,
    SecretLogin,
    credentials_from_env,
    login_from_env,
)
from authsvc_client.unverified import unverified_payload
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

__all__ = [
    "ENV_SERVICE_ID",
    "ENV_SERVICE_SECRET",
    "ENV_SERVICE_SECRET_FILE",
    "ENV_TARGET",
    "OWN_AUDIENCE",
    "AccessToken",
    "AsyncTokenSource",
    "EnvLogin",
    "TokenCallback",
    "TokenProvider",
    "TokenSource",
    "TokenState",
    "channel_for_target",
    "credentials_from_env",
    "login_from_env",
]

_LOG = logging.getLogger(__name__)


# The audience a source asks for to follow WatchRevocations: authsvc's own name.
OWN_AUDIENCE = "authsvc"

# Statuses after which retrying at once would only add load (or trip the server's throttling).
_BACKOFF_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# Statuses that mean "authsvc said no": asking again soon gets the same answer until an
# admin changes something, so these back off at the maximum at once.
_REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)

# The server's IssueToken refusal texts this client recognises (authsvc/server/servicer.py).
_AUDIENCE_DENIED = "audience not allowed for this service"
_SCOPE_DENIED_PREFIX = "scope not allowed for this service: "

# A callee's UNAUTHENTICATED drops a token only once it has been in use this long: a callee
# that rejects every token must not turn each call into an IssueToken.
_REACTIVE_MIN_AGE_SECONDS = 5.0

_NO_TOKEN = "no access token available"  # noqa: S105 - a message, not a secret
# Every token a refresh got was revoked before it arrived (a revoke-all, again and again):
# never handed out; the next call asks again.
_REVOKED_ON_ARRIVAL = "the new access token was revoked before it arrived"

TokenCallback = Callable[[str | None, AuthsvcClientError | None], None]


class TokenProvider(Protocol):
    """What call credentials need: hand over a token without ever blocking the caller."""

    def request(self, callback: TokenCallback) -> None: ...


class TokenState(enum.Enum):
    """google-auth's token states: FRESH is served, STALE is served while a refresh runs,
    INVALID (none, expired or about to) makes callers wait for a refresh."""

    FRESH = "fresh"
    STALE = "stale"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One issued token; times are on the source's clock, derived from `expires_in` so that
    skew between this host and authsvc does not matter."""

    value: str = field(repr=False)
    key_id: str
    scopes: tuple[str, ...]
    obtained_at: float
    refresh_at: float
    invalid_at: float
    expires_at: float
    # From the token's own claims (authsvc's clock): what revocation events are matched on.
    jti: str = ""
    issued_at: int | None = None

    def state(self, now: float) -> TokenState:
        if now >= self.invalid_at:
            return TokenState.INVALID
        if now >= self.refresh_at:
            return TokenState.STALE
        return TokenState.FRESH


class _Backoff:
    """Exponential backoff with full jitter on the upper half, reset by a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self._delay = 0.0
        self.not_before = 0.0

    def failed(self, now: float, *, refused: bool = False) -> None:
        if refused:
            self._delay = self._maximum
        else:
            self._delay = self._initial if self._delay == 0 else min(self._maximum, self._delay * 2)
        self.not_before = now + self._delay * (0.5 + 0.5 * self._rng.random())

    def succeeded(self) -> None:
        self._delay = 0.0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before


class _Plan(NamedTuple):
    """What a request for a token does now; decided by _Core.plan, carried out by a source.
    (A tuple: one is built for every call a source authenticates.)"""

    token: str | None  # serve this token now
    refresh: bool  # start a refresh (none is in flight and none is held back)
    error: AuthsvcClientError | None  # fail fast with this (backing off, or closed)
    # Otherwise (no token, no error) wait for the refresh in flight.


class _Core:
    """The network-free part shared by the sync and asyncio sources: request, schedule,
    state, the serve/refresh/wait/fail decision, revocations. The sources only do I/O."""

    def __init__(
        self,
        *,
        login: Login | None = None,
        service_id: str | None = None,
        service_secret: str | None = None,
        audience: str,
        scopes: Sequence[str],
        ttl_seconds: int,
        refresh_ratio: float,
        jitter_ratio: float,
        expiry_margin_seconds: float,
        timeout_seconds: float,
        backoff_initial_seconds: float,
        backoff_max_seconds: float,
        clock: Callable[[], float],
        rng: random.Random | None,
    ) -> None:
        if not audience:
            raise CredentialsError("audience must be non-empty")
        if not 0 < refresh_ratio < 1 or not 0 <= jitter_ratio < refresh_ratio:
            raise ValueError("need 0 <= jitter_ratio < refresh_ratio < 1")
        self.login = login = _login_of(service_id, service_secret, login)
        # Empty for a workload token that does not name its service: learnt from the first
        # token (its client_id), so that revocations of the service are recognised.
        self.service_id = login.service_id
        self.audience = audience
        self.scopes = tuple(scopes)
        self._ttl = ttl_seconds
        self._refresh_ratio = refresh_ratio
        self._jitter_ratio = jitter_ratio
        self._margin = expiry_margin_seconds
        self.timeout = timeout_seconds
        self.clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.backoff = _Backoff(backoff_initial_seconds, backoff_max_seconds, self._rng)
        self._backoff_bounds = (backoff_initial_seconds, backoff_max_seconds)
        self.token: AccessToken | None = None
        self.last_error: AuthsvcClientError | None = None
        # The latest revoked_before seen for this service: tokens issued before it are dead.
        self.cutoff = 0

    def request_message(self) -> LoginRequest:
        """The login method's request for this refresh (a fresh assertion, the token file
        as it is now).

        Raises:
            CredentialsError: the credential cannot be had now (see `credential_failed`).
        """
        return self.login.request(self.audience, self.scopes, self._ttl)

    def call(self, stub: Any) -> Any:
        """The stub's method this login calls (sync or grpc.aio stub alike)."""
        return getattr(stub, self.login.rpc.value)

    def credential_failed(self, exc: CredentialsError, now: float) -> TokenUnavailable:
        """A refresh that could not even build its request (a token file missing while the
        kubelet replaces it, say): kept as last_error and backed off like an outage, since
        it may well mend itself. The message names the variable, never the content."""
        error = TokenUnavailable(
            f"cannot log in to authsvc ({self.login.kind}) for audience {self.audience!r}: {exc}"
        )
        self.last_error = error
        self.backoff.failed(now)
        _LOG.warning("%s", error)
        return error

    def state(self, now: float) -> TokenState:
        return TokenState.INVALID if self.token is None else self.token.state(now)

    def plan(self, now: float, *, in_flight: bool, closed: bool) -> _Plan:
        """google-auth's rule: a FRESH token is served; a STALE one is served while one
        refresh runs; without a usable token callers wait for the single refresh in flight,
        or fail fast while backing off after a failure (instead of piling onto authsvc)."""
        can_start = not in_flight and not closed and self.backoff.ready(now)
        state = self.state(now)
        if state is not TokenState.INVALID and self.token is not None:
            return _Plan(self.token.value, state is TokenState.STALE and can_start, None)
        if in_flight or can_start:
            return _Plan(None, can_start, None)
        return _Plan(None, False, self.last_error or TokenUnavailable(_NO_TOKEN))

    def accept(self, response: auth_pb2.IssueTokenResponse, obtained_at: float) -> AccessToken:
        lifetime = max(float(response.expires_in), 0.0)
        # Refresh at ~80% of the lifetime, pulled earlier by up to jitter_ratio so that a fleet
        # started together does not refresh together.
        refresh_after = lifetime * (self._refresh_ratio - self._jitter_ratio * self._rng.random())
        # A token about to expire would die in flight: stop handing it out a little early.
        margin = min(self._margin, lifetime * (1 - self._refresh_ratio) / 2)
        jti, issued_at, client_id = _token_facts(response.access_token)
        if not self.service_id and client_id:
            self.service_id = client_id
        token = AccessToken(
            value=response.access_token,
            key_id=response.key_id,
            scopes=tuple(response.scopes),
            obtained_at=obtained_at,
            refresh_at=obtained_at + refresh_after,
            invalid_at=obtained_at + lifetime - margin,
            expires_at=obtained_at + lifetime,
            jti=jti,
            issued_at=issued_at,
        )
        self.token = token
        self.last_error = None
        self.backoff.succeeded()
        return token

    def reject(self, exc: grpc.RpcError, now: float) -> TokenUnavailable:
        code = status_of(exc)
        error: TokenUnavailable
        if code in _REFUSAL_CODES:
            error = TokenRefused(self._refusal(code, exc))
        else:
            error = TokenUnavailable(
                f"{self.login.rpc.value} for audience {self.audience!r} failed: {code.name}"
            )
        error.code = code
        self.last_error = error
        self.backoff.failed(now, refused=code in _REFUSAL_CODES)
        if code not in _BACKOFF_CODES:
            _LOG.warning("%s", error)
        return error

    def _refusal(self, code: grpc.StatusCode, exc: grpc.RpcError) -> str:
        # The server's details are never copied: the message must stay secret-free whatever
        # a proxy in between puts there. They are only compared with the texts authsvc
        # sends, and a scope is named only if this source asked for it. (grpc.aio's
        # AioRpcError has details() but is no grpc.Call.)
        details = exc.details() if callable(getattr(exc, "details", None)) else None
        details = details if isinstance(details, str) else ""
        who = repr(self.service_id) if self.service_id else "(bound to the workload token)"
        head = f"authsvc refused a token for service {who}, audience {self.audience!r}: {code.name}"
        if code is grpc.StatusCode.PERMISSION_DENIED:
            grantee = self.login.grantee
            if details == _AUDIENCE_DENIED:
                return f"{head} ({grantee} may not ask for audience {self.audience!r})"
            if details.startswith(_SCOPE_DENIED_PREFIX):
                named = details[len(_SCOPE_DENIED_PREFIX) :].split()
                denied = [scope for scope in self.scopes if scope in named]
                if denied:
                    return f"{head} ({grantee} lacks scope {' '.join(denied)!s})"
            return f"{head} ({grantee} may not have that audience or those scopes)"
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return f"{head} ({self.login.refused_hint()})"
        return head

    def watch_options(self, authsvc_audience: str) -> dict[str, Any]:
        """The arguments of the scopeless source (for authsvc's own audience) whose tokens
        authenticate this source's revocation feed; it follows nothing itself."""
        initial, maximum = self._backoff_bounds
        login = self.login
        # The same login (a fresh assertion, the token file re-read, the same certificate
        # on the shared channel); a secret login in its historical spelling.
        credentials: dict[str, Any] = (
            {"service_id": login.service_id, "service_secret": login.secret}
            if isinstance(login, SecretLogin)
            else {"login": login}
        )
        return {
            **credentials,
            "audience": authsvc_audience,
            "timeout_seconds": self.timeout,
            "backoff_initial_seconds": initial,
            "backoff_max_seconds": maximum,
            "clock": self.clock,
            "follow_revocations": False,
        }

    def follow(self) -> _Follow:
        """The decisions of one revocations-following loop, paced on the monotonic clock."""
        return _Follow(_Backoff(*self._backoff_bounds, self._rng))

    def apply(self, event: auth_pb2.RevocationEvent) -> bool:
        """Apply one WatchRevocations event; True when it killed the current token."""
        revoked_before = (
            int(event.revoked_before.seconds) if event.HasField("revoked_before") else None
        )
        dropped = self.revoked(event.jti, event.service_id, revoked_before)
        if dropped:
            _LOG.info("authsvc revoked the token for %r; fetching a new one", self.audience)
        return dropped

    def note_cutoff(self, revoked_before: int) -> None:
        """This service's tokens issued before `revoked_before` are revoked (a cutoff learnt
        elsewhere: the Delegator's feed, for a source made after the event)."""
        self.cutoff = max(self.cutoff, revoked_before)

    def revoked(self, jti: str, service_id: str, revoked_before: int | None) -> bool:
        """Apply one revocation event; True when it killed the current token."""
        if service_id == self.service_id and revoked_before is not None:
            self.note_cutoff(revoked_before)
        token = self.token
        if token is not None and self.is_dead(token, jti):
            self.token = None
            return True
        return False

    def is_dead(self, token: AccessToken, jti: str = "") -> bool:
        if jti and token.jti == jti:
            return True
        return token.issued_at is not None and token.issued_at < self.cutoff

    def dead_on_arrival(self, token: AccessToken) -> float | None:
        """None if `token` is good; else drop it and return how long to wait (seconds)
        before asking again: until authsvc's clock has passed the cutoff."""
        if not self.is_dead(token):
            return None
        self.token = None
        issued_at = token.issued_at if token.issued_at is not None else self.cutoff
        return min(max(float(self.cutoff - issued_at), 0.0), 2.0)

    def invalidate(self, value: str | None, now: float, *, reactive: bool = False) -> bool:
        """Drop the current token (only if it is `value`, when given); True if dropped."""
        token = self.token
        if token is None or (value is not None and token.value != value):
            return False
        if reactive and now - token.obtained_at < _REACTIVE_MIN_AGE_SECONDS:
            return False
        self.token = None
        return True

    def describe(self, kind: str) -> str:
        return (
            f"{kind}(service_id={self.service_id!r}, audience={self.audience!r}, "
            f"scopes={self.scopes!r}, {self.login.describe()})"
        )


class _Follow:
    """One source's WatchRevocations loop, minus the I/O: the cursor to resume from, the
    reconnect pacing, and what a failure means (each distinct reason logged once, not at
    every reconnect)."""

    def __init__(self, backoff: _Backoff) -> None:
        self._backoff = backoff
        self.cursor = 0
        self._reported: str | None = None

    def request(self) -> auth_pb2.WatchRevocationsRequest:
        return auth_pb2.WatchRevocationsRequest(after_cursor=self.cursor)

    def event(self, event: auth_pb2.RevocationEvent) -> None:
        self.cursor = max(self.cursor, int(event.cursor))
        self._backoff.succeeded()
        self._reported = None

    def rpc_failed(self, exc: BaseException) -> bool:
        """True when the bearer presented was refused (drop it before the next attempt)."""
        code = status_of(exc)
        self.failed(code.name)
        return code is grpc.StatusCode.UNAUTHENTICATED

    def failed(self, reason: str) -> None:
        if reason != self._reported:
            _LOG.warning("cannot follow authsvc revocations (retrying): %s", reason)
        self._reported = reason

    def delay(self, now: float) -> float:
        """How long to wait (monotonic seconds) before connecting again."""
        self._backoff.failed(now)
        return max(self._backoff.not_before - now, 0.0)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _token_facts(value: str) -> tuple[str, int | None, str]:
    """The jti, iat and client_id of a token this source just got from authsvc (read, not
    verified: they only decide when to drop it early, and which revocations are its own)."""
    payload = unverified_payload(value)
    if payload is None:
        return "", None, ""
    jti, iat, client_id = payload.get("jti", ""), payload.get("iat"), payload.get("client_id")
    return (
        jti if isinstance(jti, str) else "",
        iat if isinstance(iat, int) and not isinstance(iat, bool) else None,
        client_id if isinstance(client_id, str) else "",
    )


# --- configuration from the environment ------------------------------------------------------


def _login_of(service_id: str | None, service_secret: str | None, login: Login | None) -> Login:
    """The constructors' two spellings, one login: `login=` or the historical secret pair."""
    if login is not None:
        if service_id is not None or service_secret is not None:
            raise CredentialsError("pass either login= or service_id/service_secret, not both")
        return login
    return SecretLogin(service_id or "", service_secret or "")


def _is_local_target(target: str) -> bool:
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_for_target(
    target: str,
    channel_credentials: grpc.ChannelCredentials | None = None,
    *,
    asyncio_channel: bool = False,
) -> Any:
    """A channel to authsvc that never sends a secret in clear off this host.

    Loopback and Unix-socket targets get a plaintext channel unless credentials are given;
    any other target gets TLS with the system roots unless credentials are given.
    """
    module: Any = grpc.aio if asyncio_channel else grpc
    if channel_credentials is None and _is_local_target(target):
        return module.insecure_channel(target)
    creds = channel_credentials or grpc.ssl_channel_credentials()
    return module.secure_channel(target, creds)


# --- sync ------------------------------------------------------------------------------------


class _SourceBase:
    """What both sources share around the core: building one from the environment, the
    follower flag, invalidation, and the redacted repr. `_lock` guards the core: a
    threading.Lock in TokenSource, nothing in AsyncTokenSource (its loop serialises it)."""

    _core: _Core
    _watch: Any
    _owned_channel: Any
    _lock: contextlib.AbstractContextManager[Any]
    # Also handed every event this source follows (on its follower thread, or in its loop):
    # a Delegator's one feed for all the sources it keeps.
    _revocation_listeners: tuple[Callable[[auth_pb2.RevocationEvent], None], ...] = ()

    @classmethod
    def _from_env(
        cls,
        audience: str,
        scopes: Sequence[str],
        target: str | None,
        environ: Mapping[str, str] | None,
        channel_credentials: grpc.ChannelCredentials | None,
        options: dict[str, Any],
    ) -> Any:
        found = login_from_env(environ, target)
        channel = channel_for_target(
            found.target,
            channel_credentials or found.channel_credentials,
            asyncio_channel=cls is AsyncTokenSource,
        )
        source = cls(
            channel,  # type: ignore[call-arg]
            login=found.login,
            audience=audience,
            scopes=scopes,
            **options,
        )
        source._owned_channel = channel
        return source

    @property
    def audience(self) -> str:
        return self._core.audience

    @property
    def state(self) -> TokenState:
        with self._lock:
            return self._core.state(self._core.clock())

    def invalidate(self, token: str | None = None) -> bool:
        """Drop the cached token (only if it is still `token`, when given) so that the next
        call fetches a new one; True if it was dropped. For a token the callee refused.
        (AsyncTokenSource: call it in the loop.)"""
        with self._lock:
            return self._core.invalidate(token, self._core.clock())

    def _invalidate_refused(self, token: str) -> bool:
        # A callee's UNAUTHENTICATED: dropped only once the token has been in use a while.
        with self._lock:
            return self._core.invalidate(token, self._core.clock(), reactive=True)

    @property
    def following(self) -> bool:
        """Whether revocations of this service are followed (the stream is started lazily)."""
        return self._watch is not None

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)

    __str__ = __repr__


class TokenSource(_SourceBase):
    """Access tokens for one audience and scope set, shared by every call on a channel.

    `request()` never blocks (for call credentials); `token()` blocks until a usable token is
    there. However many callers ask at once, at most one IssueToken is in flight.
    Thread-safe.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        service_id: str | None = None,
        service_secret: str | None = None,
        login: Login | None = None,
        audience: str,
        scopes: Sequence[str] = (),
        ttl_seconds: int = 0,
        refresh_ratio: float = 0.8,
        jitter_ratio: float = 0.1,
        expiry_margin_seconds: float = 10.0,
        timeout_seconds: float = 5.0,
        backoff_initial_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        follow_revocations: bool = True,
        authsvc_audience: str = OWN_AUDIENCE,
    ) -> None:
        """Args:
        channel: a channel to authsvc (it is not closed by `close()`); for a
            CertificateLogin, one whose credentials present the client certificate.
        service_id, service_secret: this service's shared-secret credentials, or instead
        login: how to log in (`SecretLogin`, `AssertionLogin`, `CertificateLogin`,
            `WorkloadTokenLogin` from authsvc_client.logins); the revocation follower logs
            in the same way.
        audience, scopes: what the tokens are for; empty scopes ask for every allowed one.
        refresh_ratio, jitter_ratio: refresh after refresh_ratio minus up to jitter_ratio of
            the lifetime.
        expiry_margin_seconds: stop serving a token this long before it expires.
        clock: epoch seconds; injected by tests.
        follow_revocations: follow WatchRevocations (with a token for `authsvc_audience`,
            authsvc's own name) and drop this source's token as soon as it is revoked, so
            that a revoke-all of this service costs seconds, not the rest of the token's life.

        Raises:
            CredentialsError: empty id, secret or audience, or both `login` and a secret.
        """
        self._core = _Core(
            login=login,
            service_id=service_id,
            service_secret=service_secret,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            refresh_ratio=refresh_ratio,
            jitter_ratio=jitter_ratio,
            expiry_margin_seconds=expiry_margin_seconds,
            timeout_seconds=timeout_seconds,
            backoff_initial_seconds=backoff_initial_seconds,
            backoff_max_seconds=backoff_max_seconds,
            clock=clock,
            rng=rng,
        )
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._owned_channel: grpc.Channel | None = None
        self._lock: threading.Lock = threading.Lock()
        self._waiters: list[TokenCallback] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self._watch: TokenSource | None = None
        if follow_revocations:
            self._watch = TokenSource(channel, **self._core.watch_options(authsvc_audience))
        self._follower: threading.Thread | None = None
        self._follow_call: Any = None
        self._stopped = threading.Event()

    @classmethod
    def from_env(
        cls,
        audience: str,
        scopes: Sequence[str] = (),
        target: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        **options: Any,
    ) -> TokenSource:
        """Build a source from the environment: AUTHSVC_TARGET (unless `target` is given)
        and exactly one way to log in (`login_from_env`): a shared secret
        (AUTHSVC_SERVICE_SECRET or _FILE), a signing key (AUTHSVC_SERVICE_KEY_FILE with
        AUTHSVC_ISSUER), a client certificate (AUTHSVC_TLS_CLIENT_CERT + _KEY) or a workload
        token file (AUTHSVC_WORKLOAD_TOKEN_FILE); AUTHSVC_SERVICE_ID with all but the last.
        AUTHSVC_TLS_CA, when set, is the CA for authsvc's certificate. `channel_credentials`
        replaces whatever TLS the variables describe (then it must carry the client
        certificate itself for mTLS).

        Raises:
            CredentialsError: none or two ways configured, a variable missing, or a private
                file readable by group or others. The message names the variables, never
                their values.
        """
        source: TokenSource = cls._from_env(
            audience, scopes, target, environ, channel_credentials, options
        )
        return source

    def cached_token(self) -> str | None:
        """The current token if it can still be used, starting a refresh when it is due.

        Never blocks.
        """
        box: list[str | None] = []
        self._request(lambda token, _error: box.append(token), wait=False)
        return box[0] if box else None

    def request(self, callback: TokenCallback) -> None:
        """Call `callback(token, None)` now if a usable token is cached, otherwise when the
        refresh in flight ends (`callback(None, error)` if it fails). Never blocks; the
        callback may run on a worker thread."""
        self._request(callback, wait=True)

    def token(self, timeout: float | None = None) -> str:
        """A usable token, waiting for a refresh when none is cached.

        Raises:
            TokenUnavailable: authsvc refused or could not be reached (the message holds the
                status code name only), or no token came within the timeout.
        """
        done = threading.Event()
        box: list[tuple[str | None, AuthsvcClientError | None]] = []

        def deliver(token: str | None, error: AuthsvcClientError | None) -> None:
            box.append((token, error))
            done.set()

        self._request(deliver, wait=True)
        if not done.wait(self._core.timeout * 2 if timeout is None else timeout):
            raise TokenUnavailable("timed out waiting for an access token")
        token, error = box[0]
        if token is None:
            raise error or TokenUnavailable(_NO_TOKEN)
        return token

    def close(self) -> None:
        """Stop refreshing and following, and close the channel this source opened itself
        (from_env)."""
        with self._lock:
            self._closed = True
            worker = self._worker
            follower = self._follower
            follow_call = self._follow_call
        self._stopped.set()
        if follow_call is not None:
            follow_call.cancel()
        if worker is not None:
            worker.join(self._core.timeout + 1)
        if follower is not None:
            follower.join(self._core.timeout + 1)
        if self._watch is not None:
            self._watch.close()
        if self._owned_channel is not None:
            self._owned_channel.close()

    def __enter__(self) -> TokenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, callback: TokenCallback, *, wait: bool) -> None:
        immediate: tuple[str | None, AuthsvcClientError | None] | None = None
        with self._lock:
            plan = self._core.plan(
                self._core.clock(), in_flight=self._worker is not None, closed=self._closed
            )
            if plan.token is not None or plan.error is not None:
                immediate = (plan.token, plan.error)
            elif wait:
                self._waiters.append(callback)
            else:
                immediate = (None, None)
            if plan.refresh:
                self._worker = threading.Thread(
                    target=self._refresh, name="authsvc-token-refresh", daemon=True
                )
                self._worker.start()
                if self._watch is not None and self._follower is None:
                    self._follower = threading.Thread(
                        target=self._follow, name="authsvc-token-revocations", daemon=True
                    )
                    self._follower.start()
        if immediate is not None:
            callback(*immediate)

    def _refresh(self) -> None:
        core = self._core
        token: str | None = None
        error: AuthsvcClientError | None = None
        # Again (up to twice) only when the new token was already revoked: a revoke-all's
        # cutoff is the next whole second, and its event can arrive before that second has
        # begun on authsvc's clock, so the retry waits for it.
        for _attempt in range(3):
            try:
                response = core.call(self._stub)(core.request_message(), timeout=core.timeout)
            except CredentialsError as exc:
                with self._lock:
                    error = core.credential_failed(exc, core.clock())
            except grpc.RpcError as exc:
                with self._lock:
                    error = core.reject(exc, core.clock())
            except ValueError:
                # grpc's "Cannot invoke RPC on closed channel": nothing can work any more.
                with self._lock:
                    error = core.last_error = TokenUnavailable(_CHANNEL_CLOSED)
                    self._closed = True
                self._stopped.set()
            except Exception:  # a bug must not leave waiters hanging
                _LOG.exception("unexpected failure refreshing an authsvc token")
                with self._lock:
                    error = TokenUnavailable("IssueToken failed")
                    core.last_error = error
                    core.backoff.failed(core.clock())
            else:
                with self._lock:
                    accepted = core.accept(response, core.clock())
                    delay = core.dead_on_arrival(accepted)
                    if delay is None:
                        token, error = accepted.value, None
                    else:  # never handed out, even should the next attempt fail
                        token, error = None, TokenUnavailable(_REVOKED_ON_ARRIVAL)
                        core.last_error = error
                if delay is not None and not self._stopped.wait(delay):
                    continue
            break
        with self._lock:
            waiters, self._waiters = self._waiters, []
            self._worker = None
        for callback in waiters:
            try:
                callback(token, error)
            except Exception:
                _LOG.exception("token callback failed")

    def _revoked(self, event: auth_pb2.RevocationEvent) -> None:
        with self._lock:
            self._core.apply(event)
        if self._watch is not None:
            self._watch._revoked(event)
        for listener in self._revocation_listeners:
            listener(event)

    def _follow(self) -> None:
        watch = self._watch
        assert watch is not None
        follow = self._core.follow()
        while not self._stopped.is_set():
            bearer = ""
            try:
                bearer = watch.token()
                call = self._stub.WatchRevocations(follow.request(), metadata=_bearer(bearer))
                with self._lock:
                    if self._closed:
                        call.cancel()
                    self._follow_call = call
                for event in call:
                    follow.event(event)
                    self._revoked(event)
            except grpc.RpcError as exc:
                if self._stopped.is_set():
                    return
                if follow.rpc_failed(exc):
                    watch.invalidate(bearer)
            except AuthsvcClientError as exc:
                if watch._closed:  # its channel is closed
                    return
                follow.failed(str(exc))
            except ValueError:  # the channel is closed
                return
            except Exception:
                _LOG.exception("following authsvc revocations failed")
            self._stopped.wait(follow.delay(time.monotonic()))


# --- asyncio ---------------------------------------------------------------------------------


_CHANNEL_CLOSED = "the channel to authsvc is closed"

_NO_LOOP = (
    "AsyncTokenSource is not bound to an event loop: create it inside the running loop "
    "(in an async function), or use it there once (`async with source` or "
    "`await source.token()`) before the first call"
)
_LOOP_CLOSED = "AsyncTokenSource's event loop is closed: create a new source in the running loop"


def _retrieve_exception(task: asyncio.Task[str]) -> None:
    # A background refresh may fail with nobody awaiting it; the failure is kept in
    # last_error, so asyncio need not report it as never retrieved.
    if not task.cancelled():
        task.exception()


class AsyncTokenSource(_SourceBase):
    """The asyncio twin of TokenSource, over a `grpc.aio` channel.

    Bound to the event loop it is first used on. `request()` may be called from any thread
    (call credentials run on gRPC threads).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        service_id: str | None = None,
        service_secret: str | None = None,
        login: Login | None = None,
        audience: str,
        scopes: Sequence[str] = (),
        ttl_seconds: int = 0,
        refresh_ratio: float = 0.8,
        jitter_ratio: float = 0.1,
        expiry_margin_seconds: float = 10.0,
        timeout_seconds: float = 5.0,
        backoff_initial_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        follow_revocations: bool = True,
        authsvc_audience: str = OWN_AUDIENCE,
    ) -> None:
        """Arguments as for TokenSource; `channel` is a grpc.aio channel. Created inside a
        running event loop, the source binds to that loop at once, so call credentials work
        from the first call."""
        self._core = _Core(
            login=login,
            service_id=service_id,
            service_secret=service_secret,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            refresh_ratio=refresh_ratio,
            jitter_ratio=jitter_ratio,
            expiry_margin_seconds=expiry_margin_seconds,
            timeout_seconds=timeout_seconds,
            backoff_initial_seconds=backoff_initial_seconds,
            backoff_max_seconds=backoff_max_seconds,
            clock=clock,
            rng=rng,
        )
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._owned_channel: grpc.aio.Channel | None = None
        self._lock = contextlib.nullcontext()
        self._task: asyncio.Task[str] | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._closed = False
        self._watch: AsyncTokenSource | None = None
        if follow_revocations:
            self._watch = AsyncTokenSource(channel, **self._core.watch_options(authsvc_audience))
        self._follower: asyncio.Task[None] | None = None

    @classmethod
    def from_env(
        cls,
        audience: str,
        scopes: Sequence[str] = (),
        target: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        **options: Any,
    ) -> AsyncTokenSource:
        """As TokenSource.from_env, with a grpc.aio channel. Call it inside the event loop."""
        source: AsyncTokenSource = cls._from_env(
            audience, scopes, target, environ, channel_credentials, options
        )
        return source

    def cached_token(self) -> str | None:
        """The current token if usable, starting a refresh when due. Call it in the loop."""
        return self._plan().token

    async def token(self) -> str:
        """A usable token, awaiting the single refresh in flight when none is cached.

        Raises:
            TokenUnavailable: authsvc refused or could not be reached.
        """
        plan = self._plan()
        if plan.token is not None:
            return plan.token
        if plan.error is not None:
            raise plan.error
        assert self._task is not None
        # shield: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(self._task)

    def request(self, callback: TokenCallback) -> None:
        """Thread-safe, never blocks: as TokenSource.request."""
        core = self._core
        token = core.token
        if token is not None and token.state(core.clock()) is TokenState.FRESH:
            callback(token.value, None)
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None and running is not None:
            self._loop = running
        loop = self._loop
        if loop is None or loop.is_closed():
            if token is not None and token.state(core.clock()) is TokenState.STALE:
                callback(token.value, None)
            else:
                callback(None, TokenUnavailable(_NO_LOOP if loop is None else _LOOP_CLOSED))
            return
        in_loop = running is loop
        if in_loop:
            self._request_in_loop(callback)
        else:
            loop.call_soon_threadsafe(self._request_in_loop, callback)

    async def close(self) -> None:
        """Stop refreshing and following, and close the channel this source opened itself
        (from_env)."""
        self._closed = True
        for task in (self._task, self._follower):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, AuthsvcClientError):
                    pass
        if self._watch is not None:
            await self._watch.close()
        if self._owned_channel is not None:
            await self._owned_channel.close()

    async def __aenter__(self) -> AsyncTokenSource:
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _request_in_loop(self, callback: TokenCallback) -> None:
        plan = self._plan()
        if plan.token is not None or plan.error is not None:
            callback(plan.token, plan.error)
            return
        assert self._task is not None

        def done(finished: asyncio.Task[str]) -> None:
            if finished.cancelled():
                callback(None, TokenUnavailable("token refresh was cancelled"))
                return
            exc = finished.exception()
            if exc is None:
                callback(finished.result(), None)
            elif isinstance(exc, AuthsvcClientError):
                callback(None, exc)
            else:
                callback(None, TokenUnavailable("IssueToken failed"))

        self._task.add_done_callback(done)

    def _plan(self) -> _Plan:
        """The core's decision, with the refresh it calls for started. In the loop only."""
        task = self._task
        plan = self._core.plan(
            self._core.clock(),
            in_flight=task is not None and not task.done(),
            closed=self._closed,
        )
        if plan.refresh:
            loop = asyncio.get_running_loop()
            self._loop = loop
            task = loop.create_task(self._refresh(), name="authsvc-token-refresh")
            task.add_done_callback(_retrieve_exception)
            self._task = task
            if self._watch is not None and self._follower is None:
                self._follower = loop.create_task(self._follow(), name="authsvc-token-revocations")
        return plan

    async def _refresh(self) -> str:
        core = self._core
        # As TokenSource._refresh: again once if the token was revoked before it arrived.
        for _attempt in range(3):
            try:
                response = await core.call(self._stub)(core.request_message(), timeout=core.timeout)
            except CredentialsError as exc:
                raise core.credential_failed(exc, core.clock()) from None
            except grpc.RpcError as exc:
                raise core.reject(exc, core.clock()) from None
            except grpc.aio.UsageError:
                self._closed = True
                core.last_error = TokenUnavailable(_CHANNEL_CLOSED)
                raise core.last_error from None
            accepted = core.accept(response, core.clock())
            delay = core.dead_on_arrival(accepted)
            if delay is None:
                return accepted.value
            if self._closed:
                break
            await asyncio.sleep(delay)
        core.last_error = TokenUnavailable(_REVOKED_ON_ARRIVAL)
        raise core.last_error

    def _revoked(self, event: auth_pb2.RevocationEvent) -> None:
        self._core.apply(event)
        if self._watch is not None:
            self._watch._revoked(event)
        for listener in self._revocation_listeners:
            listener(event)

    async def _follow(self) -> None:
        watch = self._watch
        assert watch is not None
        follow = self._core.follow()
        while not self._closed:
            bearer = ""
            try:
                bearer = await watch.token()
                call = self._stub.WatchRevocations(follow.request(), metadata=_bearer(bearer))
                async for event in call:
                    follow.event(event)
                    self._revoked(event)
            except grpc.RpcError as exc:
                if follow.rpc_failed(exc):
                    watch.invalidate(bearer)
            except AuthsvcClientError as exc:
                if watch._closed:  # its channel is closed
                    return
                follow.failed(str(exc))
            except grpc.aio.UsageError:  # the channel is closed
                return
            except Exception:
                _LOG.exception("following authsvc revocations failed")
            await asyncio.sleep(follow.delay(time.monotonic()))
