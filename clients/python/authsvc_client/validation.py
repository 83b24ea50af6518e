"""Validators: ask authsvc (RemoteValidator) or verify locally from JWKS + WatchRevocations."""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import grpc

from authsvc_client.binding import thumbprint_matches
from authsvc_client.claims import DEFAULT_LEEWAY_SECONDS, Claims, ValidationResult
from authsvc_client.errors import TokenInvalid, ValidatorUnavailable, status_of
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.streaming import DEFAULT_STREAMS, StreamMux
from authsvc_client.tokens import TokenSource
from authsvc_client.unverified import unverified_payload
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.verifier import TokenVerifier, _delegation

__all__ = [
    "FOLLOWER_AUDIENCE",
    "FollowerToken",
    "LocalValidator",
    "RemoteValidator",
    "Validator",
    "insufficient_scope",
]

# The audience of the token a follower presents to WatchRevocations: authsvc's own name
# (AUTHSVC_SERVER_NAME on the server, default "authsvc"). Any registered service may get one
# without a scope.
FOLLOWER_AUDIENCE = "authsvc"

# What authenticates the revocation feed: a TokenSource for FOLLOWER_AUDIENCE, or any callable
# returning a bearer token for it (called at every (re)connect, from the follower's thread).
FollowerToken = TokenSource | Callable[[], str]

_LOG = logging.getLogger(__name__)

_INSUFFICIENT_SCOPE = ValidationResult.fail(auth_pb2.INSUFFICIENT_SCOPE)
_CERTIFICATE_MISMATCH = ValidationResult.fail(auth_pb2.CERTIFICATE_MISMATCH)
_MALFORMED = ValidationResult.fail(auth_pb2.MALFORMED)
_REVOKED = ValidationResult.fail(auth_pb2.REVOKED)
_SERVICE_DISABLED = ValidationResult.fail(auth_pb2.SERVICE_DISABLED)


