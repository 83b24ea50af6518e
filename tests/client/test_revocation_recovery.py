"""Issue 13 item 2: after an admin revokes all of a service's tokens (the leaked-secret
runbook), a running source gets a new token within seconds, without a restart: by following
WatchRevocations (call credentials, interceptors) or by the interceptor's one retry after
the callee's UNAUTHENTICATED. Real authsvc, real billing service, real channels."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from authsvc_client import (
    AsyncTokenSource,
    BearerTokenInterceptor,
    TokenSource,
    call_credentials,
)
from authsvc_client.aio import bearer_interceptors
from authsvc_client.v1 import auth_pb2
from tests.client.conftest import CHARGE, Billing, Counter, FakeClock, call, status_of
from tests.integration.conftest import World

# Generous: the machine is shared; recovery normally takes about a second.
DEADLINE_SECONDS = 30.0


class Caller:
    """A service registered for this test only (so revoking it touches nothing else), with
    authsvc among its audiences: a source asks for an `authsvc` token to follow revocations."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.service_id = f"orders-{uuid.uuid4().hex[:8]}"
        self.secret = world.server.create_service(
            self.service_id, ["billing", "authsvc"], ["billing.read", "billing.write"]
        )

    def revoke_all(self) -> None:
        self.world.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id=self.service_id, reason="leaked secret"),
            metadata=self.world.admin_md(),
            timeout=10,
        )

    def wait_refused(self, billing: Billing, token: str) -> None:
        """Until billing itself refuses the revoked token (the local validator follows the
        feed too), so that a later success can only come from a new token."""
        md = [("authorization", f"Bearer {token}")]
        with grpc.insecure_channel(billing.address) as bare:
            wait_for(lambda: status_of(lambda: call(bare, metadata=md))
                     == grpc.StatusCode.UNAUTHENTICATED)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("not within the deadline")
        time.sleep(0.05)


async def wait_for_async(condition: Callable[[], Any]) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("not within the deadline")
        await asyncio.sleep(0.05)


@pytest.fixture
def caller(world: World) -> Caller:
    return Caller(world)


def _local_creds(source: Any) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(source),
    )


def _ok(channel: grpc.Channel, expected: bytes) -> Callable[[], bool]:
    def attempt() -> bool:
        try:
            return call(channel) == expected
        except grpc.RpcError:
            return False

    return attempt


@pytest.fixture
def source(caller: Caller, authsvc_channel: grpc.Channel) -> Iterator[TokenSource]:
    src = TokenSource(authsvc_channel, service_id=caller.service_id,
                      service_secret=caller.secret, audience="billing")
    yield src
    src.close()


class TestSyncRecovery:
    def test_call_credentials_recover_after_revoke_all(
        self, caller: Caller, source: TokenSource, billing: Billing, counter: Counter
    ) -> None:
        me = caller.service_id.encode()
        with grpc.secure_channel(billing.local_address, _local_creds(source)) as ch:
            assert call(ch) == me
            first = source.token()
            caller.revoke_all()
            caller.wait_refused(billing, first)
            wait_for(_ok(ch, me))
            assert source.token() != first
        assert counter.count() == 2  # the first token and one replacement, single flight

    def test_interceptor_recovers_after_revoke_all(
        self, caller: Caller, source: TokenSource, billing: Billing, counter: Counter
    ) -> None:
        me = caller.service_id.encode()
        channel = grpc.intercept_channel(
            grpc.insecure_channel(billing.address), BearerTokenInterceptor(source)
        )
        try:
            assert call(channel) == me
            first = source.token()
            caller.revoke_all()
            caller.wait_refused(billing, first)
            wait_for(_ok(channel, me))
            assert source.token() != first
        finally:
            channel.close()
        assert counter.count() == 2

    def test_interceptor_retries_once_on_unauthenticated_without_following(
        self, caller: Caller, authsvc_channel: grpc.Channel, billing: Billing, counter: Counter
    ) -> None:
        clock = FakeClock()
        src = TokenSource(authsvc_channel, service_id=caller.service_id,
                          service_secret=caller.secret, audience="billing", clock=clock,
                          follow_revocations=False)
        me = caller.service_id.encode()
        channel = grpc.intercept_channel(
            grpc.insecure_channel(billing.address), BearerTokenInterceptor(src)
        )
        try:
            assert call(channel) == me
            first = src.token()
            caller.revoke_all()
            caller.wait_refused(billing, first)
            # A token only seconds old is not dropped on a callee's word (no IssueToken storm).
            assert status_of(lambda: call(channel)) == grpc.StatusCode.UNAUTHENTICATED
            assert counter.count() == 1
            clock.advance(60)
            assert call(channel) == me  # the failed attempt and one retry, inside one call
            assert src.token() != first
            assert counter.count() == 2
        finally:
            channel.close()
            src.close()

    def test_invalidate_fetches_a_new_token_once(
        self, caller: Caller, source: TokenSource, counter: Counter
    ) -> None:
        first = source.token()
        assert source.invalidate("not-the-current-token") is False
        assert source.token() == first
        assert source.invalidate() is True
        second = source.token()
        assert second != first
        assert counter.count() == 2

    def test_close_stops_following(self, caller: Caller, authsvc_channel: grpc.Channel) -> None:
        src = TokenSource(authsvc_channel, service_id=caller.service_id,
                          service_secret=caller.secret, audience="billing")
        src.token()
        wait_for(lambda: src._follow_call is not None)
        src.close()
        assert src._follower is not None
        src._follower.join(DEADLINE_SECONDS)
        assert not src._follower.is_alive()

    def test_following_ends_when_the_channel_is_closed(
        self, caller: Caller, world: World
    ) -> None:
        channel = grpc.insecure_channel(world.server.address)
        src = TokenSource(channel, service_id=caller.service_id,
                          service_secret=caller.secret, audience="billing")
        src.token()
        wait_for(lambda: src._follow_call is not None)
        channel.close()  # without closing the source
        assert src._follower is not None
        src._follower.join(DEADLINE_SECONDS)
        assert not src._follower.is_alive()


