"""Issue 13 items 1 and 3, as a new user meets them: an asyncio token source on call
credentials from the first call, and refused audiences or scopes named at the call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from authsvc_client import (
    AsyncTokenSource,
    BearerTokenInterceptor,
    TokenRefused,
    TokenSource,
    call_credentials,
)
from authsvc_client.aio import bearer_interceptors
from tests.client.conftest import CHARGE, Billing, Counter, FakeClock, call
from tests.integration.conftest import World


def _env(world: World) -> dict[str, str]:
    return {
        "AUTHSVC_SERVICE_ID": "orders",
        "AUTHSVC_SERVICE_SECRET": world.orders_secret,
        "AUTHSVC_TARGET": world.server.address,
    }


def _creds(source: Any) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(source),
    )


async def _aio_failure(awaitable: Any) -> grpc.aio.AioRpcError:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call went through")


def _sync_failure(channel: grpc.Channel) -> grpc.RpcError:
    try:
        call(channel)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call went through")


class TestAsyncSourceOnCallCredentials:
    def test_from_env_works_on_the_first_call_without_async_with(
        self, world: World, billing: Billing
    ) -> None:
        async def scenario() -> list[bytes]:
            source = AsyncTokenSource.from_env("billing", environ=_env(world))
            try:
                async with grpc.aio.secure_channel(billing.local_address, _creds(source)) as ch:
                    return list(
                        await asyncio.gather(
                            *(ch.unary_unary(CHARGE)(b"", timeout=10) for _ in range(20))
                        )
                    )
            finally:
                await source.close()

        assert asyncio.run(scenario()) == [b"orders"] * 20

    def test_a_source_made_outside_any_loop_says_what_to_do(
        self, world: World, billing: Billing
    ) -> None:
        # Made before the loop runs (the set_event_loop + run_until_complete style): the
        # source cannot know which loop to start on from gRPC's plugin thread.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            source = AsyncTokenSource.from_env("billing", environ=_env(world))

            async def scenario() -> grpc.aio.AioRpcError:
                try:
                    async with grpc.aio.secure_channel(
                        billing.local_address, _creds(source)
                    ) as ch:
                        return await _aio_failure(ch.unary_unary(CHARGE)(b"", timeout=10))
                finally:
                    await source.close()

            error = loop.run_until_complete(scenario())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        details = error.details() or ""
        assert "not bound to an event loop" in details
        assert "create it inside the running loop" in details


class TestRefusedAudienceOrScope:
    """orders may ask for billing (billing.read, billing.write) and inventory, nothing else."""

    def test_call_credentials_name_the_refused_audience(
        self, world: World, authsvc_channel: grpc.Channel, billing: Billing
    ) -> None:
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="payroll")
        with grpc.secure_channel(billing.local_address, _creds(source)) as ch:
            error = _sync_failure(ch)
        source.close()
        details = error.details() or ""
        assert "PERMISSION_DENIED" in details
        assert "may not ask for audience 'payroll'" in details
        assert world.orders_secret not in details

    def test_call_credentials_name_the_missing_scope(
        self, world: World, authsvc_channel: grpc.Channel, billing: Billing
    ) -> None:
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="billing",
                             scopes=["billing.read", "billing.admin"])
        with grpc.secure_channel(billing.local_address, _creds(source)) as ch:
            error = _sync_failure(ch)
        source.close()
        details = error.details() or ""
        assert "PERMISSION_DENIED" in details
        assert "lacks scope billing.admin" in details
        assert "billing.read" not in details

    def test_interceptor_fails_with_permission_denied(
        self, world: World, authsvc_channel: grpc.Channel, billing: Billing
    ) -> None:
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="payroll")
        channel = grpc.intercept_channel(
            grpc.insecure_channel(billing.address), BearerTokenInterceptor(source)
        )
        error = _sync_failure(channel)
        channel.close()
        source.close()
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'payroll'" in (error.details() or "")

    def test_a_refusal_is_not_retried_like_an_outage(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter
    ) -> None:
        clock = FakeClock()
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="payroll",
                             clock=clock, follow_revocations=False)
        # Calls at t = 0, 2, ..., 14 s: an outage would have been retried within the first
        # second; a refusal waits at least half the 30 s maximum (jitter), so never here.
        for _ in range(8):
            with pytest.raises(TokenRefused):
                source.token()
            clock.advance(2)
        assert counter.count() == 1
        clock.advance(30)
        with pytest.raises(TokenRefused):
            source.token()
        assert counter.count() == 2  # asked again once the grant may have been fixed
        source.close()

    def test_aio_call_credentials_and_interceptor(self, world: World, billing: Billing) -> None:
        async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
            authsvc = grpc.aio.insecure_channel(world.server.address)
            source = AsyncTokenSource(authsvc, service_id="orders",
                                      service_secret=world.orders_secret, audience="payroll")
            try:
                async with grpc.aio.secure_channel(billing.local_address, _creds(source)) as ch:
                    through_plugin = await _aio_failure(ch.unary_unary(CHARGE)(b"", timeout=10))
                async with grpc.aio.insecure_channel(
                    billing.address, interceptors=bearer_interceptors(source)
                ) as ch:
                    through_interceptor = await _aio_failure(
                        ch.unary_unary(CHARGE)(b"", timeout=10)
                    )
            finally:
                await source.close()
                await authsvc.close()
            return through_plugin, through_interceptor

        plugin, interceptor = asyncio.run(scenario())
        assert "may not ask for audience 'payroll'" in (plugin.details() or "")
        assert interceptor.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not ask for audience 'payroll'" in (interceptor.details() or "")