@runtime_checkable
class Validator(Protocol):
    """Checks a bearer token for the audience the validator was built for.

    Returns a ValidationResult for every token (valid or not, with the reason); raises
    ValidatorUnavailable only when it cannot decide, which callers must treat as a denial.

    `client_cert_thumbprint` is the RFC 8705 `x5t#S256` of the verified client certificate
    the token arrived with (None without one): a certificate-bound token is valid only with
    its own, otherwise CERTIFICATE_MISMATCH; unbound tokens ignore it. (The interceptors also
    call validators written before it, without it, and then enforce the binding themselves.)
    """

    def validate(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult: ...


def insufficient_scope(claims: Claims, required_scopes: Sequence[str]) -> bool:
    """True when a required scope is missing from the token's granted scopes."""
    return any(scope not in claims.scopes for scope in required_scopes)


def _with_scopes(
    result: ValidationResult, required_scopes: Sequence[str], thumbprint: str | None = None
) -> ValidationResult:
    claims = result.claims
    if claims is None:
        return result
    # RFC 8705: a valid answer for a token bound to another certificate (a server that
    # ignored the thumbprint) is never passed on; the binding wins over the scopes, as in
    # the verifier.
    if claims.cert_thumbprint and not thumbprint_matches(claims.cert_thumbprint, thumbprint):
        return _CERTIFICATE_MISMATCH
    if insufficient_scope(claims, required_scopes):
        return _INSUFFICIENT_SCOPE
    return result


# A cache key: the SHA-256 of the exact token (with the client certificate's thumbprint, when
# the call presented one) and the scopes the answer was given for.
CacheKey = tuple[bytes, tuple[str, ...]]


class PositiveCache:
    """Valid answers from authsvc, by SHA-256 of the exact token and the required scopes, for
    at most `ttl` seconds and never past the token's own expiry. Only positive answers are
    kept (a denial is always asked again), and a hit is the very result object first
    returned: nothing is rebuilt or parsed again. Shared by the sync and asyncio remote
    validators."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        revocations: RevocationSet | None,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._revocations = revocations
        # key -> (the result, until when, the parent jtis of a delegated token, nearest first)
        self._entries: OrderedDict[CacheKey, tuple[ValidationResult, float, tuple[str, ...]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._ttl > 0 and self._max > 0

    @staticmethod
    def key(
        token: str, required_scopes: Sequence[str] = (), thumbprint: str | None = None
    ) -> CacheKey:
        """The key of an answer for `token` from a caller presenting the certificate
        `thumbprint` (None or "": none). A bound token's valid answer for one certificate is
        no answer for another, so the thumbprint is part of the digest: SHA-256 over the
        token's own 32-byte digest and the thumbprint, which no token's plain digest equals."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        if thumbprint:
            digest = hashlib.sha256(digest + thumbprint.encode("utf-8", "surrogatepass")).digest()
        return digest, tuple(required_scopes)

    def get(self, key: CacheKey, now: float) -> ValidationResult | None:
        found = self._entries.get(key)
        if found is None:
            return None
        result, until, parents = found
        claims = result.claims
        revocations = self._revocations
        revoked = (
            claims is not None
            and revocations is not None
            and (
                revocations.is_revoked(claims.jti, claims.subject, claims.issued_at)
                # A delegated token dies with its chain, as in the verifier (_check_chain).
                or (
                    bool(claims.actors)
                    and revocations.revoked_link(parents, claims.actors, claims.issued_at)
                    is not None
                )
            )
        )
        if now >= until or revoked:
            with self._lock:
                self._entries.pop(key, None)
            return None
        return result

    def put(self, key: CacheKey, result: ValidationResult, now: float, token: str) -> None:
        """Keep a valid answer for `token`. A delegated token's answer is kept with the jtis of
        the tokens it was exchanged from, read from its payload (authsvc has just verified it;
        the answer's claims do not carry them), so that revoking any of them drops it too; an
        answer whose chain cannot be read that way is not kept."""
        claims = result.claims
        if claims is None or not self.enabled:
            return
        until = min(now + self._ttl, float(claims.expires_at))
        if until <= now:
            return
        parents: tuple[str, ...] = ()
        if claims.actors:
            chain = _delegation_chain(token)
            if chain is None or chain[0] != claims.actors:
                return
            parents = chain[1]
        with self._lock:
            self._entries[key] = (result, until, parents)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _delegation_chain(token: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(actors, parent jtis) of a token's payload, read as the verifier reads them; None when
    the payload or its chain does not parse."""
    payload = unverified_payload(token)
    if payload is None:
        return None
    try:
        return _delegation(payload)
    except TokenInvalid:
        return None


def remote_error(exc: BaseException) -> ValidationResult:
    """Map a failed ValidateToken call, sync or grpc.aio: INVALID_ARGUMENT is the token's
    fault (empty, too long), anything else means authsvc could not decide, so deny as
    unavailable, naming the status.

    Raises:
        ValidatorUnavailable: any status but INVALID_ARGUMENT.
    """
    code = status_of(exc)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return _MALFORMED
    raise ValidatorUnavailable(f"authsvc ValidateToken failed: {code.name}") from None


class RemoteCore:
    """The network-free half of RemoteValidator and AsyncRemoteValidator: the cache lookup,
    the request, the deadline left for the unary fallback, and the mapping of an answer or a
    failure to a result. The two validators only move messages."""

    def __init__(
        self,
        audience: str,
        *,
        cache_ttl_seconds: float,
        cache_size: int,
        timeout_seconds: float,
        clock: Callable[[], float],
        revocations: RevocationSet | None,
    ) -> None:
        if not audience:
            raise ValueError("audience is required")
        self.audience = audience
        self.timeout = timeout_seconds
        self.clock = clock
        self.cache = PositiveCache(cache_ttl_seconds, cache_size, revocations)

    def lookup(
        self,
        token: str,
        required_scopes: Sequence[str],
        now: float,
        use_cache: bool,
        thumbprint: str | None = None,
    ) -> tuple[CacheKey | None, ValidationResult | None]:
        """(where to cache the answer, None when it must not be; the cached result or None).

        Raises:
            TypeError: required_scopes is a single str (as TokenVerifier.verify).
        """
        if isinstance(required_scopes, str):
            raise TypeError("required_scopes must be a sequence of scope names, not a str")
        if not use_cache or not self.cache.enabled:
            return None, None
        key = PositiveCache.key(token, required_scopes, thumbprint)
        return key, self.cache.get(key, now)

    def request(
        self, token: str, required_scopes: Sequence[str], thumbprint: str | None = None
    ) -> auth_pb2.ValidateTokenRequest:
        # The server checks the scopes and the certificate binding itself, so its
        # INSUFFICIENT_SCOPE and CERTIFICATE_MISMATCH (and which reason wins when several
        # apply) are the answers a LocalValidator gives. The same message travels on the
        # ValidateTokenStream mux and in the unary fallback.
        return auth_pb2.ValidateTokenRequest(
            token=token,
            audience=self.audience,
            required_scopes=required_scopes,
            client_cert_thumbprint=thumbprint or "",
        )

    def remaining(self, spent: float) -> float:
        """The deadline left for the unary call after `spent` seconds on a stream.

        Raises:
            ValidatorUnavailable: nothing is left.
        """
        remaining = self.timeout - spent
        if remaining <= 0:
            raise ValidatorUnavailable("authsvc ValidateToken: no answer within the deadline")
        return remaining

    def answer(
        self,
        key: CacheKey | None,
        response: auth_pb2.ValidateTokenResponse,
        required_scopes: Sequence[str],
        now: float,
        thumbprint: str | None = None,
        *,
        token: str,
    ) -> ValidationResult:
        """The result of authsvc's answer about `token`, cached under `key` when one is given."""
        # The local scope and binding checks stay as fail-closed backstops: a valid answer
        # lacking a required scope, or for a token bound to another certificate, is never
        # passed on, whatever the server did with the fields.
        result = _with_scopes(ValidationResult.from_proto(response), required_scopes, thumbprint)
        if key is not None:
            self.cache.put(key, result, now, token)
        return result

    def failed(self, exc: BaseException) -> ValidationResult:
        """Raises:
        ValidatorUnavailable: authsvc could not decide.
        """
        return remote_error(exc)

    def describe(self, kind: str) -> str:
        return f"{kind}(audience={self.audience!r}, cached={len(self.cache)})"


class RemoteValidator:
    """Validates by asking authsvc, with a small positive cache.

    By default checks travel over `streams` long-lived ValidateTokenStream calls shared by
    every thread (about a third of a unary call's server CPU), each check with its own
    deadline; a server without that RPC, or a stream that is reconnecting, gets unary
    ValidateToken instead (`streaming=False` always does). The required scopes and the
    caller's client certificate thumbprint travel with each check, so authsvc answers
    INSUFFICIENT_SCOPE and CERTIFICATE_MISMATCH exactly as a LocalValidator would.

    Fails closed: when authsvc is down or slower than `timeout_seconds`, validate() raises
    ValidatorUnavailable and interceptors answer UNAVAILABLE. Cached answers live at most
    `cache_ttl_seconds` (so a revocation takes effect within that bound), or are dropped at
    once when `follow_revocations` is on and the revocation arrives on the feed.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        audience: str,
        *,
        cache_ttl_seconds: float = 5.0,
        cache_size: int = 10_000,
        timeout_seconds: float = 2.0,
        follow_revocations: bool = False,
        token_source: FollowerToken | None = None,
        clock: Callable[[], float] = time.time,
        streaming: bool = True,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        """`token_source` authenticates the revocation feed when `follow_revocations` is on
        (see LocalValidator; None reads the AUTHSVC_SERVICE_* environment)."""
        revocations = RevocationSet() if follow_revocations else None
        self._core = RemoteCore(
            audience,
            cache_ttl_seconds=cache_ttl_seconds,
            cache_size=cache_size,
            timeout_seconds=timeout_seconds,
            clock=clock,
            revocations=revocations,
        )
        self.audience = audience
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self.streams = StreamMux(channel, streams=streams) if streaming else None
        self.feed: RevocationFollower | None = None
        if revocations is not None:
            self.feed = RevocationFollower(
                channel,
                revocations,
                token=token_source,
                clock=clock,
                on_disconnect=self._core.cache.clear,
            )
            self.feed.start()

    def validate(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult:
        """Raises:
        ValidatorUnavailable: authsvc did not answer in time (never read as valid).
        """
        core = self._core
        now = core.clock()
        use_cache = self.feed is None or self.feed.connected
        thumbprint = client_cert_thumbprint
        key, cached = core.lookup(token, required_scopes, now, use_cache, thumbprint)
        if cached is not None:
            return cached
        request = core.request(token, required_scopes, thumbprint)
        started = time.monotonic()
        response = None
        if self.streams is not None:
            response = self.streams.check(request, core.timeout)
        if response is None:
            remaining = core.remaining(time.monotonic() - started)
            try:
                response = self._stub.ValidateToken(request, timeout=remaining)
            except grpc.RpcError as exc:
                return core.failed(exc)
        return core.answer(key, response, required_scopes, now, thumbprint, token=token)

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()
        if self.feed is not None:
            self.feed.stop()

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)


# --- local validation ------------------------------------------------------------------------


class KeySetCache:
    """The last good JWK Set from GetJwks.

    A failed fetch keeps the previous ring. Fetches are single flight, and those triggered by
    an unknown kid (which comes from an untrusted token) run at most once per interval.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout_seconds: float,
        unknown_kid_interval_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._timeout = timeout_seconds
        self._interval = unknown_kid_interval_seconds
        self._clock = clock
        self.ring = KeyRing({})
        self.loaded = False
        self._fetch_lock = threading.Lock()
        self._generation = 0
        self._last_unknown_fetch = float("-inf")
        # GetJwks calls made because a token named a kid not in the ring. authsvc publishes a
        # key before it signs, so planned rotations leave this at 0; a rise means a compromise
        # rotation, a lead shorter than this cache's refresh period, or forged kids.
        self.unknown_kid_refetches = 0

    def current(self) -> KeyRing:
        return self.ring

    def refresh(self) -> bool:
        """Fetch the key set now (waiting for a fetch in flight instead of starting another)."""
        seen = self._generation
        with self._fetch_lock:
            if self._generation != seen:
                return True  # someone else fetched while we waited
            return self._fetch_locked()

    def _fetch_locked(self) -> bool:
        try:
            response = self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=self._timeout)
            ring = KeyRing.from_jwks_json(response.jwks_json)
        except (grpc.RpcError, ValueError) as exc:
            code = status_of(exc).name if isinstance(exc, grpc.RpcError) else type(exc).__name__
            _LOG.warning("GetJwks failed (%s); keeping the last good key set", code)
            return False
        self.ring = ring
        self.loaded = True
        self._generation += 1
        return True

    def on_unknown_kid(self, kid: str) -> KeyRing | None:
        if _NO_BLOCKING_FETCH.get():
            _FETCH_WANTED.set(True)
            return None
        seen = self._generation
        with self._fetch_lock:
            if self._generation != seen:
                return self.ring
            now = self._clock()
            if now - self._last_unknown_fetch < self._interval:
                return None
            self._last_unknown_fetch = now
            self.unknown_kid_refetches += 1
            return self.ring if self._fetch_locked() else None

    def fetch_allowed(self) -> bool:
        return self._clock() - self._last_unknown_fetch >= self._interval


# Set by the asyncio wrapper so that an unknown kid never blocks the event loop: the
# verifier then reports UNKNOWN_KEY and the wrapper retries in a worker thread.
_NO_BLOCKING_FETCH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "authsvc_no_blocking_fetch", default=False
)
_FETCH_WANTED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "authsvc_fetch_wanted", default=False
)


