"""The client package's delegation helper and per-method chain rules, end to end.

A real `authsvc serve` (SQLite) issues and exchanges the tokens. `orders` (grpc.server, and a
grpc.aio.server twin) is behind the package's server interceptor; its handler calls `billing`
on the caller's behalf with a Delegator (AsyncDelegator). `billing` (grpc.server, local or
remote validation) answers who asked and through whom, and some of its methods limit the chain
with MethodRule.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from authsvc_client.aio import AsyncAuthServerInterceptor, AsyncRemoteValidator
from authsvc_client.claims import Claims
from authsvc_client.delegation import AsyncDelegator, Delegator
from authsvc_client.errors import AuthsvcClientError, CredentialsError, TokenRefused
from authsvc_client.interceptors import (
    AuthServerInterceptor,
    MethodRule,
    current_claims,
    incoming_token,
)
from authsvc_client.logins import SecretLogin, WorkloadTokenLogin
from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import LocalValidator, RemoteValidator
from tests.support.postgres import postgres_url  # noqa: F401  (a fixture)
from tests.support.server import (
    TEST_ISSUER,
    RunningServer,
    base_env,
    create_service,
    run_cli,
    start_server,
)

CHARGE = "/demo.Billing/Charge"  # billing.read; on someone's behalf only through orders
DIRECT = "/demo.Billing/Direct"  # direct callers only
SHALLOW = "/demo.Billing/Shallow"  # at most one actor
PLACE = "/demo.Orders/Place"
BILLING_RULES = {
    CHARGE: MethodRule(["billing.read"], allowed_actors={"orders"}),
    DIRECT: MethodRule(max_delegation_depth=0),
    SHALLOW: MethodRule(max_delegation_depth=1),
}
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Fleet:
    server: RunningServer
    secrets: dict[str, str] = field(repr=False)

    def token(self, service: str, audience: str, scopes: list[str] | None = None) -> str:
        return str(
            self.server.issue(service, self.secrets[service], audience, scopes).access_token
        )

    def login(self, service: str) -> SecretLogin:
        return SecretLogin(service, self.secrets[service])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder: Path = tmp_path_factory.mktemp("delegation-helper")
    env = base_env(f"sqlite:///{folder / 'authsvc.db'}")
    run_cli(env, "db", "upgrade")
    secrets = {
        "front": create_service(env, "front", "orders=", "mallory=", "billing=billing.read"),
        "orders": create_service(env, "orders", "billing=billing.read", "billing=billing.write"),
        "mallory": create_service(env, "mallory", "billing=billing.read"),
    }
    server = start_server(env)
    try:
        yield Fleet(server, secrets)
    finally:
        server.stop()


def _who(_request: bytes, _context: Any) -> bytes:
    claims = current_claims()
    assert claims is not None
    return json.dumps(
        {"sub": claims.subject, "actors": list(claims.actors), "jti": claims.jti}
    ).encode()


def _serve(
    service: str, handlers: dict[str, Callable[..., Any]], interceptor: Any
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service,
                {n: grpc.unary_unary_rpc_method_handler(h) for n, h in handlers.items()},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _call(address: str, method: str, token: str, payload: bytes = b"") -> dict[str, Any]:
    with grpc.insecure_channel(address) as channel:
        reply = channel.unary_unary(method)(
            payload, metadata=(("authorization", f"Bearer {token}"),), timeout=15
        )
    return json.loads(reply)  # type: ignore[no-any-return]


def _refused(call: Callable[[], Any], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


@pytest.fixture(scope="module", params=["local", "remote"])
def billing(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[str]:
    channel = grpc.insecure_channel(fleet.server.address)
    validator: Any
    if request.param == "local":
        validator = LocalValidator(
            channel, "billing", TEST_ISSUER, token_source=lambda: fleet.token("mallory", "authsvc")
        )
        assert validator.wait_ready(15)
    else:
        validator = RemoteValidator(channel, "billing")
    handlers = {"Charge": _who, "Direct": _who, "Shallow": _who}
    interceptor = AuthServerInterceptor(validator, BILLING_RULES)
    server, address = _serve("demo.Billing", handlers, interceptor)
    try:
        yield address
    finally:
        server.stop(None).wait(10)
        validator.close()
        channel.close()


class Orders:
    """The middle service: its Place handler calls billing's method (the request names it) on
    its caller's behalf, through one Delegator logging in as `actor`."""

    def __init__(
        self, fleet: Fleet, billing: str, actor: str, login: Any = None, **options: Any
    ) -> None:
        self._authsvc = grpc.insecure_channel(fleet.server.address)
        self.delegator = Delegator(self._authsvc, login=login or fleet.login(actor), **options)
        self.billing_address = billing
        self._billing = grpc.insecure_channel(billing)
        validator = RemoteValidator(self._authsvc, actor)
        self._validator = validator
        self.server, self.address = _serve(
            "demo.Orders", {"Place": self._place}, AuthServerInterceptor(validator, {PLACE: []})
        )

    def _place(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        asked = json.loads(request or b"{}")
        try:
            metadata = self.delegator.metadata("billing", asked.get("scopes", ["billing.read"]))
        except AuthsvcClientError as exc:
            # The error names the reason, never a token.
            context.abort(PERMISSION_DENIED, f"delegation refused: {exc}")
        try:
            reply: bytes = self._billing.unary_unary(asked.get("method", CHARGE))(
                b"", metadata=metadata, timeout=15
            )
        except grpc.RpcError as exc:  # billing's refusal, passed on as it is
            context.abort(exc.code(), exc.details())
        return reply

    def close(self) -> None:
        self.server.stop(None).wait(10)
        self.delegator.close()
        self._validator.close()
        self._billing.close()
        self._authsvc.close()


@pytest.fixture
def orders(fleet: Fleet, billing: str) -> Iterator[Orders]:
    service = Orders(fleet, billing, "orders")
    try:
        yield service
    finally:
        service.close()


def _place(orders: Orders, token: str, **asked: Any) -> dict[str, Any]:
    return _call(orders.address, PLACE, token, json.dumps(asked).encode())


class TestDelegator:
    def test_billing_sees_who_asked_and_through_whom(self, fleet: Fleet, orders: Orders) -> None:
        seen = _place(orders, fleet.token("front", "orders"))
        assert (seen["sub"], seen["actors"]) == ("front", ["orders"])

    def test_the_exchanged_token_is_cached_per_incoming_token(
        self, fleet: Fleet, orders: Orders
    ) -> None:
        first, second = fleet.token("front", "orders"), fleet.token("front", "orders")
        jtis = [_place(orders, token)["jti"] for token in (first, first, second, first)]
        # One exchange per incoming token, however often it calls: the same derived token.
        assert jtis[0] == jtis[1] == jtis[3] != jtis[2]
        assert orders.delegator.cached_entries == 2

    def test_many_handler_threads_share_one_exchange(self, fleet: Fleet, orders: Orders) -> None:
        token = fleet.token("front", "orders")
        with futures.ThreadPoolExecutor(8) as pool:
            jtis = set(pool.map(lambda _: _place(orders, token)["jti"], range(16)))
        assert len(jtis) == 1

    def test_the_cache_is_bounded(self, fleet: Fleet, billing: str) -> None:
        service = Orders(fleet, billing, "orders", max_entries=2)
        try:
            for _ in range(3):
                _place(service, fleet.token("front", "orders"))
            assert service.delegator.cached_entries == 2
        finally:
            service.close()

    def test_scopes_beyond_the_callers_grant_are_refused_with_the_reason(
        self, fleet: Fleet, orders: Orders
    ) -> None:
        # orders may write to billing, front may not: the chain gets no more than both.
        token = fleet.token("front", "orders")
        details = _refused(
            lambda: _place(orders, token, scopes=["billing.write"]), PERMISSION_DENIED
        )
        assert details == (
            "delegation refused: authsvc refused a token for service 'orders', audience "
            "'billing': PERMISSION_DENIED (the caller or this service lacks scope billing.write)"
        )

    def test_an_actor_whose_own_login_fails_is_refused(self, fleet: Fleet, billing: str) -> None:
        service = Orders(fleet, billing, "orders", login=SecretLogin("orders", "not-the-secret"))
        try:
            details = _refused(
                lambda: _place(service, fleet.token("front", "orders")), PERMISSION_DENIED
            )
            assert details.startswith(
                "delegation refused: authsvc refused a token for service 'orders', audience "
                "'billing': UNAUTHENTICATED (the incoming token is no longer valid"
            )
            assert "not-the-secret" not in details
        finally:
            service.close()

    def test_outside_a_handler_there_is_nothing_to_delegate(self, fleet: Fleet) -> None:
        with grpc.insecure_channel(fleet.server.address) as channel:
            delegator = Delegator(channel, login=fleet.login("orders"))
            assert incoming_token() is None
            with pytest.raises(CredentialsError, match="no incoming token"):
                delegator.token("billing")
            # An explicit subject token works anywhere (a batch job acting for a caller).
            token = delegator.token("billing", subject_token=fleet.token("front", "orders"))
            assert token.count(".") == 2
            delegator.close()

    def test_a_workload_token_login_cannot_act(self, fleet: Fleet, tmp_path: Path) -> None:
        path = tmp_path / "token"
        path.write_text("x")
        with grpc.insecure_channel(fleet.server.address) as channel:
            with pytest.raises(CredentialsError, match="cannot act"):
                Delegator(channel, login=WorkloadTokenLogin(str(path)))

    def test_from_env_logs_in_as_the_environment_says(self, fleet: Fleet, tmp_path: Path) -> None:
        environ = {
            "AUTHSVC_TARGET": fleet.server.address,
            "AUTHSVC_SERVICE_ID": "orders",
            "AUTHSVC_SERVICE_SECRET": fleet.secrets["orders"],
        }
        with Delegator.from_env(environ=environ) as delegator:
            token = delegator.token("billing", subject_token=fleet.token("front", "orders"))
        checked = fleet.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
        )
        assert (checked.claims.subject, list(checked.claims.actors)) == ("front", ["orders"])
        path = tmp_path / "k8s-token"
        path.write_text(jwt.encode({"sub": "system:serviceaccount:prod:orders"}, "k" * 32))
        workload = {
            "AUTHSVC_TARGET": fleet.server.address,
            "AUTHSVC_WORKLOAD_TOKEN_FILE": str(path),
        }
        with pytest.raises(CredentialsError, match="cannot act"):
            Delegator.from_env(environ=workload)

    def test_repr_holds_no_secret(self, fleet: Fleet, orders: Orders) -> None:
        _place(orders, fleet.token("front", "orders"))
        assert fleet.secrets["orders"] not in repr(orders.delegator)


