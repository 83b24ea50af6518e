"""asyncio variants: grpc.aio client interceptors, remote validator and server interceptor."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import grpc

from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.credentials import failure_status, with_bearer
from authsvc_client.errors import AuthsvcClientError, ValidatorUnavailable
from authsvc_client.interceptors import (
    _CALLER,
    _NOT_ALLOWED,
    _UNAVAILABLE,
    ALL_DENIALS,
    DEFAULT_PUBLIC_SERVICES,
    Denial,
    MethodPolicy,
    bearer_token,
    decide,
)
from authsvc_client.streaming import DEFAULT_STREAMS, AsyncStreamMux
from authsvc_client.tokens import AsyncTokenSource
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import (
    LocalValidator,
    PositiveCache,
    RemoteValidator,
    Validator,
    remote_error,
    remote_result,
)

__all__ = [
    "AsyncAuthServerInterceptor",
    "AsyncRemoteValidator",
    "AsyncTokenSource",
    "AsyncValidator",
    "bearer_interceptors",
]

_LOG = logging.getLogger(__name__)


# --- client ----------------------------------------------------------------------------------


class _Bearer:
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

    async def _details(
        self, details: grpc.aio.ClientCallDetails, token: str | None = None
    ) -> grpc.aio.ClientCallDetails:
        if token is None:
            token = await self._token()
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*with_bearer(details.metadata, token)),
            details.credentials,
            details.wait_for_ready,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source!r})"


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    # As BearerTokenInterceptor: one retry with a new token after the callee's
    # UNAUTHENTICATED, for unary calls only.
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        token = await self._token()
        call = await continuation(await self._details(client_call_details, token), request)
        if await call.code() is not grpc.StatusCode.UNAUTHENTICATED:
            return call
        if not self._source._invalidate_refused(token):
            return call
        return await continuation(await self._details(client_call_details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(await self._details(client_call_details), request_iterator)


def bearer_interceptors(source: AsyncTokenSource) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the bearer token on a grpc.aio channel without transport security,
    which you chose explicitly: `grpc.aio.insecure_channel(t, interceptors=bearer_interceptors(s))`.

    (grpc.aio files each interceptor under one RPC shape only, hence one object per shape.)
    """
    return [_UnaryUnary(source), _UnaryStream(source), _StreamUnary(source), _StreamStream(source)]


# --- validators ------------------------------------------------------------------------------


@runtime_checkable
class AsyncValidator(Protocol):
    """Validator, awaitable: same results, same ValidatorUnavailable on indecision."""

    async def validate(
        self, token: str, *, required_scopes: Sequence[str] = ()
    ) -> ValidationResult: ...


class AsyncRemoteValidator:
    """RemoteValidator over a grpc.aio channel: checks over ValidateTokenStream by default
    (unary ValidateToken against a server without it), a short positive cache, failing closed
    (ValidatorUnavailable) when authsvc is down or slow."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        audience: str,
        *,
        cache_ttl_seconds: float = 5.0,
        cache_size: int = 10_000,
        timeout_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        streaming: bool = True,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        if not audience:
            raise ValueError("audience is required")
        self.audience = audience
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._timeout = timeout_seconds
        self._clock = clock
        self._cache = PositiveCache(cache_ttl_seconds, cache_size, None)
        self.streams = AsyncStreamMux(channel, streams=streams) if streaming else None

    async def validate(
        self, token: str, *, required_scopes: Sequence[str] = ()
    ) -> ValidationResult:
        now = self._clock()
        key = PositiveCache.key(token)
        claims = self._cache.get(key, now)
        if claims is not None:
            return remote_result(
                auth_pb2.ValidateTokenResponse(valid=True, claims=claims.to_proto()),
                required_scopes,
            )
        request = auth_pb2.ValidateTokenRequest(token=token, audience=self.audience)
        remaining = self._timeout
        response = None
        if self.streams is not None:
            started = time.monotonic()
            response = await self.streams.check(request, self._timeout)
            remaining -= time.monotonic() - started
        if response is None:
            if remaining <= 0:
                raise ValidatorUnavailable("authsvc ValidateToken: no answer within the deadline")
            try:
                response = await self._stub.ValidateToken(request, timeout=remaining)
            except grpc.RpcError as exc:
                return remote_error(exc)
        result = ValidationResult.from_proto(response)
        if result.claims is not None:
            self._cache.put(key, result.claims, now)
        return remote_result(response, required_scopes)

    def close(self) -> None:
        """End the validator's streams (they also end with the channel)."""
        if self.streams is not None:
            self.streams.close()

    def __repr__(self) -> str:
        return f"AsyncRemoteValidator(audience={self.audience!r}, cached={len(self._cache)})"