class TestAioRecovery:
    def test_call_credentials_and_interceptors_recover_after_revoke_all(
        self, caller: Caller, world: World, billing: Billing
    ) -> None:
        me = caller.service_id.encode()

        async def scenario() -> tuple[str, str]:
            authsvc = grpc.aio.insecure_channel(world.server.address)
            source = AsyncTokenSource(authsvc, service_id=caller.service_id,
                                      service_secret=caller.secret, audience="billing")
            plugin_ch = grpc.aio.secure_channel(billing.local_address, _local_creds(source))
            icpt_ch = grpc.aio.insecure_channel(
                billing.address, interceptors=bearer_interceptors(source)
            )

            async def ok(channel: grpc.aio.Channel) -> bool:
                try:
                    return bool(await channel.unary_unary(CHARGE)(b"", timeout=10) == me)
                except grpc.aio.AioRpcError:
                    return False

            try:
                assert await ok(plugin_ch) and await ok(icpt_ch)
                first = await source.token()
                await asyncio.to_thread(caller.revoke_all)
                await asyncio.to_thread(caller.wait_refused, billing, first)
                await wait_for_async(lambda: ok(plugin_ch))
                await wait_for_async(lambda: ok(icpt_ch))
                return first, await source.token()
            finally:
                await plugin_ch.close()
                await icpt_ch.close()
                await source.close()
                await authsvc.close()

        first, last = asyncio.run(scenario())
        assert first != last

    def test_interceptor_retries_once_on_unauthenticated_without_following(
        self, caller: Caller, world: World, billing: Billing
    ) -> None:
        me = caller.service_id.encode()
        clock = FakeClock()

        async def scenario() -> tuple[grpc.StatusCode, bytes, str, str]:
            authsvc = grpc.aio.insecure_channel(world.server.address)
            source = AsyncTokenSource(authsvc, service_id=caller.service_id,
                                      service_secret=caller.secret, audience="billing",
                                      clock=clock, follow_revocations=False)
            channel = grpc.aio.insecure_channel(
                billing.address, interceptors=bearer_interceptors(source)
            )
            try:
                assert await channel.unary_unary(CHARGE)(b"", timeout=10) == me
                first = await source.token()
                await asyncio.to_thread(caller.revoke_all)
                await asyncio.to_thread(caller.wait_refused, billing, first)
                try:
                    await channel.unary_unary(CHARGE)(b"", timeout=10)
                    young = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    young = exc.code()
                clock.advance(60)
                reply = await channel.unary_unary(CHARGE)(b"", timeout=10)
                return young, reply, first, await source.token()
            finally:
                await channel.close()
                await source.close()
                await authsvc.close()

        young, reply, first, last = asyncio.run(scenario())
        assert young == grpc.StatusCode.UNAUTHENTICATED  # seconds-old token: not dropped
        assert reply == me and last != first
