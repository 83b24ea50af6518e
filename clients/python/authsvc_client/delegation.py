"""Calling the next service on the current caller's behalf (RFC 8693 delegation).

Inside a handler behind `AuthServerInterceptor`, `front` called `orders`, and `orders` must now
call `billing` for `front`. Forwarding front's token would not work (it is addressed to orders,
maybe bound to front's certificate) and must not (billing would mistake orders for front). A
Delegator exchanges the incoming token at authsvc (`ExchangeToken`, subject_token_type
access_token), logging in as this service, the actor, with its own credential; the new token
keeps `sub` = front, is addressed to billing and names orders in `act`. billing's interceptor
hands its handler the chain (`current_claims().actors`, nearest actor first).

Each (incoming token, audience, scopes) gets its own token source, so the exchanged token is
cached and refreshed like any other (at ~80% of its life, one exchange in flight however many
handler threads ask, backing off after a failure). The cache is keyed by the SHA-256 of the
incoming token, never the token, and bounded: entries whose incoming token has expired go
first, then the least recently used. An exchanged token never outlives the incoming one
(authsvc caps its `exp`), and when the incoming token is revoked, so is every token derived
from it (authsvc's `parent_jtis` chain). The other way round matters too: an exchanged token
revoked while the incoming one is still good (its jti, or every token of this service: the
usual first step after a leak) must not be handed out again. So a Delegator follows
WatchRevocations, one feed for all the sources it keeps, as a TokenSource does for itself:
a revoked exchanged token is dropped at once and the next call exchanges again.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import grpc

from authsvc_client.claims import ACCESS_TOKEN_TYPE
from authsvc_client.errors import CredentialsError
from authsvc_client.interceptors import incoming_token
from authsvc_client.logins import Login, LoginRequest, Rpc, login_from_env
from authsvc_client.tokens import (
    OWN_AUDIENCE,
    AsyncTokenSource,
    TokenSource,
    _bearer,
    channel_for_target,
)
from authsvc_client.unverified import unverified_payload
from authsvc_client.v1 import auth_pb2

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "AsyncDelegator",
    "DelegationLogin",
    "Delegator",
    "check_actor",
]

DEFAULT_MAX_ENTRIES = 1024

_NO_INCOMING = (
    "no incoming token to delegate: call inside a handler behind AuthServerInterceptor (or "
    "pass subject_token=)"
)


def check_actor(login: Login) -> None:
    """Raises CredentialsError for a login that cannot act: a federated workload token says
    who a workload is to authsvc (it is itself exchanged), not which service is acting."""
    if login.rpc is not Rpc.ISSUE_TOKEN:
        raise CredentialsError(
            f"a {login.kind} login cannot act on another service's behalf: delegate with a "
            "secret, a signing key or a client certificate"
        )


class DelegationLogin(Login):
    """ExchangeToken with a subject token, authenticated by the actor's own login (its secret,
    a fresh assertion, or the client certificate of the channel)."""

    rpc = Rpc.EXCHANGE_TOKEN
    kind = "delegation"
    # A delegated token gets no more than both the caller's and the actor's grants.
    grantee = "the caller or this service"

    def __init__(self, actor: Login, subject_token: str) -> None:
        check_actor(actor)
        if not subject_token:
            raise CredentialsError("the subject token to delegate is empty")
        self.actor = actor
        self._subject = subject_token

    @property
    def service_id(self) -> str:
        return self.actor.service_id

    def request(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int
    ) -> auth_pb2.ExchangeTokenRequest:
        own: LoginRequest = self.actor.request(audience, scopes, ttl_seconds)
        assert isinstance(own, auth_pb2.IssueTokenRequest)  # checked in __init__
        return auth_pb2.ExchangeTokenRequest(
            subject_token=self._subject,
            subject_token_type=ACCESS_TOKEN_TYPE,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            service_id=own.service_id,
            service_secret=own.service_secret,
            client_assertion=own.client_assertion,
        )

    def refused_hint(self) -> str:
        return (
            "the incoming token is no longer valid (expired, revoked, its service disabled) or "
            "is not addressed to this service, the audience or scopes are not granted to both "
            "the caller and this service, the chain is at authsvc's depth limit, or this "
            f"service's own login failed ({self.actor.refused_hint()})"
        )

    def describe(self) -> str:
        return f"delegation(actor={self.actor.describe()})"


_Key = tuple[bytes, str, tuple[str, ...]]
# Builds a TokenSource or an AsyncTokenSource for (subject token, audience, scopes).
_Make = Callable[[str, str, tuple[str, ...]], Any]


class _Sources:
    """The bounded map (SHA-256 of incoming token, audience, scopes) -> token source, shared
    by the sync and asyncio delegators. Thread-safe; building a source does no I/O."""

    def __init__(
        self,
        make: _Make,
        max_entries: int,
        clock: Callable[[], float],
        seed: Callable[[Any], None] | None = None,
    ) -> None:
        """`seed`: called with each new source once it is in the map (see _DelegatorBase)."""
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._make = make
        self._seed = seed
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, subject: str, audience: str, scopes: Sequence[str]) -> Any:
        if not audience:
            raise CredentialsError("audience must be non-empty")
        wanted = tuple(sorted(set(scopes)))
        key = (hashlib.sha256(subject.encode()).digest(), audience, wanted)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        # Outside the lock: DelegationLogin checks its inputs; a source costs no I/O.
        source = self._make(subject, audience, wanted)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # another thread won the race: one source per key
                return entry[0]
            self._make_room()
            self._entries[key] = (source, _expiry(subject))
        if self._seed is not None:
            # After it is in the map: an event the feed applies from here on reaches the
            # source through revoked(), and one applied before is in what seed reads.
            self._seed(source)
        return source

    def _make_room(self) -> None:
        if len(self._entries) < self._max:
            return
        now = self._clock()
        for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
            del self._entries[key]
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)

    def revoked(self, event: auth_pb2.RevocationEvent) -> None:
        """The Delegator's feed: each source drops its token if the event revoked it."""
        with self._lock:
            sources = [source for source, _ in self._entries.values()]
        for source in sources:
            source._revoked(event)

    def drain(self) -> list[Any]:
        with self._lock:
            sources = [source for source, _ in self._entries.values()]
            self._entries.clear()
        return sources


