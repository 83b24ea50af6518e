"""Outgoing calls: call credentials (AuthMetadataPlugin) and a client interceptor over tokens."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import grpc

from authsvc_client.errors import AuthsvcClientError, TokenRefused, TokenUnavailable
from authsvc_client.tokens import TokenProvider, TokenSource

__all__ = [
    "AuthMetadataPlugin",
    "BearerTokenInterceptor",
    "call_credentials",
    "with_bearer",
]

_LOG = logging.getLogger(__name__)

# The prefix of every text the plugin hands to gRPC on failure. gRPC copies it into the
# status details; what follows it is the client's own error message, built from status code
# names, the audience and the scopes only, never from a secret or the server's details.
_NO_TOKEN = "authsvc: no access token available"  # noqa: S105 - a message, not a secret


def failure_text(error: AuthsvcClientError | None) -> str:
    """The status details for a call that got no token: why, since grpcio reports every
    plugin failure as UNAVAILABLE whatever the cause."""
    return _NO_TOKEN if error is None else f"{_NO_TOKEN}: {error}"


def failure_status(error: AuthsvcClientError) -> grpc.StatusCode:
    """The status an interceptor fails a call with: an audience or scope authsvc refused
    stays PERMISSION_DENIED, so that retry policies do not treat a caller mistake as an
    outage. Anything else (this service's own credentials rejected included: the callee
    never saw the call) is UNAVAILABLE, with the reason in the details."""
    if isinstance(error, TokenRefused) and error.code == grpc.StatusCode.PERMISSION_DENIED:
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.UNAVAILABLE


def with_bearer(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    """Call metadata with `authorization: Bearer <token>` replacing any earlier value."""
    kept = [
        (key, value) for key, value in (metadata or ()) if key.lower() != "authorization"
    ]
    kept.append(("authorization", f"Bearer {token}"))
    return kept


class AuthMetadataPlugin(grpc.AuthMetadataPlugin):  # type: ignore[misc]
    """Adds the bearer token to each call; for `grpc.metadata_call_credentials`.

    gRPC may run plugins on its own threads. This one never blocks: it answers at once from
    the cached token, or when the single refresh in flight ends. It never raises, and on
    failure reports a fixed message, so no secret can reach a status.
    """

    def __init__(self, source: TokenProvider) -> None:
        self._source = source

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        def deliver(token: str | None, error: AuthsvcClientError | None) -> None:
            if token is None:
                callback((), TokenUnavailable(failure_text(error)))
            else:
                callback((("authorization", f"Bearer {token}"),), None)

        try:
            self._source.request(deliver)
        except Exception:
            _LOG.exception("token source failed inside the call-credentials plugin")
            callback((), TokenUnavailable(_NO_TOKEN))

    def __repr__(self) -> str:
        return f"AuthMetadataPlugin({self._source!r})"


def call_credentials(source: TokenProvider) -> grpc.CallCredentials:
    """Call credentials for a secure or local channel, e.g.
    `grpc.composite_channel_credentials(grpc.ssl_channel_credentials(), call_credentials(src))`.

    gRPC sends call credentials only over channels with transport security (TLS, or
    `grpc.local_channel_credentials()`); for a plaintext channel use BearerTokenInterceptor.
    """
    return grpc.metadata_call_credentials(AuthMetadataPlugin(source), name="authsvc")


class _CallDetails(
    NamedTuple(
        "_CallDetails",
        [
            ("method", str),
            ("timeout", float | None),
            ("metadata", Any),
            ("credentials", Any),
            ("wait_for_ready", bool | None),
            ("compression", Any),
        ],
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


def client_details(details: Any, metadata: Any) -> grpc.ClientCallDetails:
    """A sync call's details with other metadata (grpc gives interceptors no way to copy
    them); shared by the bearer and tracing interceptors."""
    return _CallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


def aio_client_details(details: Any, metadata: Any) -> grpc.aio.ClientCallDetails:
    """client_details for a grpc.aio call."""
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


# grpc.aio files each client interceptor under one RPC shape only (by its base class), so an
# interceptor for every call is one object per shape; these four hand each call to a function.
AioIntercept = Callable[[Any, Any, Any], Awaitable[Any]]


class _AioPerShape:
    def __init__(self, intercept: AioIntercept, label: str) -> None:
        self._intercept = intercept
        self._label = label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._label})"


class _AioUnaryUnary(_AioPerShape, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._intercept(continuation, details, request)


class _AioUnaryStream(_AioPerShape, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._intercept(continuation, details, request)


class _AioStreamUnary(_AioPerShape, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._intercept(continuation, details, requests)


class _AioStreamStream(_AioPerShape, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await self._intercept(continuation, details, requests)


def aio_client_interceptors(
    intercept: AioIntercept, *, unary_unary: AioIntercept | None = None, label: str = ""
) -> list[grpc.aio.ClientInterceptor]:
    """One grpc.aio interceptor per call shape, each running `intercept(continuation,
    details, request)` (`unary_unary` instead for unary calls, when given)."""
    return [
        _AioUnaryUnary(unary_unary or intercept, label),
        _AioUnaryStream(intercept, label),
        _AioStreamUnary(intercept, label),
        _AioStreamStream(intercept, label),
    ]


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the bearer token on a channel without transport security, which you chose
    explicitly: `grpc.intercept_channel(grpc.insecure_channel(t), BearerTokenInterceptor(s))`.

    Runs on the caller's thread, so it waits for a refresh when no token is usable; a failure
    surfaces as an RpcError before anything is sent: PERMISSION_DENIED or UNAUTHENTICATED
    when authsvc refused the token (the details say why), UNAVAILABLE otherwise.

    A unary call the callee refuses with UNAUTHENTICATED (the token was revoked, say) is sent
    once more with a new token if the one it carried had been in use for a few seconds; the
    callee's auth check runs before its handler, so the request was not processed. Streaming
    calls are not retried (their requests cannot be replayed).
    """

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def _details(self, details: grpc.ClientCallDetails, token: str) -> grpc.ClientCallDetails:
        return client_details(details, with_bearer(details.metadata, token))

    def _intercept(
        self, continuation: Callable[[Any, Any], Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        try:
            token = self._source.token()
        except AuthsvcClientError as exc:
            return _FailedCall(failure_status(exc), str(exc))
        return continuation(self._details(details, token), request)

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        try:
            token = self._source.token()
        except AuthsvcClientError as exc:
            return _FailedCall(failure_status(exc), str(exc))
        call = continuation(self._details(client_call_details, token), request)
        if call.code() is not grpc.StatusCode.UNAUTHENTICATED:
            return call
        if not self._source._invalidate_refused(token):
            return call
        return self._intercept(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        return self._intercept(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any,
        request_iterator: Any,
    ) -> Any:
        return self._intercept(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any,
        request_iterator: Any,
    ) -> Any:
        return self._intercept(continuation, client_call_details, request_iterator)

    def __repr__(self) -> str:
        return f"BearerTokenInterceptor({self._source!r})"


class _FailedCall(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[misc]
    """What a call returns when no token could be had: raises like a failed RPC."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    # grpc.Call / RpcError
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception:
        return self

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # response-streaming calls are iterated
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self
