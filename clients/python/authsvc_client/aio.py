"""asyncio variants: grpc.aio client interceptors, remote validator and its revocation feed,
server interceptor."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, Protocol, runtime_checkable

import grpc

from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.credentials import (
    aio_client_details,
    aio_client_interceptors,
    failure_status,
    with_bearer,
)
from authsvc_client.errors import AuthsvcClientError, ValidatorUnavailable, status_of
from authsvc_client.interceptors import (
    _CALLER,
    _MISMATCH,
    _NOT_ALLOWED,
    _UNAVAILABLE,
    DEFAULT_PUBLIC_SERVICES,
    Binding,
    Caller,
    Denial,
    MethodPolicy,
    MethodRule,
    admit,
    bearer_token,
    behavior_of,
    rebuild,
    shape_of,
    terminators,
)
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.streaming import DEFAULT_STREAMS, AsyncStreamMux
from authsvc_client.tokens import AsyncTokenSource
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import (
    FOLLOWER_AUDIENCE,
    FeedState,
    LocalValidator,
    RemoteCore,
    RemoteValidator,
    Validator,
    feed_closed,
    no_feed_token,
)

__all__ = [
    "AsyncAuthServerInterceptor",
    "AsyncFollowerToken",
    "AsyncRemoteValidator",
    "AsyncRevocationFollower",
    "AsyncTokenSource",
    "AsyncValidator",
    "bearer_interceptors",
]

_LOG = logging.getLogger(__name__)


# --- client ----------------------------------------------------------------------------------


class _Bearer:
    # As BearerTokenInterceptor: the token awaited before the call, and one retry with a new
    # token after the callee's UNAUTHENTICATED, for unary calls only.
    def __init__(self, source: AsyncTokenSource) -> None:
        self._source = source

    async def _token(self) -> str:
        try:
            return await self._source.token()
        except AuthsvcClientError as exc:
            raise grpc.aio.AioRpcError(
                failure_status(exc),
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details=str(exc),
            ) from None

    def _details(self, details: grpc.aio.ClientCallDetails, token: str) -> Any:
        return aio_client_details(details, with_bearer(details.metadata, token))

    async def call(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, await self._token()), request)

    async def unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        token = await self._token()
        call = await continuation(self._details(details, token), request)
        if await call.code() is not grpc.StatusCode.UNAUTHENTICATED:
            return call
        if not self._source._invalidate_refused(token):
            return call
        return await self.call(continuation, details, request)


def bearer_interceptors(source: AsyncTokenSource) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the bearer token on a grpc.aio channel without transport security,
    which you chose explicitly: `grpc.aio.insecure_channel(t, interceptors=bearer_interceptors(s))`.

    (grpc.aio files each interceptor under one RPC shape only, hence one object per shape.)
    """
    bearer = _Bearer(source)
    return aio_client_interceptors(bearer.call, unary_unary=bearer.unary_unary, label=repr(source))


# --- validators ------------------------------------------------------------------------------