def _expiry(token: str) -> float:
    """The incoming token's `exp` (it was validated by the interceptor; here it only orders
    eviction), or 0 so that an unreadable one is evicted first."""
    payload = unverified_payload(token)
    exp = payload.get("exp") if payload is not None else None
    return float(exp) if isinstance(exp, int) and not isinstance(exp, bool) else 0.0


def _subject(subject_token: str | None) -> str:
    subject = subject_token if subject_token is not None else incoming_token()
    if not subject:
        raise CredentialsError(_NO_INCOMING)
    return subject


class _DelegatorBase:
    """Construction and the cache, shared by Delegator and AsyncDelegator; the subclasses
    differ in the token source they build and in being awaited."""

    _source_type: ClassVar[type[TokenSource] | type[AsyncTokenSource]]
    _asyncio_channel: ClassVar[bool]
    _owned_channel: Any = None

    def __init__(
        self,
        channel: Any,
        *,
        login: Login,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        follow_revocations: bool = True,
        **source_options: Any,
    ) -> None:
        """Args:
        channel: a channel to authsvc (grpc, or grpc.aio for AsyncDelegator; not closed by
            `close()`); for a CertificateLogin, one presenting this service's client
            certificate (the exchanged token is then bound to it, RFC 8705).
        login: this service's own login (SecretLogin, AssertionLogin, CertificateLogin).
        max_entries: at most this many (incoming token, audience, scopes) sources are kept.
        follow_revocations: follow WatchRevocations (one stream, with this service's own
            token for `authsvc_audience`, default "authsvc") and drop a revoked exchanged
            token at once; off, one stays in use until its refresh point.
        source_options: passed to each token source (ttl_seconds, refresh_ratio,
            timeout_seconds, backoff_…, authsvc_audience); the sources themselves follow
            nothing: the Delegator's one feed serves them all.

        Raises:
            CredentialsError: a login that cannot act (a workload token).
        """
        check_actor(login)  # now, not at the first call
        self.login = login
        options = {**source_options, "follow_revocations": False, "clock": clock}
        source_type = self._source_type

        def make(subject: str, audience: str, scopes: tuple[str, ...]) -> Any:
            return source_type(
                channel,
                login=DelegationLogin(login, subject),
                audience=audience,
                scopes=scopes,
                **options,
            )

        def seed(source: Any) -> None:
            # A revoke-all of this service ends at the next whole second, so an exchange made
            # after its event, within that second, gets a token that is already revoked: a
            # new source starts from the cutoff the feed has seen, as the older sources have.
            if self._feed is not None:
                source._core.note_cutoff(self._feed._core.cutoff)

        self._sources = _Sources(make, max_entries, clock, seed)
        # The feed: a source of this service's own for authsvc's audience, whose follower
        # hands every event to the sources above as well; started by the first token asked.
        self._feed: Any = None
        self._feed_started = False
        if follow_revocations:
            shared = ("timeout_seconds", "backoff_initial_seconds", "backoff_max_seconds")
            feed_audience = source_options.get("authsvc_audience", OWN_AUDIENCE)
            self._feed = source_type(
                channel,
                login=login,
                audience=feed_audience,
                authsvc_audience=feed_audience,
                clock=clock,
                follow_revocations=True,
                **{k: v for k, v in source_options.items() if k in shared},
            )
            self._feed._revocation_listeners = (self._sources.revoked,)

    def _start_feed(self) -> None:
        """Start following (once; in the loop for AsyncDelegator). cached_token() never
        blocks: it starts the feed source's first login and its follower."""
        if self._feed is not None and not self._feed_started:
            self._feed_started = True
            self._feed.cached_token()

    @classmethod
    def _from_env(
        cls,
        target: str | None,
        environ: Mapping[str, str] | None,
        channel_credentials: grpc.ChannelCredentials | None,
        options: dict[str, Any],
    ) -> Any:
        found = login_from_env(environ, target)
        check_actor(found.login)
        channel = channel_for_target(
            found.target,
            channel_credentials or found.channel_credentials,
            asyncio_channel=cls._asyncio_channel,
        )
        delegator = cls(channel, login=found.login, **options)
        delegator._owned_channel = channel
        return delegator

    @property
    def cached_entries(self) -> int:
        """How many (incoming token, audience, scopes) sources are held now."""
        return len(self._sources)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(actor={self.login!r}, entries={len(self._sources)})"