class TestMethodRules:
    def test_an_actor_not_allowed_for_the_method_is_permission_denied(
        self, fleet: Fleet, billing: str
    ) -> None:
        mallory = Orders(fleet, billing, "mallory")
        try:
            details = _refused(
                lambda: _place(mallory, fleet.token("front", "mallory")), PERMISSION_DENIED
            )
            assert "'mallory' may not call this method on another service's behalf" in details
            # Its own, undelegated token is unaffected by allowed_actors.
            own = _call(billing, CHARGE, fleet.token("mallory", "billing", ["billing.read"]))
            assert (own["sub"], own["actors"]) == ("mallory", [])
        finally:
            mallory.close()

    def test_a_direct_only_method_refuses_a_chain(self, fleet: Fleet, orders: Orders) -> None:
        details = _refused(
            lambda: _place(orders, fleet.token("front", "orders"), method=DIRECT),
            PERMISSION_DENIED,
        )
        assert "direct callers only" in details
        direct = _call(orders.billing_address, DIRECT, fleet.token("front", "billing"))
        assert direct["actors"] == []

    def test_a_chain_within_the_depth_passes(self, fleet: Fleet, orders: Orders) -> None:
        seen = _place(orders, fleet.token("front", "orders"), method=SHALLOW)
        assert seen["actors"] == ["orders"]


