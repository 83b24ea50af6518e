"""Prometheus metrics: an RPC interceptor (counts, latency, access log) and state gauges."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from authsvc.clock import Clock, to_timestamp
from authsvc.logs import Deferred, enter_rpc, leave_rpc, request_id_from, rpc_context
from authsvc.storage.repository import Repository
from authsvc.sync import ServerState
from authsvc_client.v1 import auth_pb2

__all__ = ["QUIET_WHEN_OK", "Metrics", "MetricsInterceptor", "StateCollector"]

access_log = logging.getLogger("authsvc.access")

# Validation runs in well under a millisecond; issuing signs (RSA) and may touch the database.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Health probes run every few seconds: their access lines stay at debug.
_QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})
_VALIDATE = "/authsvc.v1.AuthService/ValidateToken"
_VALIDATE_STREAM = "/authsvc.v1.AuthService/ValidateTokenStream"
# Every call in the fleet may cost a ValidateToken, and every local validator reads the key
# set: when they succeed, their access lines stay at debug (they are counted and timed in
# /metrics). A token found invalid, any other status and every other RPC log at info.
# AUTHSVC_ACCESS_LOG_ALL=true logs them at info too.
QUIET_WHEN_OK = frozenset({_VALIDATE, "/authsvc.v1.AuthService/GetJwks"})


class Metrics:
    """Every metric of one server process, in its own registry (no process-global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("grpc_service", "grpc_method")
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle a unary RPC (IssueToken, ValidateToken, …), by method.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "grpc_server_streams_open",
            "Server-streaming RPCs open now (WatchRevocations followers), by method.",
            labels,
            registry=self.registry,
        )
        self.validation_failures = Counter(
            "authsvc_token_validation_failures",
            "ValidateToken answers with valid=false, by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.login_outcomes = Counter(
            "authsvc_login_outcomes",
            "Logins settled, by action and outcome (ok, bad_credentials, unknown_service, "
            "throttled, …): one count per attempt, where the audit trail keeps one row per "
            "throttle key and window for throttled and unknown-id attempts.",
            ("action", "outcome"),
            registry=self.registry,
        )
        # A stream's answers are counted here, per message, not in validation_failures: that
        # counter's share is read against unary ValidateToken calls (grpc_server_handled).
        self.streamed_validations = Counter(
            "authsvc_streamed_validations",
            "Checks answered on ValidateTokenStream (one per message), valid or not.",
            registry=self.registry,
        )
        self.streamed_validation_failures = Counter(
            "authsvc_streamed_validation_failures",
            "ValidateTokenStream answers with valid=false, by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.login_batch_size = Histogram(
            "authsvc_login_batch_size",
            "Logins (IssueToken, self-rotation) settled per database transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.login_batch_seconds = Histogram(
            "authsvc_login_batch_seconds",
            "Time to settle one batch of logins, transaction and commit included.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Alert inputs (deploy/prometheus/alerts.yml): whether the last state sync reached the
        # database, and the schedule the active key's age is compared with.
        self.database_up = Gauge(
            "authsvc_database_up",
            "1 when this replica's last state sync reached the database, 0 when it failed.",
            registry=self.registry,
        )
        self.key_rotation_interval = Gauge(
            "authsvc_signing_key_rotation_interval_seconds",
            "The configured scheduled signing-key rotation interval (0: no schedule).",
            registry=self.registry,
        )
        self.clock_steps = Counter(
            "authsvc_clock_steps",
            "Steps of the wall clock (a change that is not time passing), by direction.",
            ("direction",),
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        # The labelled children each RPC updates, found once per (method, code) instead of
        # through labels() (label validation, a lock and a tuple of strings) on every call.
        # Only known methods reach observe(), so these stay as small as the label sets.
        self._handled: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._latency: dict[str, Any] = {}
        self._logins: dict[tuple[str, str], Any] = {}

    def observe_clock_step(self, direction: str, seconds: float) -> None:
        self.clock_steps.labels(direction).inc()

    def observe_login_batch(self, size: int, seconds: float) -> None:
        self.login_batch_size.observe(size)
        self.login_batch_seconds.observe(seconds)

    def observe_login(self, action: str, outcome: str) -> None:
        counter = self._logins.get((action, outcome))
        if counter is None:
            counter = self._logins[(action, outcome)] = self.login_outcomes.labels(action, outcome)
        counter.inc()

    def observe(
        self, method: str, code: grpc.StatusCode, seconds: float | None, response: Any
    ) -> None:
        handled = self._handled.get((method, code))
        if handled is None:
            service, name = _split(method)
            handled = self._handled[(method, code)] = self.handled.labels(
                service, name, code.name
            )
        handled.inc()
        if seconds is not None:
            latency = self._latency.get(method)
            if latency is None:
                latency = self._latency[method] = self.latency.labels(*_split(method))
            latency.observe(seconds)
        if (
            method == _VALIDATE
            and isinstance(response, auth_pb2.ValidateTokenResponse)
            and not response.valid
        ):
            self.validation_failures.labels(auth_pb2.ValidationFailure.Name(response.reason)).inc()


    def observe_streamed(self, response: Any) -> None:
        self.streamed_validations.inc()
        if isinstance(response, auth_pb2.ValidateTokenResponse) and not response.valid:
            self.streamed_validation_failures.labels(
                auth_pb2.ValidationFailure.Name(response.reason)
            ).inc()


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class StateCollector(Collector):
    """Gauges read from the replica's in-memory state at scrape time."""

    def __init__(self, state: ServerState, repo: Repository, clock: Clock) -> None:
        self._state = state
        self._repo = repo
        self._clock = clock
        # The active key's activation time, fetched again only when the active kid changes.
        self._active: tuple[str, float | None] | None = None

    def _activated_at(self, kid: str) -> float | None:
        if self._active is None or self._active[0] != kid:
            record = self._repo.fetch_active_signing_key()
            if record is None or record.kid != kid:
                return None
            when = record.activated_at or record.created_at
            self._active = (kid, to_timestamp(when))
        return self._active[1]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock.now()
        state = self._state
        lag = GaugeMetricFamily(
            "authsvc_replica_sync_lag_seconds",
            "Seconds since this replica last pulled changes from the database.",
        )
        if state.last_sync_at is not None:
            lag.add_metric([], max(0.0, now - state.last_sync_at))
        yield lag
        yield GaugeMetricFamily(
            "authsvc_revocations_held",
            "Revocations held in memory (still in force).",
            value=len(state.revocations),
        )
        yield GaugeMetricFamily(
            "authsvc_signing_keys_published",
            "Public keys in the JWK Set (active, next and retired-but-published).",
            value=len(state.keyring),
        )
        age = GaugeMetricFamily(
            "authsvc_signing_key_active_age_seconds",
            "Seconds since the active signing key was activated.",
        )
        signer = state.signer
        if signer is not None:
            try:
                activated = self._activated_at(signer.kid)
            except Exception:  # a scrape must not fail because the database is away
                activated = None
            if activated is not None:
                age.add_metric([], max(0.0, now - activated))
        yield age

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # No describe at registration time: collect() reads live state.
        return iter(())


def _code(context: grpc.aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member
    return default


# Bounds MetricsInterceptor's table of wrapped handlers, should a generic handler answer
# method names of the caller's choosing.
_MAX_WRAPPED = 1024


def _always_debug(code: grpc.StatusCode, response: Any) -> int:
    return logging.DEBUG


def _always_info(code: grpc.StatusCode, response: Any) -> int:
    return logging.INFO


def _debug_when_ok(code: grpc.StatusCode, response: Any) -> int:
    """Routine reads stay at DEBUG, but a token refused is worth an INFO line."""
    if code != grpc.StatusCode.OK:
        return logging.INFO
    invalid = isinstance(response, auth_pb2.ValidateTokenResponse) and not response.valid
    return logging.INFO if invalid else logging.DEBUG


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC by method and code, times unary ones, and writes one access-log line.

    Never raises and never changes what the handler returns. Unknown methods are not counted,
    so a caller cannot grow the label set.
    """

    def __init__(self, metrics: Metrics, *, quiet_when_ok: frozenset[str] = QUIET_WHEN_OK) -> None:
        self._metrics = metrics
        self._quiet_when_ok = quiet_when_ok
        # method -> (the server's handler, its wrapped twin). The wrapping is the same for
        # every call of a method, so it is made once: building handlers and closures per call
        # (grpc's *_rpc_method_handler imports a module each time) was a measurable share of
        # a unary call's server CPU (BENCHMARKS, issue 16's fifth round). Only methods the
        # server has a handler for get here, so it stays as small as the method table.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < _MAX_WRAPPED:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        level = self._levels(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, level),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, level),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, level),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, level),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _done(
        self,
        fields: dict[str, Any],
        method: str,
        code: grpc.StatusCode,
        started: float,
        response: Any,
        level: Callable[[grpc.StatusCode, Any], int],
        *,
        timed: bool,
    ) -> None:
        # perf_counter measures an interval, it does not read the wall clock.
        seconds = time.perf_counter() - started
        try:
            self._metrics.observe(method, code, seconds if timed else None, response)
        except Exception:
            access_log.exception("metrics update failed")
        severity = level(code, response)
        if access_log.isEnabledFor(severity):  # most calls log nothing (a valid check, Health)
            fields["outcome"] = code.name
            fields["duration_ms"] = round(seconds * 1000, 3)
            access_log.log(severity, "rpc")

    def _levels(self, method: str) -> Callable[[grpc.StatusCode, Any], int]:
        """The access line's level for a call of `method`, by its outcome."""
        if _split(method)[0] in _QUIET_SERVICES:
            return _always_debug
        if method in self._quiet_when_ok:
            return _debug_when_ok
        return _always_info

    def _unary(
        self, behavior: Any, method: str, level: Callable[[grpc.StatusCode, Any], int]
    ) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            f = {
                # Made only if a log line or an audit row of the call reads it (logs.Deferred).
                "request_id": Deferred(request_id_from, context.invocation_metadata()),
                "method": method,
                "peer": context.peer(),
            }
            token = enter_rpc(f)
            response, code = None, grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = _code(context, grpc.StatusCode.OK)
                return response
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._done(f, method, code, started, response, level, timed=True)
                leave_rpc(token)

        return wrapper

    def _stream(
        self, behavior: Any, method: str, level: Callable[[grpc.StatusCode, Any], int]
    ) -> Any:
        """Streams come as async generators (ours) or coroutines calling context.write (health)."""
        service, name = _split(method)

        @contextlib.asynccontextmanager
        async def observed(
            context: grpc.aio.ServicerContext[Any, Any],
        ) -> AsyncIterator[None]:
            started = time.perf_counter()
            gauge = self._metrics.streams_open.labels(service, name)
            gauge.inc()
            request_id = Deferred(request_id_from, context.invocation_metadata())
            with rpc_context(request_id=request_id, method=method, peer=context.peer()) as f:
                code = grpc.StatusCode.UNKNOWN
                try:
                    yield
                    code = _code(context, grpc.StatusCode.OK)
                except grpc.aio.AbortError:
                    code = _code(context, grpc.StatusCode.UNKNOWN)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    gauge.dec()
                    self._done(f, method, code, started, None, level, timed=False)

        if inspect.isasyncgenfunction(behavior) and method == _VALIDATE_STREAM:
            observe_streamed = self._metrics.observe_streamed

            async def counted(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with observed(context):
                    async for item in behavior(request, context):
                        observe_streamed(item)
                        yield item

            return counted

        if inspect.isasyncgenfunction(behavior):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with observed(context):
                    async for item in behavior(request, context):
                        yield item

            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with observed(context):
                return await behavior(request, context)

        return coroutine
