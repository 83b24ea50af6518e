"""Remote validators over ValidateTokenStream against a real server: ordering, deadlines,
fallback to unary ValidateToken against a server without the RPC."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from authsvc_client.aio import AsyncRemoteValidator
from authsvc_client.errors import ValidatorUnavailable
from authsvc_client.streaming import _Pool, _refused, _status_hidden, _status_without_writes
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


def _jti(token: str) -> str:
    import base64
    import json

    seg = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))["jti"])