def _claims(actors: tuple[str, ...]) -> Claims:
    return Claims(
        issuer=TEST_ISSUER, subject="front", audience="billing", scopes=(), issued_at=0,
        not_before=0, expires_at=0, jti="j", key_id="k",
        client_id=actors[0] if actors else "front", actors=actors,
    )  # fmt: skip


class TestMethodRuleUnit:
    @pytest.mark.parametrize(
        ("limit", "actors", "refused"),
        [
            (0, (), False),
            (0, ("orders",), True),
            (1, ("orders",), False),
            (1, ("billing", "orders"), True),
            (2, ("billing", "orders"), False),
            (None, ("a", "b", "c", "d"), False),
        ],
    )
    def test_depth(self, limit: int | None, actors: tuple[str, ...], refused: bool) -> None:
        denial = MethodRule(max_delegation_depth=limit).refusal(_claims(actors))
        assert (denial is not None) is refused
        if denial is not None:
            assert denial.code == PERMISSION_DENIED

    def test_allowed_actors_judge_the_nearest_actor(self) -> None:
        rule = MethodRule(allowed_actors={"orders"})
        assert rule.refusal(_claims(("orders", "gateway"))) is None
        assert rule.refusal(_claims(("gateway", "orders"))) is not None
        assert rule.refusal(_claims(())) is None

    @pytest.mark.parametrize(
        "bad",
        [
            {"max_delegation_depth": -1},
            {"max_delegation_depth": True},
            {"allowed_actors": "orders"},
            {"allowed_actors": [""]},
            {"scopes": "billing.read"},
        ],
    )
    def test_bad_rules_are_refused_when_built(self, bad: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            MethodRule(**bad)


# --- grpc.aio --------------------------------------------------------------------------------


class AioOrders:
    """Orders on grpc.aio: a coroutine handler delegating with an AsyncDelegator."""

    def __init__(self, fleet: Fleet, billing: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(fleet, billing), self._loop)
        self.address = started.result(15)

    async def _start(self, fleet: Fleet, billing: str) -> str:
        self._authsvc = grpc.aio.insecure_channel(fleet.server.address)
        self._billing = grpc.aio.insecure_channel(billing)
        self.delegator = AsyncDelegator(self._authsvc, login=fleet.login("orders"))
        self._validator = AsyncRemoteValidator(self._authsvc, "orders")

        async def place(_request: bytes, _context: Any) -> bytes:
            metadata = await self.delegator.metadata("billing", ["billing.read"])
            reply: bytes = await self._billing.unary_unary(CHARGE)(
                b"", metadata=metadata, timeout=15
            )
            return reply

        self.server = grpc.aio.server(
            interceptors=[AsyncAuthServerInterceptor(self._validator, {PLACE: []})]
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "demo.Orders", {"Place": grpc.unary_unary_rpc_method_handler(place)}
                ),
            )
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.delegator.close()
        self._validator.close()
        await self._billing.close()
        await self._authsvc.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class TestAsyncDelegator:
    def test_an_aio_handler_delegates_and_caches(self, fleet: Fleet, billing: str) -> None:
        service = AioOrders(fleet, billing)
        try:
            token = fleet.token("front", "orders")
            seen = [_call(service.address, PLACE, token) for _ in range(3)]
            assert {(s["sub"], tuple(s["actors"])) for s in seen} == {("front", ("orders",))}
            assert len({s["jti"] for s in seen}) == 1
            assert service.delegator.cached_entries == 1
        finally:
            service.close()

    def test_outside_a_handler_there_is_nothing_to_delegate(self, fleet: Fleet) -> None:
        async def attempt() -> None:
            async with grpc.aio.insecure_channel(fleet.server.address) as channel:
                delegator = AsyncDelegator(channel, login=fleet.login("orders"))
                with pytest.raises(CredentialsError, match="no incoming token"):
                    await delegator.token("billing")

        asyncio.run(attempt())


