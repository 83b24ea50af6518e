"""Call credentials (AuthMetadataPlugin) on a local-credentials channel to a guarded service."""

from __future__ import annotations

import threading

import grpc

from authsvc_client import AuthMetadataPlugin, TokenSource, call_credentials
from tests.client.conftest import CHARGE, Billing, Counter, FakeClock, call, status_of
from tests.integration.conftest import World


def _secure(address: str, source: TokenSource) -> grpc.Channel:
    creds = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(source),
    )
    return grpc.secure_channel(address, creds)


class TestCallCredentials:
    def test_first_call_waits_for_the_token_without_blocking_grpc(
        self, world: World, authsvc_channel: grpc.Channel, billing: Billing
    ) -> None:
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="billing")
        with _secure(billing.local_address, source) as ch:
            assert call(ch) == b"orders"

    def test_one_issue_token_for_100_concurrent_calls_at_refresh_time(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter, billing: Billing
    ) -> None:
        clock = FakeClock()
        source = TokenSource(authsvc_channel, service_id="orders",
                             service_secret=world.orders_secret, audience="billing", clock=clock)
        with _secure(billing.local_address, source) as ch:
            assert call(ch) == b"orders"
            assert counter.count() == 1
            clock.advance(3600)  # the cached token is now unusable: all 100 calls need a new one
            barrier = threading.Barrier(100)
            results: list[bytes] = []
            failures: list[grpc.StatusCode] = []

            def caller() -> None:
                barrier.wait()
                try:
                    results.append(call(ch))
                except grpc.RpcError as exc:
                    failures.append(exc.code())

            threads = [threading.Thread(target=caller) for _ in range(100)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert failures == []
        assert results == [b"orders"] * 100
        assert counter.count() == 2

    def test_refused_token_fails_the_call_with_a_fixed_message(
        self, world: World, authsvc_channel: grpc.Channel, billing: Billing
    ) -> None:
        secret = "asvcs_another-wrong-secret-to-keep-out-of-status-0000"
        source = TokenSource(authsvc_channel, service_id="orders", service_secret=secret,
                             audience="billing")
        with _secure(billing.local_address, source) as ch:
            try:
                call(ch)
                raise AssertionError("call went through without a token")
            except grpc.RpcError as exc:
                assert exc.code() != grpc.StatusCode.OK
                assert secret not in (exc.details() or "")
                assert "no access token" in (exc.details() or "")

    def test_plugin_never_raises_even_when_the_source_does(self) -> None:
        class Broken:
            def request(self, callback: object) -> None:
                raise RuntimeError("secret=hunter2")

        seen: list[tuple[object, object]] = []
        AuthMetadataPlugin(Broken())(None, lambda md, err: seen.append((md, err)))
        assert len(seen) == 1 and seen[0][0] == ()
        assert "hunter2" not in str(seen[0][1])

    def test_unauthenticated_without_credentials(self, billing: Billing) -> None:
        with grpc.insecure_channel(billing.address) as ch:
            assert status_of(lambda: call(ch, CHARGE)) == grpc.StatusCode.UNAUTHENTICATED