async def validate_async(
    validator: Validator | AsyncValidator, token: str, scopes: Sequence[str]
) -> Claims | Denial:
    """Run any validator without blocking the event loop; every outcome becomes claims or a
    denial (an exception is a denial: fail closed)."""
    try:
        if isinstance(validator, LocalValidator):
            result, fetch = validator.validate_nonblocking(token, required_scopes=scopes)
            if fetch:
                # Unknown kid: the key fetch blocks, so it runs on a worker thread.
                result = await asyncio.to_thread(validator.validate, token, required_scopes=scopes)
        elif isinstance(validator, RemoteValidator):
            result = await asyncio.to_thread(validator.validate, token, required_scopes=scopes)
        else:
            outcome = validator.validate(token, required_scopes=scopes)
            result = await outcome if inspect.isawaitable(outcome) else outcome
    except ValidatorUnavailable:
        return _UNAVAILABLE
    except Exception:
        _LOG.exception("token validator failed; denying the call")
        return _UNAVAILABLE
    denial = decide(result)
    if denial is not None or result.claims is None:
        return denial or _UNAVAILABLE
    return result.claims


# --- server ----------------------------------------------------------------------------------


def _abort_behavior(denial: Denial) -> Callable[[Any, Any], Awaitable[None]]:
    async def terminate(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(denial.code, denial.details)

    return terminate


_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

_TERMINATORS: dict[Denial, dict[tuple[bool, bool], grpc.RpcMethodHandler]] = {
    denial: {shape: factory(_abort_behavior(denial)) for shape, factory in _FACTORIES.items()}
    for denial in ALL_DENIALS
}


def _shape(handler: Any) -> tuple[bool, bool]:
    if handler is None:
        return (False, False)
    return (bool(handler.request_streaming), bool(handler.response_streaming))


def _with_caller(handler: Any, claims: Claims) -> grpc.RpcMethodHandler:
    shape = _shape(handler)
    attr = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[shape]
    behavior = getattr(handler, attr)
    wrapped: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            token = _CALLER.set(claims)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                _reset(token)

        wrapped = wrapped_gen
    elif inspect.iscoroutinefunction(behavior):

        async def wrapped_coro(request: Any, context: Any) -> Any:
            token = _CALLER.set(claims)
            try:
                return await behavior(request, context)
            finally:
                _reset(token)

        wrapped = wrapped_coro
    else:
        # A sync behaviour on an aio server runs elsewhere; give it a context of its own.
        ctx = contextvars.copy_context()
        ctx.run(_CALLER.set, claims)

        def wrapped_sync(request: Any, context: Any) -> Any:
            return ctx.run(behavior, request, context)

        wrapped = wrapped_sync
    return _FACTORIES[shape](
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _reset(token: contextvars.Token[Claims | None]) -> None:
    try:
        _CALLER.reset(token)
    except ValueError:  # finalised from another context (an abandoned stream): nothing leaks
        pass


class AsyncAuthServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The grpc.aio.server twin of AuthServerInterceptor: same policy, same statuses.

    Accepts an AsyncValidator or a sync Validator. LocalValidator runs inline (it only
    blocks to fetch keys for an unknown kid, which then moves to a worker thread);
    RemoteValidator runs on a worker thread; any other sync validator must not block.
    """

    def __init__(
        self,
        validator: Validator | AsyncValidator,
        method_scopes: Mapping[str, Sequence[str]],
        *,
        public_methods: Iterable[str] = (),
        public_services: Iterable[str] = DEFAULT_PUBLIC_SERVICES,
    ) -> None:
        self._validator = validator
        self.policy = MethodPolicy(
            method_scopes, public_methods=public_methods, public_services=public_services
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        try:
            return await self._intercept(continuation, handler_call_details)
        except Exception:
            _LOG.exception("auth interceptor failed; denying the call")
            return _TERMINATORS[_UNAVAILABLE][(False, False)]

    async def _intercept(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        handler = await continuation(details)
        if self.policy.is_public(method) or handler is None:
            return handler
        scopes = self.policy.required_scopes(method)
        if scopes is None:
            return _TERMINATORS[_NOT_ALLOWED][_shape(handler)]
        token = bearer_token(details.invocation_metadata)
        if isinstance(token, Denial):
            return _TERMINATORS[token][_shape(handler)]
        outcome = await validate_async(self._validator, token, scopes)
        if isinstance(outcome, Denial):
            return _TERMINATORS[outcome][_shape(handler)]
        return _with_caller(handler, outcome)