class Delegator(_DelegatorBase):
    """Tokens for calling the next service on the current caller's behalf, from sync handlers.

    One per process and actor, shared by all handler threads. Thread-safe.
    """

    _source_type = TokenSource
    _asyncio_channel = False

    @classmethod
    def from_env(
        cls,
        target: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        **options: Any,
    ) -> Delegator:
        """This service's login and authsvc's address from the environment, as
        TokenSource.from_env reads them (`login_from_env`); the channel is closed by close().

        Raises:
            CredentialsError: as login_from_env, or a workload-token login.
        """
        delegator: Delegator = cls._from_env(target, environ, channel_credentials, options)
        return delegator

    def token(
        self,
        audience: str,
        scopes: Sequence[str] = (),
        *,
        subject_token: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """A token for `audience` carrying the current caller (or `subject_token`'s subject)
        with this service as its nearest actor; blocks only when none is cached.

        Raises:
            CredentialsError: no incoming call (outside a handler), or an empty audience.
            TokenRefused: authsvc refused the exchange (its reason is in the message).
            TokenUnavailable: authsvc could not be reached, or no token within the timeout.
        """
        source: TokenSource = self._sources.get(_subject(subject_token), audience, scopes)
        self._start_feed()
        return source.token(timeout)

    def metadata(
        self,
        audience: str,
        scopes: Sequence[str] = (),
        *,
        subject_token: str | None = None,
        timeout: float | None = None,
    ) -> tuple[tuple[str, str]]:
        """`metadata=` for the next call: `(("authorization", "Bearer …"),)`."""
        return _bearer(self.token(audience, scopes, subject_token=subject_token, timeout=timeout))

    def close(self) -> None:
        """Stop every source and close the channel opened by from_env."""
        for source in self._sources.drain():
            source.close()
        if self._feed is not None:
            self._feed.close()
        if self._owned_channel is not None:
            self._owned_channel.close()

    def __enter__(self) -> Delegator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDelegator(_DelegatorBase):
    """The grpc.aio twin of Delegator, for coroutine handlers behind AsyncAuthServerInterceptor;
    use it inside the event loop its channel belongs to."""

    _source_type = AsyncTokenSource
    _asyncio_channel = True

    @classmethod
    def from_env(
        cls,
        target: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        **options: Any,
    ) -> AsyncDelegator:
        """As Delegator.from_env, with a grpc.aio channel. Call it inside the event loop."""
        delegator: AsyncDelegator = cls._from_env(target, environ, channel_credentials, options)
        return delegator

    async def token(
        self, audience: str, scopes: Sequence[str] = (), *, subject_token: str | None = None
    ) -> str:
        """As Delegator.token (the current caller is read from the coroutine's context)."""
        source: AsyncTokenSource = self._sources.get(_subject(subject_token), audience, scopes)
        self._start_feed()
        return await source.token()

    async def metadata(
        self, audience: str, scopes: Sequence[str] = (), *, subject_token: str | None = None
    ) -> tuple[tuple[str, str]]:
        """`metadata=` for the next call: `(("authorization", "Bearer …"),)`."""
        return _bearer(await self.token(audience, scopes, subject_token=subject_token))

    async def close(self) -> None:
        """Stop every source and close the channel opened by from_env."""
        for source in self._sources.drain():
            await source.close()
        if self._feed is not None:
            await self._feed.close()
        if self._owned_channel is not None:
            await self._owned_channel.close()