class FeedState:
    """Whether a revocation feed can be trusted, decided from what its I/O half reports;
    shared by the thread (RevocationFollower) and asyncio (aio.AsyncRevocationFollower)
    followers. Not thread-safe: the sync follower calls it under its lock.

    authsvc sends nothing on an idle stream, so silence is normal: health is the state of the
    stream, not the time of the last event. A stream counts as connected once an event
    arrived, or once it has stayed open for `settle_seconds` on a READY channel (a call that
    cannot reach authsvc fails well within that). Reconnects back off exponentially from
    `initial` to `maximum`, starting over after a stream that was connected.
    """

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        settle_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._initial = initial
        self._max = maximum
        self._settle = settle_seconds
        self._delay = initial
        self.channel_ready = False
        self._call_started: float | None = None  # monotonic; None while no call is open
        self._confirmed = False
        self._ever_connected = False
        self._down_since: float | None = None  # clock time the last connection was lost

    def opened(self) -> None:
        self._call_started = self._monotonic()

    def event(self) -> None:
        self._delay = self._initial
        if not self._confirmed:
            self.channel_ready = True  # an event proves it
            self._confirm()

    def channel(self, ready: bool, now: float) -> None:
        self.channel_ready = ready
        if not ready:
            self._lose(now)

    def closed(self, now: float) -> None:
        """The call ended (for whatever reason)."""
        if self._confirmed:
            self._delay = self._initial
        self._lose(now)
        self._call_started = None

    def retry_delay(self) -> float:
        """How long to wait before the next attempt; each call doubles the next one."""
        delay = self._delay
        self._delay = min(self._max, delay * 2)
        return delay

    def connected(self) -> bool:
        if self._call_started is None or not self.channel_ready:
            return False
        if not self._confirmed and self._monotonic() - self._call_started >= self._settle:
            self._confirm()
        return self._confirmed

    def outage_seconds(self, now: float) -> float:
        """0 while connected; how long the feed has been down otherwise (infinite before the
        first connection: until then revocations are unknown)."""
        if self._confirmed and self.channel_ready and self._call_started is not None:
            return 0.0  # connected: the common case, asked on every local validation
        if self.connected():
            return 0.0
        if not self._ever_connected or self._down_since is None:
            return float("inf")
        return max(0.0, now - self._down_since)

    def _confirm(self) -> None:
        self._confirmed = True
        self._ever_connected = True
        self._down_since = None

    def _lose(self, now: float) -> None:
        if self._confirmed:
            self._down_since = now
        self._confirmed = False