def test_refused_is_a_token_refused(fleet: Fleet) -> None:
    # mallory may not call billing for front: front never granted mallory -> billing.write.
    with grpc.insecure_channel(fleet.server.address) as channel:
        delegator = Delegator(channel, login=fleet.login("mallory"))
        with pytest.raises(TokenRefused) as caught:
            delegator.token(
                "billing", ["billing.write"], subject_token=fleet.token("front", "mallory")
            )
        assert "eyJ" not in str(caught.value)
        delegator.close()


class TestTheDelegatorFollowsRevocations:
    """An exchanged token revoked while the incoming one stays good (its jti; every token of
    the acting service, as after a leak) is never handed out again: the Delegator's feed
    drops it and the next call exchanges anew, without waiting for the refresh point."""

    def _valid(self, fleet: Fleet, token: str) -> bool:
        reply = fleet.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
        )
        return bool(reply.valid)

    def _next(self, get: Callable[[], str], revoked: str) -> str:
        deadline = time.monotonic() + 10
        token = get()
        while token == revoked and time.monotonic() < deadline:
            time.sleep(0.05)
            token = get()
        assert token != revoked, "the Delegator kept handing out its revoked token"
        return token

    def test_by_jti_sync(self, fleet: Fleet) -> None:
        subject = fleet.token("front", "orders")
        with grpc.insecure_channel(fleet.server.address) as channel:
            delegator = Delegator(channel, login=fleet.login("orders"))
            try:

                def get() -> str:
                    return delegator.token("billing", ["billing.read"], subject_token=subject)

                first = get()
                fleet.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=first), timeout=10)
                assert not self._valid(fleet, first)
                assert self._valid(fleet, self._next(get, first))
            finally:
                delegator.close()

    def test_by_jti_aio(self, fleet: Fleet) -> None:
        subject = fleet.token("front", "orders")

        async def scenario() -> tuple[str, str]:
            async with grpc.aio.insecure_channel(fleet.server.address) as channel:
                delegator = AsyncDelegator(channel, login=fleet.login("orders"))
                try:

                    async def get() -> str:
                        return await delegator.token(
                            "billing", ["billing.read"], subject_token=subject
                        )

                    first = await get()
                    await asyncio.to_thread(
                        fleet.server.stub.RevokeToken,
                        auth_pb2.RevokeTokenRequest(token=first),
                        timeout=10,
                    )
                    deadline = time.monotonic() + 10
                    token = await get()
                    while token == first and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                        token = await get()
                    return first, token
                finally:
                    await delegator.close()

        first, second = asyncio.run(scenario())
        assert second != first, "the AsyncDelegator kept handing out its revoked token"
        assert self._valid(fleet, second)

    def test_every_token_of_the_acting_service(self, fleet: Fleet) -> None:
        admin = create_service(fleet.server.env, "ops-admin", admin=True)
        admin_token = fleet.server.issue("ops-admin", admin, "authsvc").access_token
        subject = fleet.token("front", "orders")
        with grpc.insecure_channel(fleet.server.address) as channel:
            delegator = Delegator(channel, login=fleet.login("orders"))
            try:

                def get() -> str:
                    return delegator.token("billing", ["billing.read"], subject_token=subject)

                first = get()
                fleet.server.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(service_id="orders"),
                    metadata=(("authorization", f"Bearer {admin_token}"),),
                    timeout=10,
                )
                assert not self._valid(fleet, first)
                # The incoming token is front's, untouched: the delegated call works again.
                assert self._valid(fleet, self._next(get, first))
            finally:
                delegator.close()

    def test_a_source_made_after_the_event_knows_its_cutoff(self, fleet: Fleet) -> None:
        """RevokeToken(service_id) returns once its cutoff second has begun, but its event
        reaches the feed before: an incoming call with a new token in between makes a new
        source, whose first exchange gets a token issued before the cutoff (revoked)."""
        admin = create_service(fleet.server.env, "ops-admin-2", admin=True)
        admin_token = fleet.server.issue("ops-admin-2", admin, "authsvc").access_token
        first, later = fleet.token("front", "orders"), fleet.token("front", "orders")
        with grpc.insecure_channel(fleet.server.address) as channel:
            delegator = Delegator(channel, login=fleet.login("orders"))
            try:
                delegator.token("billing", ["billing.read"], subject_token=first)
                deadline = time.monotonic() + 20
                live, seen = threading.Event(), threading.Event()
                started = float("inf")

                def heard(event: auth_pb2.RevocationEvent) -> None:
                    if event.jti == "warm-up":
                        live.set()
                    # This test's revocation, not an earlier test's replayed to a new stream.
                    if event.service_id == "orders" and event.revoked_before.seconds > started:
                        seen.set()

                delegator._feed._revocation_listeners += (heard,)
                md = (("authorization", f"Bearer {admin_token}"),)
                # Until the feed's stream is live: it hears a revocation made now.
                while not live.is_set():
                    fleet.server.stub.RevokeToken(
                        auth_pb2.RevokeTokenRequest(jti="warm-up"), metadata=md, timeout=10
                    )
                    assert live.wait(1) or time.monotonic() < deadline, "the feed never started"
                while time.time() % 1 > 0.05:  # early in a second: the cutoff is ~1 s away
                    time.sleep(0.005)
                started = time.time()
                revoke = threading.Thread(
                    target=fleet.server.stub.RevokeToken,
                    args=(auth_pb2.RevokeTokenRequest(service_id="orders"),),
                    kwargs={"metadata": md, "timeout": 10},
                )
                revoke.start()
                assert seen.wait(10), "the feed never saw the revocation"
                handed = delegator.token("billing", ["billing.read"], subject_token=later)
                revoke.join()
                valid = self._valid(fleet, handed)
                assert valid, "a new source handed out a revoked token"
            finally:
                delegator.close()


