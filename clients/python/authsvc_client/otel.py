"""OpenTelemetry tracing for gRPC calls made and served with authsvc (extra `authsvc-client[otel]`).

Client interceptors start a CLIENT span per call and propagate its context in the call's
metadata (W3C `traceparent` through the globally configured propagator); server interceptors
continue the caller's trace in a SERVER span and record who the authenticated caller is
(`authsvc.caller.service_id`, the token's subject; never the token). Only the OpenTelemetry API
is used: spans go wherever the application's tracer provider sends them, and nowhere without
one. `import authsvc_client` never imports this module.

Compose them with the authentication pieces; the tracing server interceptor wraps the auth
interceptor, so the span covers the token check (and a remote validator's call) and still sees
the caller the check established:

    server = grpc.server(pool, interceptors=[TracingServerInterceptor(AuthServerInterceptor(...))])
    channel = grpc.intercept_channel(grpc.secure_channel(...), TracingClientInterceptor())
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from authsvc_client.credentials import aio_client_details, aio_client_interceptors, client_details
from authsvc_client.interceptors import behavior_of as _behavior
from authsvc_client.interceptors import current_claims
from authsvc_client.interceptors import rebuild as _rebuild

__all__ = [
    "CALLER_ATTRIBUTE",
    "AioTracingServerInterceptor",
    "TracingClientInterceptor",
    "TracingServerInterceptor",
    "aio_tracing_client_interceptors",
]

CALLER_ATTRIBUTE = "authsvc.caller.service_id"
_TRACER_NAME = "authsvc_client"
# OpenTelemetry RPC semantic conventions: the server codes that mean the server failed.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
def _tracer(provider: TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME, tracer_provider=provider)


def _attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _span_name(method: str) -> str:
    return method.lstrip("/")


def _status_code(value: Any) -> grpc.StatusCode:
    if isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        for member in grpc.StatusCode:
            if member.value[0] == value:
                return member
    return grpc.StatusCode.OK if value is None else grpc.StatusCode.UNKNOWN


def _end(span: Span, code: grpc.StatusCode, *, server: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK and (not server or code in _SERVER_ERRORS):
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def record_caller() -> None:
    """Put the authenticated caller of the RPC being handled on the current span."""
    claims = current_claims()
    if claims is not None:
        trace.get_current_span().set_attribute(CALLER_ATTRIBUTE, claims.subject)


def _server_span(tracer: trace.Tracer, method: str, metadata: Any) -> Span:
    """A SERVER span continuing the caller's trace (from the call's metadata)."""
    return tracer.start_span(
        _span_name(method),
        context=_parent(metadata),
        kind=SpanKind.SERVER,
        attributes=_attributes(method),
    )


def _client_span(tracer: trace.Tracer, method: Any) -> Span:
    name = method.decode() if isinstance(method, bytes) else str(method)
    return tracer.start_span(_span_name(name), kind=SpanKind.CLIENT, attributes=_attributes(name))


def _parent(metadata: Sequence[Any] | None) -> otel_context.Context:
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


# --- server: grpc.server ------------------------------------------------------------------


class TracingServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """A SERVER span per call, continuing the caller's trace; records the authenticated caller.

    Args:
        auth: the authentication interceptor to run inside the span (AuthServerInterceptor);
            without it the span has no caller unless this interceptor is listed after the
            auth interceptor.
        tracer_provider: defaults to the global one.
    """

    def __init__(
        self,
        auth: grpc.ServerInterceptor | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._auth = auth
        self._tracer = _tracer(tracer_provider)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        def recording(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            handler = continuation(details)
            return None if handler is None else _rebuild(handler, _recording(_behavior(handler)))

        if self._auth is not None:
            handler = self._auth.intercept_service(recording, handler_call_details)
        else:
            handler = recording(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata
        return _rebuild(handler, self._traced(handler, method, metadata))

    def _traced(self, handler: Any, method: str, metadata: Any) -> Callable[..., Any]:
        behavior = _behavior(handler)
        tracer = self._tracer
        streaming = bool(handler.response_streaming)

        def traced(request: Any, context: grpc.ServicerContext) -> Any:
            span = _server_span(tracer, method, metadata)
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                result = behavior(request, context)
            except BaseException:
                _end(span, _aborted(context), server=True)
                raise
            finally:
                otel_context.detach(token)
            if not streaming:
                _end(span, _status_code(context.code()), server=True)
                return result
            return _spanned_iterator(span, result, context)

        return traced


def _recording(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def recording_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            record_caller()
            async for item in behavior(request, context):
                yield item

        return recording_gen
    if inspect.iscoroutinefunction(behavior):

        async def recording_coro(request: Any, context: Any) -> Any:
            record_caller()
            return await behavior(request, context)

        return recording_coro

    def recording_sync(request: Any, context: Any) -> Any:
        record_caller()
        return behavior(request, context)

    return recording_sync


def _spanned_iterator(span: Span, iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
    code = grpc.StatusCode.UNKNOWN
    try:
        with trace.use_span(span, end_on_exit=False):
            yield from iterator
        code = _status_code(context.code())
    except GeneratorExit:
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = _aborted(context)
        raise
    finally:
        _end(span, code, server=True)


# --- server: grpc.aio.server --------------------------------------------------------------


class AioTracingServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The grpc.aio.server twin of TracingServerInterceptor (wrap AsyncAuthServerInterceptor).

    The span starts before the auth interceptor runs and is current while the handler it
    returns runs. AsyncAuthServerInterceptor checks the token as that handler starts (grpc.aio
    gives it the client certificate only there), so a remote check is a child of this span
    either way.
    """

    def __init__(
        self,
        auth: grpc.aio.ServerInterceptor | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._auth = auth
        self._tracer = _tracer(tracer_provider)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        async def recording(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            handler = await continuation(details)
            return None if handler is None else _rebuild(handler, _recording(_behavior(handler)))

        method = str(handler_call_details.method)
        span = _server_span(self._tracer, method, handler_call_details.invocation_metadata)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            if self._auth is not None:
                handler = await self._auth.intercept_service(recording, handler_call_details)
            else:
                handler = await recording(handler_call_details)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN, server=True)
            raise
        finally:
            _detach(token)
        if handler is None:
            _end(span, grpc.StatusCode.UNIMPLEMENTED, server=True)
            return None
        return _rebuild(handler, _aio_traced(_behavior(handler), span))


def _aio_traced(behavior: Any, span: Span) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def traced_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            token = otel_context.attach(trace.set_span_in_context(span))
            code = grpc.StatusCode.UNKNOWN
            try:
                async for item in behavior(request, context):
                    yield item
                code = _status_code(context.code())
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _aborted(context)
                raise
            finally:
                _detach(token)
                _end(span, code, server=True)

        return traced_gen
    if inspect.iscoroutinefunction(behavior):

        async def traced_coro(request: Any, context: Any) -> Any:
            token = otel_context.attach(trace.set_span_in_context(span))
            code = grpc.StatusCode.UNKNOWN
            try:
                result = await behavior(request, context)
                code = _status_code(context.code())
                return result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _aborted(context)
                raise
            finally:
                _detach(token)
                _end(span, code, server=True)

        return traced_coro

    def traced_sync(request: Any, context: Any) -> Any:
        code = grpc.StatusCode.UNKNOWN
        try:
            with trace.use_span(span, end_on_exit=False):
                result = behavior(request, context)
            code = _status_code(context.code())
            return result
        except BaseException:
            code = _aborted(context)
            raise
        finally:
            _end(span, code, server=True)

    return traced_sync


def _aborted(context: Any) -> grpc.StatusCode:
    code = _status_code(context.code())
    return grpc.StatusCode.UNKNOWN if code == grpc.StatusCode.OK else code


def _detach(token: object) -> None:
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    except ValueError:  # an abandoned stream finalised in another context
        pass


# --- client ---------------------------------------------------------------------------------


def _trace_metadata(metadata: Any) -> list[tuple[str, Any]]:
    """The call's metadata plus the current context's propagation fields (traceparent, …)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*(tuple(item) for item in (metadata or ())), *carrier.items()]


def _sync_details(details: Any) -> grpc.ClientCallDetails:
    return client_details(details, _trace_metadata(details.metadata))


def _aio_details(details: Any) -> grpc.aio.ClientCallDetails:
    return aio_client_details(details, _trace_metadata(details.metadata))


class TracingClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """For `grpc.intercept_channel(channel, TracingClientInterceptor())`: a CLIENT span per call,
    its context sent in the call's metadata."""

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = _tracer(tracer_provider)

    def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        span = _client_span(self._tracer, details.method)
        try:
            with trace.use_span(span, end_on_exit=False):
                call = continuation(_sync_details(details), request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN, server=False)
            raise
        call.add_done_callback(lambda done: _end(span, _status_code(done.code()), server=False))
        return call

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)


class _AioTracing:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        # Finishing tasks, held so they are not collected before they run.
        self._pending: set[asyncio.Task[None]] = set()

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        span = _client_span(self._tracer, details.method)
        try:
            with trace.use_span(span, end_on_exit=False):
                call = await continuation(_aio_details(details), request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN, server=False)
            raise

        async def finish(done: Any) -> None:
            _end(span, _status_code(await done.code()), server=False)

        def on_done(done: Any) -> None:
            task = asyncio.get_running_loop().create_task(finish(done))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(on_done)
        return call


def aio_tracing_client_interceptors(
    *, tracer_provider: TracerProvider | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """For `grpc.aio.secure_channel(..., interceptors=[*aio_tracing_client_interceptors(), ...])`.

    grpc.aio takes one interceptor object per call shape, so this returns one of each.
    """
    return aio_client_interceptors(_AioTracing(_tracer(tracer_provider))._call, label="tracing")
