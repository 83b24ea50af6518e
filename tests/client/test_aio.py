"""grpc.aio: client interceptors over AsyncTokenSource, server interceptor with both validators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from authsvc_client import AsyncTokenSource, LocalValidator, current_claims
from authsvc_client.aio import AsyncAuthServerInterceptor, AsyncRemoteValidator, bearer_interceptors
from authsvc_client.v1 import auth_pb2
from tests.client.conftest import (
    BILLING_SCOPES,
    CHARGE,
    FOLLOWER_AUDIENCE,
    GET,
    LIST,
    SECRET_METHOD,
)
from tests.integration.conftest import World

ISSUE = "/authsvc.v1.AuthService/IssueToken"


async def _whoami(_request: bytes, _context: Any) -> bytes:
    claims = current_claims()
    return b"anonymous" if claims is None else claims.subject.encode()


async def _list(_request: bytes, _context: Any) -> AsyncIterator[bytes]:
    for i in range(3):
        await asyncio.sleep(0)
        claims = current_claims()
        yield f"{i}:{None if claims is None else claims.subject}".encode()


class _Counter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.issued = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method == ISSUE and request.audience != FOLLOWER_AUDIENCE:
            self.issued += 1
        return await continuation(details, request)


async def _billing(validator: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[AsyncAuthServerInterceptor(validator, BILLING_SCOPES)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Billing",
                {
                    "Charge": grpc.unary_unary_rpc_method_handler(_whoami),
                    "Get": grpc.unary_unary_rpc_method_handler(_whoami),
                    "Internal": grpc.unary_unary_rpc_method_handler(_whoami),
                    "List": grpc.unary_stream_rpc_method_handler(_list),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _code(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("mode", ["local", "remote"])
class TestAioEndToEnd:
    def test_authenticated_denied_and_single_flight(
        self, world: World, local_validator: LocalValidator, mode: str
    ) -> None:
        async def scenario() -> None:
            authsvc_for_validator = grpc.aio.insecure_channel(world.server.address)
            validator: Any = (
                local_validator
                if mode == "local"
                else AsyncRemoteValidator(authsvc_for_validator, "billing", cache_ttl_seconds=1)
            )
            server, address = await _billing(validator)
            counter = _Counter()
            authsvc = grpc.aio.insecure_channel(world.server.address, interceptors=[counter])
            source = AsyncTokenSource(authsvc, service_id="orders",
                                      service_secret=world.orders_secret, audience="billing")
            channel = grpc.aio.insecure_channel(address, interceptors=bearer_interceptors(source))
            bare = grpc.aio.insecure_channel(address)
            try:
                replies = await asyncio.gather(
                    *(channel.unary_unary(CHARGE)(b"", timeout=10) for _ in range(100))
                )
                assert replies == [b"orders"] * 100
                assert counter.issued == 1  # 100 concurrent calls, one IssueToken
                items = [item async for item in channel.unary_stream(LIST)(b"", timeout=10)]
                assert items == [b"0:orders", b"1:orders", b"2:orders"]

                assert await _code(bare.unary_unary(GET)(b"", timeout=10)) == (
                    grpc.StatusCode.UNAUTHENTICATED
                )
                assert await _code(channel.unary_unary(SECRET_METHOD)(b"", timeout=10)) == (
                    grpc.StatusCode.PERMISSION_DENIED
                )
                read_only = world.server.issue(
                    "orders", world.orders_secret, "billing", ["billing.read"]
                ).access_token
                md = (("authorization", f"Bearer {read_only}"),)
                assert await bare.unary_unary(GET)(b"", metadata=md, timeout=10) == b"orders"
                assert await _code(bare.unary_unary(CHARGE)(b"", metadata=md, timeout=10)) == (
                    grpc.StatusCode.PERMISSION_DENIED
                )

                # revoked: rejected once the feed (local) or the cache TTL (remote) catches up
                world.server.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=read_only), timeout=5
                )
                code = grpc.StatusCode.OK
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    code = await _code(bare.unary_unary(GET)(b"", metadata=md, timeout=10))
                    if code != grpc.StatusCode.OK:
                        break
                    await asyncio.sleep(0.01)
                assert code == grpc.StatusCode.UNAUTHENTICATED
            finally:
                await channel.close()
                await bare.close()
                await authsvc.close()
                await server.stop(None)
                await authsvc_for_validator.close()

        asyncio.run(scenario())



class TestAioRemoteOutage:
    def test_authsvc_unreachable_remote_fails_closed(self, world: World) -> None:
        async def scenario() -> grpc.StatusCode:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dead = f"127.0.0.1:{s.getsockname()[1]}"
            dead_channel = grpc.aio.insecure_channel(dead)
            server, address = await _billing(
                AsyncRemoteValidator(dead_channel, "billing", timeout_seconds=1)
            )
            token = world.server.issue("orders", world.orders_secret, "billing").access_token
            async with grpc.aio.insecure_channel(address) as ch:
                code = await _code(
                    ch.unary_unary(GET)(b"", metadata=(("authorization", f"Bearer {token}"),),
                                        timeout=10)
                )
            await server.stop(None)
            await dead_channel.close()
            return code

        assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE
