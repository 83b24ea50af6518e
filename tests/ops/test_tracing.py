"""OpenTelemetry: authsvc's own RPCs as spans (AUTHSVC_TRACING=true), and the client package's
tracing interceptors around real services, captured with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authsvc.errors import ConfigError
from authsvc.server.app import AuthsvcServer
from authsvc.server.tracing import tracing_interceptors
from authsvc_client import AuthServerInterceptor, current_claims
from authsvc_client.aio import AsyncAuthServerInterceptor, AsyncRemoteValidator
from authsvc_client.otel import (
    CALLER_ATTRIBUTE,
    AioTracingServerInterceptor,
    TracingClientInterceptor,
    TracingServerInterceptor,
    aio_tracing_client_interceptors,
)
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import RemoteValidator
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings, run_in_process

START = 1_900_000_000.0
ISSUE = "authsvc.v1.AuthService/IssueToken"
VALIDATE = "authsvc.v1.AuthService/ValidateToken"
SERVICES = {"orders": (["billing"], ["billing.read"]), "billing": (["authsvc"], [])}
BILLING_SCOPES = {"/demo.Billing/Get": ["billing.read"], "/demo.Billing/List": ["billing.read"]}

_GLOBAL_EXPORTER = InMemorySpanExporter()
_installed = False


@pytest.fixture
def server_spans() -> Iterator[InMemorySpanExporter]:
    """Spans sent to the global tracer provider (where authsvc's own spans go)."""
    global _installed
    if not _installed:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_GLOBAL_EXPORTER))
        _installed = True
    _GLOBAL_EXPORTER.clear()
    yield _GLOBAL_EXPORTER
    _GLOBAL_EXPORTER.clear()


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _named(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and s.kind == kind]


def _one(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind) -> ReadableSpan:
    found = _named(spans, name, kind)
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.parent is not None and child.context is not None and parent.context is not None
    return bool(
        child.context.trace_id == parent.context.trace_id
        and child.parent.span_id == parent.context.span_id
    )


async def _wait_for_spans(exporter: InMemorySpanExporter, count: int) -> tuple[ReadableSpan, ...]:
    # Client spans of grpc.aio end in a callback task; server spans as the handler returns.
    for _ in range(500):
        spans = exporter.get_finished_spans()
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(exporter.get_finished_spans())} spans, expected {count}")


def _everything_recorded(spans: tuple[ReadableSpan, ...]) -> str:
    return json.dumps(
        [
            {
                "name": s.name,
                "attributes": dict(s.attributes or {}),
                "status": s.status.description,
                "events": [(e.name, dict(e.attributes or {})) for e in s.events],
            }
            for s in spans
        ],
        default=str,
    )