# --- PostgreSQL: two replicas ----------------------------------------------------------------


def test_on_postgresql_a_chain_through_two_replicas_and_its_revocation(
    postgres_url: str,  # noqa: F811
) -> None:
    """orders exchanges on replica A; billing validates locally against replica B; front's
    token revoked on B revokes the derived token on billing's local validator too."""
    env = base_env(postgres_url)
    run_cli(env, "db", "upgrade")
    secrets = {
        "front": create_service(env, "front", "orders=", "billing=billing.read"),
        "orders": create_service(env, "orders", "billing=billing.read"),
    }
    a = start_server(env)
    try:
        b = start_server(env)
        try:
            fleet_a, fleet_b = Fleet(a, secrets), Fleet(b, secrets)
            channel = grpc.insecure_channel(b.address)
            def follower() -> str:
                return fleet_b.token("orders", "authsvc")

            validator = LocalValidator(channel, "billing", TEST_ISSUER, token_source=follower)
            assert validator.wait_ready(15)
            interceptor = AuthServerInterceptor(validator, BILLING_RULES)
            billing_server, billing = _serve("demo.Billing", {"Charge": _who}, interceptor)
            orders = Orders(fleet_a, billing, "orders")
            try:
                front = fleet_b.token("front", "orders")
                seen = _place(orders, front)
                assert (seen["sub"], seen["actors"]) == ("front", ["orders"])
                b.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=front), timeout=10)
                # The derived token, still cached by orders' Delegator, is refused by billing
                # once the revocation reaches its validator (a sync interval, then the feed).
                derived = orders.delegator.token("billing", ["billing.read"], subject_token=front)
                deadline = time.monotonic() + 10
                while validator.validate(derived).valid and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert validator.validate(derived).reason == auth_pb2.REVOKED
            finally:
                orders.close()
                billing_server.stop(None).wait(10)
                validator.close()
                channel.close()
        finally:
            b.stop()
    finally:
        a.stop()
