"""MetricsInterceptor on a real in-process grpc.aio server (port 0).

The interceptor wraps each method's handler once and reuses the wrapping for every call
(BENCHMARKS, issue 16's fifth round), so what must stay per call is checked here call by
call: the request id, the counts, the access line's outcome and level.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from authsvc.logs import JsonFormatter, current_request_id
from authsvc.server.metrics import Metrics, MetricsInterceptor

SERVICE = "test.v1.Echo"
ECHO = f"/{SERVICE}/Echo"
FAIL = f"/{SERVICE}/Fail"
STREAM = f"/{SERVICE}/Count"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    # Answers with the request id the call's log lines and audit rows would carry.
    return (current_request_id() or "").encode()


async def _fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    raise AssertionError("unreachable")


async def _count(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    for _ in range(3):
        yield (current_request_id() or "").encode()


_HANDLERS = grpc.method_handlers_generic_handler(
    SERVICE,
    {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    },
)


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("authsvc.access")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _run(metrics: Metrics, calls: Any) -> Any:
    async def main() -> Any:
        server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics)])
        server.add_generic_rpc_handlers((_HANDLERS,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await calls(channel)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def _handled(metrics: Metrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


class TestOneWrappingManyCalls:
    def test_each_call_gets_its_own_request_id_or_the_callers(
        self, access_lines: io.StringIO
    ) -> None:
        metrics = Metrics()

        async def calls(channel: grpc.aio.Channel) -> list[str]:
            echo = channel.unary_unary(ECHO)
            answers = [await echo(b"") for _ in range(3)]
            answers.append(await echo(b"", metadata=(("x-request-id", "caller-1"),)))
            answers.append(await echo(b""))
            return [bytes(a).decode() for a in answers]

        ids = _run(metrics, calls)
        generated = ids[:3] + ids[4:]
        assert all(generated) and len(set(generated)) == 4
        assert ids[3] == "caller-1"
        assert _handled(metrics, "Echo", "OK") == 5
        lines = _lines(access_lines)
        assert [line["request_id"] for line in lines] == ids
        assert {line["outcome"] for line in lines} == {"OK"}

    def test_outcomes_are_counted_and_logged_per_call(self, access_lines: io.StringIO) -> None:
        metrics = Metrics()

        async def calls(channel: grpc.aio.Channel) -> list[grpc.StatusCode]:
            codes = []
            for method in (ECHO, FAIL, ECHO, FAIL, FAIL):
                try:
                    await channel.unary_unary(method)(b"")
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            return codes

        codes = _run(metrics, calls)
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED] * 2 + [
            grpc.StatusCode.PERMISSION_DENIED
        ]
        assert _handled(metrics, "Echo", "OK") == 2
        assert _handled(metrics, "Fail", "PERMISSION_DENIED") == 3
        outcomes = [(line["method"], line["outcome"]) for line in _lines(access_lines)]
        assert outcomes == [
            (ECHO, "OK"),
            (FAIL, "PERMISSION_DENIED"),
            (ECHO, "OK"),
            (FAIL, "PERMISSION_DENIED"),
            (FAIL, "PERMISSION_DENIED"),
        ]

    def test_a_stream_keeps_one_request_id_and_the_next_stream_has_another(
        self, access_lines: io.StringIO
    ) -> None:
        metrics = Metrics()

        async def calls(channel: grpc.aio.Channel) -> list[list[str]]:
            count = channel.unary_stream(STREAM)
            return [[bytes(m).decode() async for m in count(b"")] for _ in range(2)]

        first, second = _run(metrics, calls)
        assert len(set(first)) == 1 and len(set(second)) == 1
        assert first[0] and second[0] and first[0] != second[0]
        assert _handled(metrics, "Count", "OK") == 2
        assert [line["request_id"] for line in _lines(access_lines)] == [first[0], second[0]]