@runtime_checkable
class AsyncValidator(Protocol):
    """Validator, awaitable: same results, same ValidatorUnavailable on indecision."""

    async def validate(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult: ...


# What authenticates an asyncio revocation feed: an AsyncTokenSource for FOLLOWER_AUDIENCE, or
# any async callable returning a bearer token for it (awaited at every (re)connect).
AsyncFollowerToken = AsyncTokenSource | Callable[[], Awaitable[str]]


class AsyncRevocationFollower:
    """RevocationFollower for a grpc.aio channel: follows WatchRevocations in an asyncio task
    of the loop it is started in, with the same connected rule (FeedState), the same
    reconnect from the last cursor applied, and the same token rules (None: an
    AsyncTokenSource from the AUTHSVC_SERVICE_* environment, owned and closed here)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        revocations: RevocationSet,
        *,
        token: AsyncFollowerToken | None = None,
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
        self._owned_source: AsyncTokenSource | None = None
        if token is None:
            # Raises CredentialsError naming the missing variable.
            token = self._owned_source = AsyncTokenSource.from_env(
                FOLLOWER_AUDIENCE, environ=environ
            )
        self._token: Callable[[], Awaitable[str]] = (
            token.token if isinstance(token, AsyncTokenSource) else token
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connects = 0
        self.events_applied = 0

    def start(self) -> None:
        """Start following in the running loop (again: nothing)."""
        if self._task is None and not self._stopping:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="authsvc-revocations"
            )

    def stop(self) -> None:
        """Stop following; the task closes the source it owns as it ends."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def wait_stopped(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def connected(self) -> bool:
        self._observe_channel()
        return self._state.connected()

    def outage_seconds(self, now: float) -> float:
        self._observe_channel()
        return self._state.outage_seconds(now)

    def _observe_channel(self) -> None:
        # grpc.aio has no connectivity callback; the state is read when it matters.
        try:
            ready = self._channel.get_state() is grpc.ChannelConnectivity.READY
        except (ValueError, RuntimeError, AttributeError):  # a closed channel
            ready = False
        self._state.channel(ready, self._clock())

    async def _run(self) -> None:
        state = self._state
        call: Any = None
        try:
            while not self._stopping:
                try:
                    bearer = await self._token()
                except Exception as exc:
                    no_feed_token(exc)
                    await asyncio.sleep(state.retry_delay())
                    continue
                call = self._stub.WatchRevocations(
                    auth_pb2.WatchRevocationsRequest(after_cursor=self.revocations.cursor),
                    metadata=(("authorization", f"Bearer {bearer}"),),
                )
                state.opened()
                self.connects += 1
                try:
                    async for event in call:
                        self.revocations.add(RevocationEntry.from_proto(event))
                        self.events_applied += 1
                        state.event()
                except grpc.RpcError as exc:
                    feed_closed(status_of(exc), self._stopping)
                except grpc.aio.UsageError:  # the channel is closed: nothing can work any more
                    return
                except Exception:
                    _LOG.exception("revocation feed failed; reconnecting")
                finally:
                    state.closed(self._clock())
                    if self._on_disconnect is not None:
                        self._on_disconnect()
                call = None
                await asyncio.sleep(state.retry_delay())
        finally:
            if call is not None:
                call.cancel()
            if self._owned_source is not None:
                await self._owned_source.close()


class AsyncRemoteValidator:
    """RemoteValidator over a grpc.aio channel: checks over ValidateTokenStream by default
    (unary ValidateToken against a server without it) with the required scopes, a short
    positive cache, failing closed (ValidatorUnavailable, naming the status) when authsvc is
    down or slow. With `follow_revocations` a cached answer is dropped as soon as its
    revocation arrives on the feed (followed in a task of the loop the first check runs in),
    and nothing is cached while the feed is down."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        audience: str,
        *,
        cache_ttl_seconds: float = 5.0,
        cache_size: int = 10_000,
        timeout_seconds: float = 2.0,
        follow_revocations: bool = False,
        token_source: AsyncFollowerToken | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        streaming: bool = True,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        """`token_source` authenticates the revocation feed when `follow_revocations` is on
        (None: an AsyncTokenSource from the AUTHSVC_SERVICE_* environment, or `environ`).

        Raises:
            CredentialsError: following without `token_source`, and a variable is missing.
        """
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
        self.streams = AsyncStreamMux(channel, streams=streams) if streaming else None
        self.feed: AsyncRevocationFollower | None = None
        if revocations is not None:
            self.feed = AsyncRevocationFollower(
                channel,
                revocations,
                token=token_source,
                environ=environ,
                clock=clock,
                on_disconnect=self._core.cache.clear,
            )
            with contextlib.suppress(RuntimeError):  # no running loop: the first check starts it
                self.feed.start()

    async def validate(
        self,
        token: str,
        *,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult:
        """`client_cert_thumbprint`: as RemoteValidator.validate (sent with the check, part of
        the cache key).

        Raises:
            ValidatorUnavailable: authsvc did not answer in time (never read as valid).
        """
        core = self._core
        now = core.clock()
        feed = self.feed
        if feed is not None:
            feed.start()
        use_cache = feed is None or feed.connected
        thumbprint = client_cert_thumbprint
        key, cached = core.lookup(token, required_scopes, now, use_cache, thumbprint)
        if cached is not None:
            return cached
        request = core.request(token, required_scopes, thumbprint)
        started = time.monotonic()
        response = None
        if self.streams is not None:
            response = await self.streams.check(request, core.timeout)
        if response is None:
            remaining = core.remaining(time.monotonic() - started)
            try:
                response = await self._stub.ValidateToken(request, timeout=remaining)
            except grpc.RpcError as exc:
                return core.failed(exc)
        return core.answer(key, response, required_scopes, now, thumbprint, token=token)

    def close(self) -> None:
        """End the validator's streams and its revocation feed (they also end with the
        channel)."""
        if self.streams is not None:
            self.streams.close()
        if self.feed is not None:
            self.feed.stop()

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)


async def validate_async(
    validator: Validator | AsyncValidator,
    token: str,
    scopes: Sequence[str],
    thumbprint: str | None = None,
    *,
    pass_thumbprint: bool = True,
) -> Claims | Denial:
    """Run any validator without blocking the event loop; every outcome becomes claims or a
    denial (an exception is a denial: fail closed). `thumbprint` is the call's client
    certificate (interceptors.call_thumbprint), passed on unless the validator predates it."""
    bound: dict[str, Any] = {"client_cert_thumbprint": thumbprint} if pass_thumbprint else {}
    try:
        if isinstance(validator, LocalValidator):
            result, fetch = validator.validate_nonblocking(token, required_scopes=scopes, **bound)
            if fetch:
                # Unknown kid: the key fetch blocks, so it runs on a worker thread.
                result = await asyncio.to_thread(
                    validator.validate, token, required_scopes=scopes, **bound
                )
        elif isinstance(validator, RemoteValidator):
            result = await asyncio.to_thread(
                validator.validate, token, required_scopes=scopes, **bound
            )
        else:
            outcome = validator.validate(token, required_scopes=scopes, **bound)
            result = await outcome if inspect.isawaitable(outcome) else outcome
    except ValidatorUnavailable:
        return _UNAVAILABLE
    except Exception:
        _LOG.exception("token validator failed; denying the call")
        return _UNAVAILABLE
    return admit(result)


# --- server ----------------------------------------------------------------------------------


def _abort_behavior(denial: Denial) -> Callable[[Any, Any], Awaitable[None]]:
    async def terminate(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(denial.code, denial.details)

    return terminate


_TERMINATORS = terminators(_abort_behavior)


def terminator(denial: Denial, handler: Any) -> grpc.RpcMethodHandler:
    return _TERMINATORS[denial][shape_of(handler)]


# Checks a call given its ServicerContext: the token is known when the handler is chosen, the
# client certificate only from the context, so the check runs as the handler starts.
Check = Callable[[Any], Coroutine[Any, Any, Claims | Denial]]


def _guarded(
    handler: Any, bearer: str, check: Check, loop: asyncio.AbstractEventLoop
) -> grpc.RpcMethodHandler:
    behavior = behavior_of(handler)
    wrapped: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            claims = await check(context)
            if isinstance(claims, Denial):
                await context.abort(claims.code, claims.details)
                return
            token = _CALLER.set((claims, bearer))
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                _reset(token)

        wrapped = wrapped_gen
    elif inspect.iscoroutinefunction(behavior):

        async def wrapped_coro(request: Any, context: Any) -> Any:
            claims = await check(context)
            if isinstance(claims, Denial):
                await context.abort(claims.code, claims.details)
                return None
            token = _CALLER.set((claims, bearer))
            try:
                return await behavior(request, context)
            finally:
                _reset(token)

        wrapped = wrapped_coro
    else:
        # A sync behaviour on an aio server runs on an executor thread, with grpc.aio's sync
        # context (its abort() is synchronous); the check itself runs on the loop.

        def wrapped_sync(request: Any, context: Any) -> Any:
            claims = asyncio.run_coroutine_threadsafe(check(context), loop).result()
            if isinstance(claims, Denial):
                context.abort(claims.code, claims.details)
                raise RuntimeError("unreachable: abort() raises")  # pragma: no cover
            ctx = contextvars.copy_context()
            ctx.run(_CALLER.set, (claims, bearer))
            return ctx.run(behavior, request, context)

        wrapped = wrapped_sync
    return rebuild(handler, wrapped)


def _reset(token: contextvars.Token[Caller | None]) -> None:
    try:
        _CALLER.reset(token)
    except ValueError:  # finalised from another context (an abandoned stream): nothing leaks
        pass


class AsyncAuthServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The grpc.aio.server twin of AuthServerInterceptor: same policy, same statuses.

    Accepts an AsyncValidator or a sync Validator. LocalValidator runs inline (it only
    blocks to fetch keys for an unknown kid, which then moves to a worker thread);
    RemoteValidator runs on a worker thread; any other sync validator must not block.

    Certificate-bound tokens and `tls_terminated_upstream`: as AuthServerInterceptor. grpc.aio
    gives an interceptor no peer information, so the token is checked as the handler starts
    (with the call's context, hence its client certificate) rather than before the handler
    is returned; a refusal is the same status either way, and the handler never runs.
    """

    def __init__(
        self,
        validator: Validator | AsyncValidator,
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

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        try:
            return await self._intercept(continuation, handler_call_details)
        except Exception:
            _LOG.exception("auth interceptor failed; denying the call")
            return terminator(_UNAVAILABLE, None)

    async def _intercept(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        handler = await continuation(details)
        if self.policy.is_public(method) or handler is None:
            return handler
        rule = self.policy.rule(method)
        if rule is None:
            return terminator(_NOT_ALLOWED, handler)
        scopes = rule.scopes
        token = bearer_token(details.invocation_metadata)
        if isinstance(token, Denial):
            return terminator(token, handler)
        validator = self._validator
        binding = self.binding
        passes = binding.passes_thumbprint

        async def check(context: Any) -> Claims | Denial:
            # Binding.check_sync, awaiting the validator.
            thumbprint = binding.upfront(context)
            outcome = await validate_async(
                validator, token, scopes, thumbprint, pass_thumbprint=passes
            )
            if binding.second_look(outcome):
                thumbprint = binding.thumbprint(context)
                if thumbprint is not None and outcome == _MISMATCH:
                    outcome = await validate_async(
                        validator, token, scopes, thumbprint, pass_thumbprint=passes
                    )
            return rule.admit(binding.admit(outcome, thumbprint))

        return _guarded(handler, token, check, asyncio.get_running_loop())