def feed_closed(code: grpc.StatusCode, stopping: bool) -> None:
    """Log why a revocation feed ended, unless it was closed on purpose."""
    if code is not grpc.StatusCode.CANCELLED or not stopping:
        _LOG.info("revocation feed closed (%s); reconnecting", code)


def no_feed_token(exc: BaseException) -> None:
    # The type only: a token callable's message is not ours to log.
    _LOG.info("no token for the revocation feed (%s); retrying", type(exc).__name__)


class RevocationFollower:
    """Follows WatchRevocations from the set's cursor on a daemon thread (see FeedState for
    when it counts as connected). After a disconnect it reconnects with after_cursor = the
    last cursor applied, so nothing is missed, and RevocationSet.add is idempotent, so nothing
    is applied twice.

    authsvc serves the feed only to a registered service: each (re)connect presents a bearer
    token for FOLLOWER_AUDIENCE from `token` (None: a TokenSource from the AUTHSVC_SERVICE_*
    environment, owned and closed here). The token is checked when the stream opens; a stream
    outlives it.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        revocations: RevocationSet,
        *,
        token: FollowerToken | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float],
        reconnect_initial_seconds: float = 0.1,
        reconnect_max_seconds: float = 2.0,
        settle_seconds: float = 0.25,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self._channel = channel
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self.revocations = revocations
        self._clock = clock
        self._state = FeedState(
            initial=reconnect_initial_seconds,
            maximum=reconnect_max_seconds,
            settle_seconds=settle_seconds,
        )
        self._on_disconnect = on_disconnect
        self._owned_source: TokenSource | None = None
        if token is None:
            # Raises CredentialsError naming the missing variable.
            token = self._owned_source = TokenSource.from_env(FOLLOWER_AUDIENCE, environ=environ)
        self._token: Callable[[], str] = token.token if isinstance(token, TokenSource) else token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: Any = None
        self.connects = 0
        self.events_applied = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._thread = threading.Thread(target=self._run, name="authsvc-revocations", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._channel.unsubscribe(self._on_connectivity)
        except (ValueError, AttributeError):
            pass
        if self._owned_source is not None:
            self._owned_source.close()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._state.connected()

    def outage_seconds(self, now: float) -> float:
        """0 while connected; how long the feed has been down otherwise (infinite before the
        first connection: until then revocations are unknown)."""
        with self._lock:
            return self._state.outage_seconds(now)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self._state.channel(state == grpc.ChannelConnectivity.READY, self._clock())

    def _run(self) -> None:
        state = self._state
        while not self._stop.is_set():
            try:
                bearer = self._token()
            except Exception as exc:
                no_feed_token(exc)
                with self._lock:
                    delay = state.retry_delay()
                self._stop.wait(delay)
                continue
            request = auth_pb2.WatchRevocationsRequest(after_cursor=self.revocations.cursor)
            call = self._stub.WatchRevocations(
                request, metadata=(("authorization", f"Bearer {bearer}"),)
            )
            with self._lock:
                self._call = call
                state.opened()
            if self._stop.is_set():
                call.cancel()
            self.connects += 1
            try:
                for event in call:
                    self.revocations.add(RevocationEntry.from_proto(event))
                    self.events_applied += 1
                    with self._lock:
                        state.event()
            except grpc.RpcError as exc:
                feed_closed(status_of(exc), self._stop.is_set())
            except Exception:
                _LOG.exception("revocation feed failed; reconnecting")
            with self._lock:
                state.closed(self._clock())
                self._call = None
                delay = state.retry_delay()
            if self._on_disconnect is not None:
                self._on_disconnect()
            self._stop.wait(delay)


class LocalValidator:
    """Verifies tokens in-process: keys from GetJwks, revocations from WatchRevocations.

    Fails closed (ValidatorUnavailable) while no key set has ever been loaded, and when the
    revocation feed has been disconnected for longer than `max_feed_outage_seconds` (or has
    not connected yet), because revocations could then be missing. A failed key fetch keeps
    the last good key set, so known keys keep working while authsvc is down.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        audience: str,
        issuer: str,
        *,
        max_feed_outage_seconds: float = 30.0,
        jwks_refresh_seconds: float = 30.0,
        unknown_kid_interval_seconds: float = 5.0,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        timeout_seconds: float = 5.0,
        cache_size: int = 10_000,
        prune_interval_seconds: float = 60.0,
        token_source: FollowerToken | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        start: bool = True,
    ) -> None:
        """Args:
        channel: a channel to authsvc, used from background threads. Configure keepalive
            on it so that a silently dead connection is noticed; its reconnect backoff
            (grpc.max_reconnect_backoff_ms) bounds how fast the feed resumes after an outage.
        audience: this service's own id; tokens for anyone else are WRONG_AUDIENCE.
        issuer: authsvc's issuer (AUTHSVC_ISSUER).
        max_feed_outage_seconds: the bound on how stale revocations may be.
        jwks_refresh_seconds: how often the key set is fetched again; it bounds how long a
            key revoked in an emergency (`revoke_previous`) keeps validating here. GetJwks is
            one small unary call, so the 30 s default costs a fleet little.
        unknown_kid_interval_seconds: at most one unknown-kid key fetch per interval.
        token_source: authenticates WatchRevocations, which authsvc serves only to registered
            services: a TokenSource for audience FOLLOWER_AUDIENCE (no scopes needed), or a
            callable returning such a bearer token. None builds one with
            TokenSource.from_env: AUTHSVC_TARGET and whichever login the environment sets
            (a secret, a signing key, a client certificate or a workload token file).
        environ: read instead of os.environ when `token_source` is None.
        start: start the background threads now (otherwise call start()).

        Raises:
            CredentialsError: no `token_source` and the environment lacks a variable.
        """
        if not audience or not issuer:
            raise ValueError("audience and issuer are required")
        self.audience = audience
        self._clock = clock
        self._max_outage = max_feed_outage_seconds
        self._jwks_every = jwks_refresh_seconds
        self._prune_every = prune_interval_seconds
        self.keys = KeySetCache(
            channel,
            timeout_seconds=timeout_seconds,
            unknown_kid_interval_seconds=unknown_kid_interval_seconds,
            clock=clock,
        )
        self.revocations = RevocationSet()
        self.feed = RevocationFollower(
            channel, self.revocations, token=token_source, environ=environ, clock=clock
        )
        self._verifier = TokenVerifier(
            keys=self.keys.current,
            revocations=self.revocations,
            issuer=issuer,
            leeway_seconds=leeway_seconds,
            cache_size=cache_size,
            clock=clock,
            on_unknown_kid=self.keys.on_unknown_kid,
        )
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        if self._maintenance is not None:
            return
        self.feed.start()
        self._maintenance = threading.Thread(
            target=self._maintain, name="authsvc-jwks", daemon=True
        )
        self._maintenance.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until keys are loaded and the revocation feed is connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.keys.loaded and self.feed.connected:
                return True
            if self._stop.wait(0.02):
                return False
        return False

    @property
    def healthy(self) -> bool:
        return self.keys.loaded and self.feed.outage_seconds(self._clock()) <= self._max_outage

    @property
    def unknown_kid_refetches(self) -> int:
        """How many times a token's unknown kid made this validator fetch the JWK Set (at
        most one per `unknown_kid_interval_seconds`). Zero across planned key rotations:
        authsvc publishes each key before it signs (KeySetCache.unknown_kid_refetches)."""
        return self.keys.unknown_kid_refetches

    def validate(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult:
        """Raises:
        ValidatorUnavailable: no key set loaded yet, or revocations may be stale.
        """
        if not self.keys.loaded:
            raise ValidatorUnavailable("no signing keys loaded from authsvc yet")
        if self.feed.outage_seconds(self._clock()) > self._max_outage:
            raise ValidatorUnavailable("revocation feed from authsvc is down")
        result = self._verifier.verify(
            token,
            audience=self.audience,
            required_scopes=required_scopes,
            client_cert_thumbprint=client_cert_thumbprint,
        )
        claims = result.claims
        if claims is not None and self.revocations.is_revoked(
            claims.jti, claims.subject, claims.issued_at
        ):
            # Belt and braces: the verifier checks this too.
            if self.revocations.is_disabled(claims.subject, claims.issued_at):
                return _SERVICE_DISABLED
            return _REVOKED
        return result

    def validate_nonblocking(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> tuple[ValidationResult, bool]:
        """As validate(), but never fetches keys: also says whether an unknown kid wants a
        fetch (then call validate() off the event loop)."""
        reset_block = _NO_BLOCKING_FETCH.set(True)
        reset_wanted = _FETCH_WANTED.set(False)
        try:
            result = self.validate(
                token,
                required_scopes=required_scopes,
                client_cert_thumbprint=client_cert_thumbprint,
            )
            wanted = _FETCH_WANTED.get() and self.keys.fetch_allowed()
        finally:
            _FETCH_WANTED.reset(reset_wanted)
            _NO_BLOCKING_FETCH.reset(reset_block)
        return result, wanted

    def close(self) -> None:
        self._stop.set()
        self.feed.stop()
        if self._maintenance is not None:
            self._maintenance.join(5)

    def __enter__(self) -> LocalValidator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LocalValidator(audience={self.audience!r}, keys={sorted(self.keys.ring.kids)!r}, "
            f"revocations={len(self.revocations)}, connected={self.feed.connected})"
        )

    def _maintain(self) -> None:
        next_jwks = 0.0
        next_prune = time.monotonic() + self._prune_every
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_jwks:
                ok = self.keys.refresh()
                # Until the first success retry quickly; after that, on schedule.
                next_jwks = now + (self._jwks_every if ok else min(1.0, self._jwks_every))
            if now >= next_prune:
                self.revocations.prune(self._clock())
                next_prune = now + self._prune_every
            self._stop.wait(max(0.05, min(next_jwks, next_prune) - time.monotonic()))
