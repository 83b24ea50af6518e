"""Remote validators over ValidateTokenStream against a real server: ordering, deadlines,
fallback to unary ValidateToken against a server without the RPC."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from authsvc_client.aio import AsyncRemoteValidator
from authsvc_client.errors import ValidatorUnavailable
from authsvc_client.streaming import (
    AsyncStreamMux,
    _Fifo,
    _Pool,
    _refused,
    _status_hidden,
    _status_without_writes,
)
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import RemoteValidator
from tests.integration.conftest import World

_SERVICE = "authsvc.v1.AuthService"


def _tokens(world: World, n: int) -> list[str]:
    return [
        world.server.issue("orders", world.orders_secret, "billing").access_token for _ in range(n)
    ]


def _server(handlers: dict[str, grpc.RpcMethodHandler]) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def unary_only(world: World) -> Iterator[str]:
    """A server with ValidateToken only (as before the stream existed), answering by asking the
    real authsvc."""
    upstream = grpc.insecure_channel(world.server.address)
    stub_call = upstream.unary_unary(
        f"/{_SERVICE}/ValidateToken",
        request_serializer=auth_pb2.ValidateTokenRequest.SerializeToString,
        response_deserializer=auth_pb2.ValidateTokenResponse.FromString,
    )

    def delegate(request: auth_pb2.ValidateTokenRequest, _context: Any) -> Any:
        return stub_call(request, timeout=10)

    server, address = _server(
        {
            "ValidateToken": grpc.unary_unary_rpc_method_handler(
                delegate,
                request_deserializer=auth_pb2.ValidateTokenRequest.FromString,
                response_serializer=auth_pb2.ValidateTokenResponse.SerializeToString,
            )
        }
    )
    yield address
    server.stop(None)
    upstream.close()


@pytest.fixture
def silent_stream() -> Iterator[tuple[str, threading.Event]]:
    """A server whose stream reads requests and never answers until released."""
    release = threading.Event()

    def swallow(requests: Iterator[Any], _context: Any) -> Iterator[Any]:
        for _ in requests:
            release.wait(30)
        return iter(())

    server, address = _server(
        {
            "ValidateTokenStream": grpc.stream_stream_rpc_method_handler(
                swallow,
                request_deserializer=auth_pb2.ValidateTokenRequest.FromString,
                response_serializer=auth_pb2.ValidateTokenResponse.SerializeToString,
            )
        }
    )
    yield address, release
    release.set()
    server.stop(None)


class TestSyncStreams:
    def test_concurrent_checks_each_get_their_own_answer(self, world: World) -> None:
        tokens = _tokens(world, 40)
        with grpc.insecure_channel(world.server.address) as channel:
            validator = RemoteValidator(channel, "billing", cache_ttl_seconds=0, timeout_seconds=10)
            barrier = threading.Barrier(8)

            def check(i: int) -> tuple[int, str, bool]:
                if i < 8:
                    barrier.wait(10)
                audience = "billing" if i % 3 else "inventory"
                result = (
                    RemoteValidator.validate(validator, tokens[i])
                    if audience == "billing"
                    else None
                )
                if result is None:
                    other = RemoteValidator(channel, "inventory", cache_ttl_seconds=0)
                    wrong = other.validate(tokens[i])
                    other.close()
                    return i, "", wrong.valid
                assert result.claims is not None
                return i, result.claims.jti, result.valid

            with futures.ThreadPoolExecutor(max_workers=8) as pool:
                answers = list(pool.map(check, range(len(tokens))))
            assert validator.streams is not None and validator.streams.answered > 0
            validator.close()
        for i, jti, valid in answers:
            if i % 3:
                assert valid and jti == _jti(tokens[i])
            else:
                assert not valid

    def test_a_check_past_its_deadline_is_unavailable(
        self, silent_stream: tuple[str, threading.Event]
    ) -> None:
        address, _release = silent_stream
        with grpc.insecure_channel(address) as channel:
            validator = RemoteValidator(
                channel, "billing", cache_ttl_seconds=0, timeout_seconds=0.5
            )
            with pytest.raises(ValidatorUnavailable):
                validator.validate("a.b.c")
            validator.close()

    def test_server_without_the_rpc_gets_unary_calls(self, world: World, unary_only: str) -> None:
        token = _tokens(world, 1)[0]
        with grpc.insecure_channel(unary_only) as channel:
            validator = RemoteValidator(channel, "billing", cache_ttl_seconds=0, timeout_seconds=10)
            assert validator.validate(token).valid
            assert validator.validate(token).valid
            assert (
                validator.validate(token, required_scopes=["nope"]).reason_name
                == "INSUFFICIENT_SCOPE"
            )
            # The checks may have gone unary before the stream's UNIMPLEMENTED arrived.
            assert validator.streams is not None
            deadline = time.monotonic() + 30
            while not validator.streams.unsupported and time.monotonic() < deadline:
                time.sleep(0.05)
            assert validator.streams.unsupported
            assert validator.streams.answered == 0
            validator.close()


class TestAsyncStreams:
    def test_concurrent_checks_each_get_their_own_answer(self, world: World) -> None:
        tokens = _tokens(world, 30)

        async def main() -> list[tuple[str, bool]]:
            async with grpc.aio.insecure_channel(world.server.address) as channel:
                validator = AsyncRemoteValidator(
                    channel, "billing", cache_ttl_seconds=0, timeout_seconds=10
                )
                results = await asyncio.gather(*(validator.validate(t) for t in tokens))
                assert validator.streams is not None and validator.streams.answered == len(tokens)
                validator.close()
                return [(r.claims.jti if r.claims else "", r.valid) for r in results]

        answers = asyncio.run(main())
        assert answers == [(_jti(t), True) for t in tokens]

    def test_server_without_the_rpc_gets_unary_calls(self, world: World, unary_only: str) -> None:
        token = _tokens(world, 1)[0]

        async def main() -> None:
            async with grpc.aio.insecure_channel(unary_only) as channel:
                validator = AsyncRemoteValidator(
                    channel, "billing", cache_ttl_seconds=0, timeout_seconds=10
                )
                assert (await validator.validate(token)).valid
                # The check may have gone unary before the stream's UNIMPLEMENTED arrived, and
                # in about 1 run of 3 grpc.aio hides it behind its own INTERNAL (the mux then
                # asks again without writing): either way the mux pauses its streams.
                assert validator.streams is not None
                deadline = time.monotonic() + 30
                while not validator.streams.unsupported and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert validator.streams.unsupported
                for _ in range(3):
                    assert (await validator.validate(token)).valid
                assert validator.streams.answered == 0
                assert validator.streams.open_streams == 0
                validator.close()

        asyncio.run(main())


class _Ended:
    """The one member the pool reads of a stream that has already ended."""

    alive = False
    load = 0

    def close(self) -> None:
        pass


class TestWhatAStreamsEndMeans:
    """`_refused` is the decision both muxes take when a stream ends; the pool applies it."""

    def test_internal_before_any_answer_naming_the_missing_method_pauses_streams(self) -> None:
        now = [0.0]
        pool: _Pool[_Ended] = _Pool(1, clock=lambda: now[0])
        # How grpc-go reports it, relayed as INTERNAL by a proxy.
        missing = "unknown method ValidateTokenStream for service authsvc.v1.AuthService"
        assert _refused(grpc.StatusCode.INTERNAL, missing, answered=False)
        assert _refused(grpc.StatusCode.UNKNOWN, "Method not found!", answered=False)
        assert _refused(grpc.StatusCode.UNIMPLEMENTED, "", answered=False)
        pool.ended(_Ended(), grpc.StatusCode.INTERNAL, answered=False, details=missing)
        assert pool.reconnect.unsupported
        now[0] = 299.0
        assert pool.pick(lambda: pytest.fail("asked a server without the RPC again")) is None
        now[0] = 301.0
        assert pool.pick(_Ended) is not None

    def test_a_genuine_internal_failure_backs_off_and_retries(self) -> None:
        now = [0.0]
        pool: _Pool[_Ended] = _Pool(1, clock=lambda: now[0])
        # After answers the server has the RPC, whatever the details say.
        assert not _refused(grpc.StatusCode.INTERNAL, "Method not found!", answered=True)
        assert not _refused(grpc.StatusCode.INTERNAL, "stream reset by peer", answered=False)
        assert not _refused(grpc.StatusCode.UNAVAILABLE, "not implemented", answered=False)
        pool.ended(_Ended(), grpc.StatusCode.INTERNAL, answered=True, details="stream reset")
        assert not pool.reconnect.unsupported
        assert pool.pick(lambda: pytest.fail("opened during back-off")) is None
        now[0] = 0.3
        assert pool.pick(_Ended) is not None

    def test_grpc_aios_own_internal_says_nothing_about_the_server(self) -> None:
        # What grpc.aio reports when its write failed because the server had refused the call.
        code, details = grpc.StatusCode.INTERNAL, "Internal error from Core"
        assert _status_hidden(code, details, answered=False)
        assert not _refused(code, details, answered=False)
        assert not _status_hidden(code, details, answered=True)
        assert not _status_hidden(grpc.StatusCode.INTERNAL, "stream reset", answered=False)

    def test_a_call_without_writes_gets_the_servers_own_status(
        self, world: World, unary_only: str
    ) -> None:
        async def status(address: str) -> tuple[grpc.StatusCode, str]:
            async with grpc.aio.insecure_channel(address) as channel:
                return await _status_without_writes(
                    auth_pb2_grpc.AuthServiceStub(channel), timeout=10
                )

        code, details = asyncio.run(status(unary_only))
        assert code == grpc.StatusCode.UNIMPLEMENTED and _refused(code, details, answered=False)
        code, details = asyncio.run(status(world.server.address))
        assert not _refused(code, details, answered=False), code


# --- streams that stall, reset or end, against scripted servers and fakes -----------------

Validate = Callable[..., auth_pb2.ValidateTokenResponse]
StreamScript = Callable[[int, Iterator[Any], Any, Validate], Iterator[Any]]


class _Scripted:
    """A server answering like authsvc (by asking the real one), whose n-th ValidateTokenStream
    call (from 1) does what `script(n, requests, context, validate)` says."""

    def __init__(self, validate: Validate, script: StreamScript) -> None:
        self.opened = 0
        calls = itertools.count(1)

        def stream(requests: Iterator[Any], context: Any) -> Iterator[Any]:
            n = next(calls)
            self.opened = n
            return script(n, requests, context, validate)

        self.server, self.address = _server(
            {
                "ValidateToken": grpc.unary_unary_rpc_method_handler(
                    lambda request, _context: validate(request, timeout=10),
                    request_deserializer=auth_pb2.ValidateTokenRequest.FromString,
                    response_serializer=auth_pb2.ValidateTokenResponse.SerializeToString,
                ),
                "ValidateTokenStream": grpc.stream_stream_rpc_method_handler(
                    stream,
                    request_deserializer=auth_pb2.ValidateTokenRequest.FromString,
                    response_serializer=auth_pb2.ValidateTokenResponse.SerializeToString,
                ),
            }
        )


@pytest.fixture
def scripted(world: World) -> Iterator[Callable[[StreamScript], _Scripted]]:
    upstream = grpc.insecure_channel(world.server.address)
    validate = upstream.unary_unary(
        f"/{_SERVICE}/ValidateToken",
        request_serializer=auth_pb2.ValidateTokenRequest.SerializeToString,
        response_deserializer=auth_pb2.ValidateTokenResponse.FromString,
    )
    started: list[_Scripted] = []

    def start(script: StreamScript) -> _Scripted:
        started.append(_Scripted(validate, script))
        return started[-1]

    yield start
    for server in started:
        server.server.stop(None)
    upstream.close()


def _answer(requests: Iterator[Any], validate: Validate) -> Iterator[Any]:
    for request in requests:
        yield validate(request, timeout=10)


def _swallow(requests: Iterator[Any], context: Any, seen: threading.Event) -> Iterator[Any]:
    """Read requests and never answer, without ending the stream (a wedged replica)."""
    gone = threading.Event()
    context.add_callback(gone.set)
    try:
        for _ in requests:
            seen.set()
            gone.wait(30)
    except grpc.RpcError:
        pass
    yield from ()


def _first_stalls(seen: threading.Event) -> StreamScript:
    """The first stream stalls; later ones (a healthy replica) answer."""

    def script(n: int, requests: Iterator[Any], context: Any, validate: Validate) -> Iterator[Any]:
        return _swallow(requests, context, seen) if n == 1 else _answer(requests, validate)

    return script


def _reset(n: int, requests: Iterator[Any], context: Any, validate: Validate) -> Iterator[Any]:
    """Every stream is reset (RST_STREAM CANCEL: a proxy or server dropping streams)."""
    next(requests, None)
    context.cancel()
    yield from ()


# A stalled stream's first check waits out its timeout; one sent STALL_GAP later is released
# when the stall is found and still has STALL_GAP left to ask unary.
STALL_TIMEOUT = 0.8
STALL_GAP = 0.4
PAST_BACKOFF = 0.6  # the first back-off is 0.25 s


class TestAStalledStream:
    """A stream that stops answering without ending is cancelled once its oldest unanswered
    check waited a whole timeout: its other checks go unary, and a new stream opens."""

    def test_sync(self, world: World, scripted: Callable[[StreamScript], _Scripted]) -> None:
        token = _tokens(world, 1)[0]
        seen = threading.Event()
        server = scripted(_first_stalls(seen))
        with grpc.insecure_channel(server.address) as channel:
            validator = RemoteValidator(
                channel, "billing", cache_ttl_seconds=0, timeout_seconds=STALL_TIMEOUT, streams=1
            )
            with futures.ThreadPoolExecutor(max_workers=2) as pool:
                first = pool.submit(validator.validate, token)
                assert seen.wait(10)
                time.sleep(STALL_GAP)
                second = pool.submit(validator.validate, token)
                with pytest.raises(ValidatorUnavailable):
                    first.result(10)
                assert second.result(10).valid  # released by the cancel, answered unary
            assert validator.validate(token).valid  # during the back-off: unary at once
            time.sleep(PAST_BACKOFF)
            assert validator.validate(token).valid
            assert validator.streams is not None
            assert server.opened == 2 and validator.streams.answered == 1
            validator.close()

    def test_async(self, world: World, scripted: Callable[[StreamScript], _Scripted]) -> None:
        token = _tokens(world, 1)[0]
        seen = threading.Event()
        server = scripted(_first_stalls(seen))

        async def main() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                validator = AsyncRemoteValidator(
                    channel,
                    "billing",
                    cache_ttl_seconds=0,
                    timeout_seconds=STALL_TIMEOUT,
                    streams=1,
                )
                first = asyncio.create_task(validator.validate(token))
                assert await asyncio.to_thread(seen.wait, 10)
                await asyncio.sleep(STALL_GAP)
                second = asyncio.create_task(validator.validate(token))
                with pytest.raises(ValidatorUnavailable):
                    await first
                assert (await second).valid
                assert (await validator.validate(token)).valid
                await asyncio.sleep(PAST_BACKOFF)
                assert (await validator.validate(token)).valid
                assert validator.streams is not None
                assert server.opened == 2 and validator.streams.answered == 1
                validator.close()

        asyncio.run(main())

    def test_a_slow_stream_that_still_answers_is_not_stalled(self) -> None:
        fifo: _Fifo[str] = _Fifo(max_in_flight=8)
        assert fifo.admit("a", 0.0, 1.0) and fifo.admit("b", 0.5, 1.0)
        assert not fifo.stalled(0.9)
        assert fifo.answered(0.9) == "a"
        # b has waited 1.3 s, longer than its timeout, but the stream answered 0.9 s ago.
        assert not fifo.stalled(1.8)
        assert fifo.stalled(1.95)


class TestResetStreamsBackOff:
    """A server or proxy resetting every stream (CANCELLED) gets back-off, not one new stream
    per check."""

    CHECKS = 8

    def test_sync(self, world: World, scripted: Callable[[StreamScript], _Scripted]) -> None:
        token = _tokens(world, 1)[0]
        server = scripted(_reset)
        with grpc.insecure_channel(server.address) as channel:
            validator = RemoteValidator(channel, "billing", cache_ttl_seconds=0, timeout_seconds=10)
            for _ in range(self.CHECKS):
                assert validator.validate(token).valid
            validator.close()
        assert 1 <= server.opened <= self.CHECKS // 2

    def test_async(self, world: World, scripted: Callable[[StreamScript], _Scripted]) -> None:
        token = _tokens(world, 1)[0]
        server = scripted(_reset)

        async def main() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                validator = AsyncRemoteValidator(
                    channel, "billing", cache_ttl_seconds=0, timeout_seconds=10
                )
                for _ in range(self.CHECKS):
                    assert (await validator.validate(token)).valid
                validator.close()

        asyncio.run(main())
        assert 1 <= server.opened <= self.CHECKS // 2

    def test_resets_back_off_longer_each_time_and_clean_ends_reconnect_once(self) -> None:
        now = [0.0]
        pool: _Pool[_Ended] = _Pool(1, clock=lambda: now[0])
        reconnect = pool.reconnect
        for start, pause in ((0.0, 0.25), (10.0, 0.5), (20.0, 1.0)):
            now[0] = start
            pool.ended(_Ended(), grpc.StatusCode.CANCELLED, answered=False)
            now[0] = start + pause - 0.01
            assert not reconnect.allowed()
            now[0] = start + pause
            assert reconnect.allowed()
        # A clean end after answers (graceful shutdown): at once, once.
        now[0] = 100.0
        pool.ended(_Ended(), None, answered=True)
        assert reconnect.allowed()
        now[0] = 101.0
        pool.ended(_Ended(), None, answered=True)
        assert not reconnect.allowed()
        now[0] = 101.25
        assert reconnect.allowed()
        # A clean end before any answer is a failure.
        now[0] = 200.0
        pool.ended(_Ended(), None, answered=False)
        assert not reconnect.allowed()


class _HiddenStatusChannel:
    """A grpc.aio channel stand-in whose streams fail as grpc.aio fails a write the server
    refused (its own INTERNAL hides the status), and whose status probe (a call without
    requests) answers UNIMPLEMENTED once `answer` is set."""

    def __init__(self) -> None:
        self.streams = 0
        self.probes = 0
        self.answer = asyncio.Event()

    def stream_stream(self, _method: str, **_kwargs: Any) -> Any:
        return self._call

    def unary_unary(self, _method: str, **_kwargs: Any) -> Any:
        return None

    unary_stream = stream_unary = unary_unary

    def _call(self, requests: Any = None, timeout: float | None = None) -> Any:
        if requests is None:
            self.probes += 1
            return _Probe(self.answer)
        self.streams += 1
        return _RefusedWrite()


class _RefusedWrite:
    def __aiter__(self) -> _RefusedWrite:
        return self

    async def __anext__(self) -> Any:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Internal error from Core",
        )

    def cancel(self) -> bool:
        return False


class _Probe:
    def __init__(self, answer: asyncio.Event) -> None:
        self._answer = answer

    async def wait_for_connection(self) -> None:
        pass

    async def done_writing(self) -> None:
        pass

    async def code(self) -> grpc.StatusCode:
        await self._answer.wait()
        return grpc.StatusCode.UNIMPLEMENTED

    async def details(self) -> str:
        return "Method not found!"


def test_no_stream_opens_while_the_status_of_an_ended_one_is_asked() -> None:
    async def main() -> None:
        channel = _HiddenStatusChannel()
        mux = AsyncStreamMux(channel, streams=2)
        request = auth_pb2.ValidateTokenRequest(token="a.b.c", audience="billing")
        for _ in range(5):
            assert await mux.check(request, timeout=5) is None  # each goes unary
        assert (channel.streams, channel.probes) == (1, 1)
        channel.answer.set()
        for _ in range(100):
            if mux.unsupported:
                break
            await asyncio.sleep(0.01)
        assert mux.unsupported
        assert await mux.check(request, timeout=5) is None
        assert channel.streams == 1
        mux.close()

    asyncio.run(main())


class TestAnAnswerEndsThePauseForAServerWithoutTheRpc:
    """A rolling upgrade: one stream met an old replica (UNIMPLEMENTED), another answers."""

    def test_pool(self) -> None:
        now = [0.0]
        pool: _Pool[_Ended] = _Pool(2, clock=lambda: now[0])
        pool.ended(_Ended(), grpc.StatusCode.UNIMPLEMENTED, answered=False)
        now[0] = 1.0
        assert pool.pick(lambda: pytest.fail("asked a server without the RPC again")) is None
        pool.reconnect.answered()
        assert not pool.reconnect.unsupported
        assert pool.pick(_Ended) is not None

    def test_sync(self, world: World, scripted: Callable[[StreamScript], _Scripted]) -> None:
        token = _tokens(world, 1)[0]

        def script(
            n: int, requests: Iterator[Any], context: Any, validate: Validate
        ) -> Iterator[Any]:
            if n == 2:  # an old replica
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return _answer(requests, validate)

        server = scripted(script)
        with grpc.insecure_channel(server.address) as channel:
            validator = RemoteValidator(channel, "billing", cache_ttl_seconds=0, timeout_seconds=10)
            streams = validator.streams
            assert streams is not None
            assert validator.validate(token).valid  # the first stream answers
            assert validator.validate(token).valid  # a second stream: refused, then unary
            deadline = time.monotonic() + 10
            while not streams.unsupported and time.monotonic() < deadline:
                time.sleep(0.01)
            assert streams.unsupported and server.opened == 2
            assert validator.validate(token).valid  # the first stream answers again
            assert not streams.unsupported
            assert validator.validate(token).valid  # so a second stream opens
            assert server.opened == 3 and streams.answered == 3
            validator.close()


def _jti(token: str) -> str:
    import base64
    import json

    seg = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))["jti"])