def _get(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    claims = current_claims()
    return b"anonymous" if claims is None else claims.subject.encode()


def _list(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from (b"a", b"b")


async def _aget(_request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    claims = current_claims()
    return b"anonymous" if claims is None else claims.subject.encode()


def _billing(handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("demo.Billing", handlers)


class TestAuthsvcOwnSpans:
    def test_each_rpc_is_a_server_span_in_the_callers_trace(
        self, tmp_path: Path, server_spans: InMemorySpanExporter
    ) -> None:
        settings = in_process_settings(tmp_path, AUTHSVC_TRACING="true")
        provider, client_spans = _provider()

        async def body(
            server: AuthsvcServer, _stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
        ) -> None:
            interceptors = aio_tracing_client_interceptors(tracer_provider=provider)
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", interceptors=interceptors
            ) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                issued = await stub.IssueToken(
                    auth_pb2.IssueTokenRequest(
                        service_id="orders", service_secret=secrets["orders"], audience="billing"
                    )
                )
                checked = await stub.ValidateToken(
                    auth_pb2.ValidateTokenRequest(token=issued.access_token, audience="billing")
                )
                assert checked.valid
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.IssueToken(
                        auth_pb2.IssueTokenRequest(
                            service_id="orders", service_secret="as_" + "0" * 43, audience="billing"
                        )
                    )
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            clients = await _wait_for_spans(client_spans, 3)
            servers = await _wait_for_spans(server_spans, 3)

            issue_spans = _named(servers, ISSUE, SpanKind.SERVER)
            validate = _one(servers, VALIDATE, SpanKind.SERVER)
            client_issue = _named(clients, ISSUE, SpanKind.CLIENT)
            client_validate = _one(clients, VALIDATE, SpanKind.CLIENT)
            assert len(issue_spans) == len(client_issue) == 2
            assert _is_child(validate, client_validate)
            for server_span, client_span in zip(issue_spans, client_issue, strict=True):
                assert _is_child(server_span, client_span)
            ok, failed = issue_spans
            assert ok.attributes is not None and failed.attributes is not None
            assert ok.attributes["rpc.grpc.status_code"] == 0
            assert ok.attributes["rpc.service"] == "authsvc.v1.AuthService"
            # A wrong secret is the caller's error: UNSET on the server, ERROR on the client.
            assert failed.attributes["rpc.grpc.status_code"] == 16
            assert failed.status.status_code == StatusCode.UNSET
            assert client_issue[1].status.status_code == StatusCode.ERROR

            recorded = _everything_recorded((*servers, *clients))
            assert secrets["orders"] not in recorded
            assert issued.access_token not in recorded

        run_in_process(settings, FakeClock(START), SERVICES, body)

    def test_off_unless_asked(self, tmp_path: Path, server_spans: InMemorySpanExporter) -> None:
        settings = in_process_settings(tmp_path)

        async def body(
            _server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, _secrets: dict[str, str]
        ) -> None:
            await stub.GetJwks(auth_pb2.GetJwksRequest())

        run_in_process(settings, FakeClock(START), SERVICES, body)
        assert server_spans.get_finished_spans() == ()


class TestInterceptors:
    def test_sync_server_span_records_the_caller_not_the_token(
        self, tmp_path: Path, server_spans: InMemorySpanExporter
    ) -> None:
        settings = in_process_settings(tmp_path)
        provider, spans = _provider()

        async def body(
            server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
        ) -> None:
            token = (
                await stub.IssueToken(
                    auth_pb2.IssueTokenRequest(
                        service_id="orders", service_secret=secrets["orders"], audience="billing"
                    )
                )
            ).access_token
            authsvc = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            auth = AuthServerInterceptor(
                RemoteValidator(authsvc, "billing", cache_ttl_seconds=0.0), BILLING_SCOPES
            )
            billing = grpc.server(
                futures.ThreadPoolExecutor(max_workers=4),
                interceptors=[TracingServerInterceptor(auth, tracer_provider=provider)],
            )
            billing.add_generic_rpc_handlers(
                (
                    _billing(
                        {
                            "Get": grpc.unary_unary_rpc_method_handler(_get),
                            "List": grpc.unary_stream_rpc_method_handler(_list),
                        }
                    ),
                )
            )
            port = billing.add_insecure_port("127.0.0.1:0")
            billing.start()
            channel = grpc.intercept_channel(
                grpc.insecure_channel(f"127.0.0.1:{port}"),
                TracingClientInterceptor(tracer_provider=provider),
            )
            bearer = (("authorization", f"Bearer {token}"),)

            def calls() -> None:
                assert channel.unary_unary("/demo.Billing/Get")(b"", metadata=bearer) == b"orders"
                assert list(channel.unary_stream("/demo.Billing/List")(b"", metadata=bearer)) == [
                    b"a",
                    b"b",
                ]
                with pytest.raises(grpc.RpcError) as denied:
                    channel.unary_unary("/demo.Billing/Get")(b"")
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

            try:
                await asyncio.to_thread(calls)
                finished = await _wait_for_spans(spans, 6)
            finally:
                channel.close()
                billing.stop(None)
                authsvc.close()

            gets = _named(finished, "demo.Billing/Get", SpanKind.SERVER)
            client_gets = _named(finished, "demo.Billing/Get", SpanKind.CLIENT)
            listed = _one(finished, "demo.Billing/List", SpanKind.SERVER)
            assert len(gets) == len(client_gets) == 2
            allowed, denied_span = gets
            assert _is_child(allowed, client_gets[0])
            assert _is_child(denied_span, client_gets[1])
            assert _is_child(listed, _one(finished, "demo.Billing/List", SpanKind.CLIENT))
            assert allowed.attributes is not None and listed.attributes is not None
            assert allowed.attributes[CALLER_ATTRIBUTE] == "orders"
            assert listed.attributes[CALLER_ATTRIBUTE] == "orders"
            assert listed.attributes["rpc.grpc.status_code"] == 0
            assert denied_span.attributes is not None
            assert CALLER_ATTRIBUTE not in denied_span.attributes
            assert denied_span.attributes["rpc.grpc.status_code"] == 16
            assert token not in _everything_recorded(finished)

        run_in_process(settings, FakeClock(START), SERVICES, body)

    def test_aio_trace_runs_from_caller_through_callee_to_authsvc(
        self, tmp_path: Path, server_spans: InMemorySpanExporter
    ) -> None:
        settings = in_process_settings(tmp_path, AUTHSVC_TRACING="true")
        provider, spans = _provider()

        async def body(
            server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
        ) -> None:
            token = (
                await stub.IssueToken(
                    auth_pb2.IssueTokenRequest(
                        service_id="orders", service_secret=secrets["orders"], audience="billing"
                    )
                )
            ).access_token
            server_spans.clear()
            tracing = aio_tracing_client_interceptors(tracer_provider=provider)
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", interceptors=tracing
            ) as authsvc:
                auth = AsyncAuthServerInterceptor(
                    # Unary checks: a check over ValidateTokenStream rides one long-lived
                    # stream whose span is the stream's, not the check's.
                    AsyncRemoteValidator(
                        authsvc, "billing", cache_ttl_seconds=0.0, streaming=False
                    ),
                    BILLING_SCOPES,
                )
                billing = grpc.aio.server(
                    interceptors=[AioTracingServerInterceptor(auth, tracer_provider=provider)]
                )
                billing.add_generic_rpc_handlers(
                    (_billing({"Get": grpc.unary_unary_rpc_method_handler(_aget)}),)
                )
                port = billing.add_insecure_port("127.0.0.1:0")
                await billing.start()
                try:
                    async with grpc.aio.insecure_channel(
                        f"127.0.0.1:{port}", interceptors=tracing
                    ) as channel:
                        get = channel.unary_unary("/demo.Billing/Get")
                        bearer = (("authorization", f"Bearer {token}"),)
                        assert await get(b"", metadata=bearer) == b"orders"
                    finished = await _wait_for_spans(spans, 3)
                    authsvc_spans = await _wait_for_spans(server_spans, 1)
                finally:
                    await billing.stop(None)

            caller = _one(finished, "demo.Billing/Get", SpanKind.CLIENT)
            callee = _one(finished, "demo.Billing/Get", SpanKind.SERVER)
            check = _one(finished, VALIDATE, SpanKind.CLIENT)
            answered = _one(authsvc_spans, VALIDATE, SpanKind.SERVER)
            assert _is_child(callee, caller)
            assert _is_child(check, callee)  # the token check runs inside the callee's span
            assert _is_child(answered, check)
            assert callee.attributes is not None
            assert callee.attributes[CALLER_ATTRIBUTE] == "orders"

        run_in_process(settings, FakeClock(START), SERVICES, body)



class TestOptional:
    def test_tracing_asked_without_the_extra_is_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # As if opentelemetry were not installed: importing it raises ImportError.
        monkeypatch.setitem(sys.modules, "opentelemetry", None)
        monkeypatch.delitem(sys.modules, "authsvc_client.otel", raising=False)
        settings = in_process_settings(tmp_path, AUTHSVC_TRACING="true")
        with pytest.raises(ConfigError, match=r"pip install 'authsvc\[otel\]'"):
            tracing_interceptors(settings)
        assert tracing_interceptors(in_process_settings(tmp_path)) == []
