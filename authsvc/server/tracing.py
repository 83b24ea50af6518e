"""OpenTelemetry spans for authsvc's own RPCs, on only with AUTHSVC_TRACING=true.

Spans go to the process's global tracer provider: run the server under
`opentelemetry-instrument` (or configure the SDK before `authsvc serve`) to export them. Off, no
OpenTelemetry module is imported and the hot path pays nothing.
"""

from __future__ import annotations

import grpc

from authsvc.config import Settings
from authsvc.errors import ConfigError

__all__ = ["tracing_interceptors"]


def tracing_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors to put first on the server: one SERVER span per call, or none."""
    if not settings.tracing:
        return []
    try:
        from authsvc_client.otel import AioTracingServerInterceptor
    except ImportError:
        raise ConfigError(
            "AUTHSVC_TRACING=true needs OpenTelemetry: pip install 'authsvc[otel]'"
        ) from None
    return [AioTracingServerInterceptor()]
