"""Server interceptor (sync grpc.server) with both validators against a real authsvc."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc.server.app import AuthsvcServer, build_core, create_service
from authsvc_client import BearerTokenInterceptor, TokenSource
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import LocalValidator, RemoteValidator, Validator
from tests.client.conftest import (
    CHARGE,
    GET,
    ISSUER,
    LIST,
    SECRET_METHOD,
    Billing,
    call,
    status_of,
)
from tests.integration.conftest import World
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings


@dataclass
class FakeTimeAuthsvc:
    """A real authsvc (grpc.aio, in this process, on its own event loop thread) whose clock
    moves only when a test moves it; leeway 0."""

    address: str
    clock: FakeClock
    orders_secret: str = field(repr=False)

    def issue(self, channel: grpc.Channel, *, ttl: int) -> str:
        request = auth_pb2.IssueTokenRequest(
            service_id="orders",
            service_secret=self.orders_secret,
            audience="billing",
            scopes=["billing.write"],
            ttl_seconds=ttl,
        )
        reply = auth_pb2_grpc.AuthServiceStub(channel).IssueToken(request, timeout=30)
        token: str = reply.access_token
        return token


@pytest.fixture(scope="module")
def fake_time_authsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeTimeAuthsvc]:
    settings = in_process_settings(
        tmp_path_factory.mktemp("authsvc-fake-time"), AUTHSVC_LEEWAY_SECONDS="0"
    )
    clock = FakeClock()
    core = build_core(settings, clock)
    secret = create_service(core, "orders", ["billing"], ["billing.read", "billing.write"])
    core.dispose()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-time-authsvc", daemon=True)
    thread.start()
    server = AuthsvcServer(settings, clock)
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(io.StringIO()), loop).result(60)
        yield FakeTimeAuthsvc(f"127.0.0.1:{port}", clock, secret)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)
        loop.close()


def _token(world: World, scopes: list[str] | None = None, audience: str = "billing",
           ttl: int = 0) -> str:
    return world.server.issue("orders", world.orders_secret, audience, scopes, ttl).access_token


def _md(value: str) -> list[tuple[str, str]]:
    return [("authorization", value)]


class TestAuthServerInterceptor:
    def test_valid_token_reaches_handler_with_claims(self, world: World, billing: Billing) -> None:
        with grpc.insecure_channel(billing.address) as ch:
            token = _token(world)
            assert call(ch, CHARGE, metadata=_md(f"Bearer {token}")) == b"orders"
            assert call(ch, GET, metadata=_md(f"bEaReR {token}")) == b"orders"

    def test_streaming_handler_sees_claims_on_every_item(
        self, world: World, billing: Billing
    ) -> None:
        with grpc.insecure_channel(billing.address) as ch:
            items = list(ch.unary_stream(LIST)(b"", metadata=_md(f"Bearer {_token(world)}"),
                                               timeout=10))
        assert items == [b"0:orders", b"1:orders", b"2:orders"]

    def test_missing_malformed_or_repeated_authorization_is_unauthenticated(
        self, world: World, billing: Billing
    ) -> None:
        token = _token(world)
        cases: list[list[tuple[str, str]] | None] = [
            None,
            _md(token),
            _md(f"Basic {token}"),
            _md("Bearer"),
            _md(f"Bearer {token} extra"),
            _md("Bearer not a token"),
            [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")],
        ]
        with grpc.insecure_channel(billing.address) as ch:
            for index, metadata in enumerate(cases):

                def attempt(m: list[tuple[str, str]] | None = metadata) -> bytes:
                    return call(ch, CHARGE, metadata=m)

                assert status_of(attempt) == grpc.StatusCode.UNAUTHENTICATED, f"case {index}"
            code = status_of(lambda: list(ch.unary_stream(LIST)(b"", timeout=10)))
            assert code == grpc.StatusCode.UNAUTHENTICATED

    def test_garbage_and_foreign_tokens_are_unauthenticated(
        self, world: World, billing: Billing
    ) -> None:
        inventory_token = _token(world, audience="inventory")
        with grpc.insecure_channel(billing.address) as ch:
            for bad in ("abc.def.ghi", inventory_token, _token(world)[:-4] + "AAAA"):
                try:
                    call(ch, CHARGE, metadata=_md(f"Bearer {bad}"))
                    raise AssertionError("accepted a bad token")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert bad not in (exc.details() or "")

    def test_missing_scope_is_permission_denied(self, world: World, billing: Billing) -> None:
        read_only = _token(world, ["billing.read"])
        with grpc.insecure_channel(billing.address) as ch:
            assert call(ch, GET, metadata=_md(f"Bearer {read_only}")) == b"orders"
            try:
                call(ch, CHARGE, metadata=_md(f"Bearer {read_only}"))
                raise AssertionError("write allowed with a read-only token")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "scope" in (exc.details() or "")

    def test_unmapped_method_is_denied_even_with_a_good_token(
        self, world: World, billing: Billing
    ) -> None:
        with grpc.insecure_channel(billing.address) as ch:
            md = _md(f"Bearer {_token(world)}")
            code = status_of(lambda: call(ch, SECRET_METHOD, metadata=md))
        assert code == grpc.StatusCode.PERMISSION_DENIED

    def test_health_is_public(self, billing: Billing) -> None:
        with grpc.insecure_channel(billing.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    @pytest.mark.parametrize("kind", ["local", "remote"])
    def test_expired_token_is_rejected(self, fake_time_authsvc: FakeTimeAuthsvc, kind: str) -> None:
        """On one fake clock shared by authsvc and the validator, so the token is valid for its
        first call however long the machine takes, and expired for the second."""
        auth = fake_time_authsvc
        with grpc.insecure_channel(auth.address) as channel:
            validator: Validator
            if kind == "local":
                follower = TokenSource(
                    channel,
                    service_id="orders",
                    service_secret=auth.orders_secret,
                    audience="authsvc",
                    follow_revocations=False,
                )
                validator = LocalValidator(
                    channel,
                    "billing",
                    ISSUER,
                    leeway_seconds=0,
                    clock=auth.clock.now,
                    token_source=follower,
                )
                assert validator.wait_ready(30)
            else:
                validator = RemoteValidator(
                    channel, "billing", cache_ttl_seconds=1.0, clock=auth.clock.now
                )
            billing = Billing(validator)
            try:
                token = auth.issue(channel, ttl=1)
                with grpc.insecure_channel(billing.address) as ch:
                    assert call(ch, CHARGE, metadata=_md(f"Bearer {token}")) == b"orders"
                    auth.clock.advance(2)
                    try:
                        call(ch, CHARGE, metadata=_md(f"Bearer {token}"))
                        raise AssertionError("expired token accepted")
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                        assert "EXPIRED" in (exc.details() or "")
            finally:
                billing.stop()
                if isinstance(validator, LocalValidator):
                    validator.close()

    def test_revoked_token_is_rejected(self, world: World, billing: Billing) -> None:
        token = _token(world)
        with grpc.insecure_channel(billing.address) as ch:
            assert call(ch, CHARGE, metadata=_md(f"Bearer {token}")) == b"orders"
            world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=5)
            deadline = time.monotonic() + 30  # local: the feed; remote: the 1 s cache TTL
            code = grpc.StatusCode.OK
            while time.monotonic() < deadline:
                code = status_of(lambda: call(ch, CHARGE, metadata=_md(f"Bearer {token}")))
                if code != grpc.StatusCode.OK:
                    break
                time.sleep(0.02)
        assert code == grpc.StatusCode.UNAUTHENTICATED


class TestBearerTokenInterceptor:
    def test_plaintext_channel_with_interceptor(self, world: World, billing: Billing) -> None:
        with grpc.insecure_channel(world.server.address) as authsvc:
            source = TokenSource(
                authsvc, service_id="orders", service_secret=world.orders_secret,
                audience="billing",
            )
            channel = grpc.intercept_channel(
                grpc.insecure_channel(billing.address), BearerTokenInterceptor(source)
            )
            assert call(channel, CHARGE) == b"orders"
            assert next(iter(channel.unary_stream(LIST)(b"", timeout=10))) == b"0:orders"
            channel.close()

    def test_no_token_surfaces_as_unavailable_without_the_secret(
        self, world: World, billing: Billing
    ) -> None:
        secret = "asvcs_definitely-wrong-secret-value-000000000000"
        with grpc.insecure_channel(world.server.address) as authsvc:
            source = TokenSource(authsvc, service_id="orders", service_secret=secret,
                                 audience="billing")
            channel = grpc.intercept_channel(
                grpc.insecure_channel(billing.address), BearerTokenInterceptor(source)
            )
            try:
                call(channel, CHARGE)
                raise AssertionError("call went through without a token")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert secret not in (exc.details() or "")
            channel.close()
