"""Promise: a service behind AuthServerInterceptor / AsyncAuthServerInterceptor admits only one
well-formed `authorization: Bearer` token for its own audience, denies unmapped methods, and
takes the caller's identity from nothing but that token."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from authsvc_client import AuthServerInterceptor, LocalValidator, RemoteValidator, current_claims
from authsvc_client.aio import AsyncAuthServerInterceptor
from tests.security.forge import (
    AUDIENCE,
    Target,
    attacker_key,
    claims,
    header,
    rpc_code,
    sign,
)
from tests.support.server import TEST_ISSUER

pytestmark = pytest.mark.usefixtures("after_each_batch")

CHARGE = "/demo.Billing/Charge"  # needs billing.write
GET = "/demo.Billing/Get"  # needs billing.read
ANY = "/demo.Billing/Any"  # any authenticated caller for this audience
PUBLIC = "/demo.Billing/Public"  # explicitly public
INTERNAL = "/demo.Billing/Internal"  # served, but in no policy: must be denied
LOOKALIKE = "/grpc.health.v1.HealthX/Check"  # not the public health service
SCOPES = {CHARGE: ["billing.write"], GET: ["billing.read"], ANY: []}
METHODS = ("Charge", "Get", "Any", "Public", "Internal")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def _whoami(_request: bytes, _context: Any) -> bytes:
    caller = current_claims()
    return b"anonymous" if caller is None else caller.subject.encode()


async def _whoami_async(_request: bytes, _context: Any) -> bytes:
    return _whoami(_request, _context)


def _handlers(behavior: Callable[..., Any]) -> tuple[grpc.GenericRpcHandler, ...]:
    return (
        grpc.method_handlers_generic_handler(
            "demo.Billing", {m: grpc.unary_unary_rpc_method_handler(behavior) for m in METHODS}
        ),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.HealthX", {"Check": grpc.unary_unary_rpc_method_handler(behavior)}
        ),
    )


class SyncGuarded:
    """grpc.server with one worker, so a leaked contextvar would show on the next call."""

    def __init__(self, validator: Any) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=1),
            interceptors=[AuthServerInterceptor(validator, SCOPES, public_methods=[PUBLIC])],
        )
        self.server.add_generic_rpc_handlers(_handlers(_whoami))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None).wait(10)


class AioGuarded:
    """grpc.aio.server on its own event loop thread."""

    def __init__(self, validator: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None
        self.address = asyncio.run_coroutine_threadsafe(self._start(validator), self.loop).result(
            10
        )

    async def _start(self, validator: Any) -> str:
        self.server = grpc.aio.server(
            interceptors=[AsyncAuthServerInterceptor(validator, SCOPES, public_methods=[PUBLIC])]
        )
        self.server.add_generic_rpc_handlers(_handlers(_whoami_async))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def authsvc_channel(target: Target) -> Iterator[grpc.Channel]:
    channel = grpc.insecure_channel(target.address)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def local_validator(target: Target, authsvc_channel: grpc.Channel) -> Iterator[LocalValidator]:
    validator = LocalValidator(
        authsvc_channel, AUDIENCE, TEST_ISSUER, token_source=target.world.follower_token
    )
    assert validator.wait_ready(10)
    yield validator
    validator.close()


@pytest.fixture(scope="module", params=["sync-remote", "sync-local", "aio-local"])
def guarded(
    request: pytest.FixtureRequest, authsvc_channel: grpc.Channel, local_validator: LocalValidator
) -> Iterator[grpc.Channel]:
    """A client channel to the demo billing service, guarded each way a service can be."""
    server: SyncGuarded | AioGuarded
    if request.param == "sync-remote":
        server = SyncGuarded(RemoteValidator(authsvc_channel, AUDIENCE))
    elif request.param == "sync-local":
        server = SyncGuarded(local_validator)
    else:
        server = AioGuarded(local_validator)
    channel = grpc.insecure_channel(server.address)
    yield channel
    channel.close()
    server.stop()


def outcome(
    channel: grpc.Channel, method: str, metadata: list[tuple[str, str | bytes]] | None
) -> tuple[grpc.StatusCode, str]:
    """(status, reply or details) of one call."""
    try:
        reply = channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return rpc_code(exc), exc.details() or ""
    return grpc.StatusCode.OK, bytes(reply).decode()


def bearer(token: str) -> list[tuple[str, str | bytes]]:
    return [("authorization", f"Bearer {token}")]


class TestAuthorizationMetadata:
    def test_control_a_genuine_token_reaches_the_handler(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        assert outcome(guarded, CHARGE, bearer(target.genuine())) == (grpc.StatusCode.OK, "orders")

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "Bearer",
            "Bearer ",
            "Bearer  ",
            "{t}",
            "Basic {t}",
            "Token {t}",
            "Bearer: {t}",
            "Bearer={t}",
            "Bearer {t} {t}",
            "Bearer {t},Bearer {t}",
            "Bearer {t} extra",
            "Bearer {h}",
            "Bearer {t}.",
            'Bearer "{t}"',
            "Bearer {t};",
            "Bearer <{t}>",
            "Bearer%20{t}",
        ],
    )
    def test_malformed_authorization_is_unauthenticated(
        self, target: Target, guarded: grpc.Channel, value: str
    ) -> None:
        token = target.genuine()
        md: list[tuple[str, str | bytes]] = [
            ("authorization", value.format(t=token, h=token.split(".")[0]))
        ]
        code, details = outcome(guarded, ANY, md)
        assert code == UNAUTHENTICATED
        assert token.split(".")[2] not in details

    def test_missing_authorization_is_unauthenticated(self, guarded: grpc.Channel) -> None:
        assert outcome(guarded, ANY, None)[0] == UNAUTHENTICATED

    @pytest.mark.parametrize("order", ["good-good", "good-bad", "bad-good", "good-empty"])
    def test_duplicated_authorization_is_unauthenticated(
        self, target: Target, guarded: grpc.Channel, order: str
    ) -> None:
        tokens = {"good": f"Bearer {target.genuine()}", "bad": "Bearer a.b.c", "empty": ""}
        first, second = order.split("-")
        md: list[tuple[str, str | bytes]] = [
            ("authorization", tokens[first]),
            ("authorization", tokens[second]),
        ]
        assert outcome(guarded, ANY, md)[0] == UNAUTHENTICATED

    def test_oversized_authorization_is_refused_without_harm(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        code, _ = outcome(guarded, ANY, bearer("a" * 3000 + "." + "b" * 3000 + ".c"))
        assert code == UNAUTHENTICATED
        assert outcome(guarded, ANY, bearer(target.genuine()))[0] == grpc.StatusCode.OK


class TestTokensNotForThisService:
    def test_token_for_another_audience_is_unauthenticated(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        w = target.world
        inventory = w.server.issue("orders", w.orders_secret, "inventory").access_token
        assert outcome(guarded, ANY, bearer(inventory))[0] == UNAUTHENTICATED

    def test_admin_token_for_authsvc_is_unauthenticated_here(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        assert outcome(guarded, ANY, bearer(target.world.admin_token()))[0] == UNAUTHENTICATED

    def test_token_for_the_audience_forged_by_an_attacker_is_unauthenticated(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        forged = sign(attacker_key(), header(target.active_key().kid), claims())
        assert outcome(guarded, ANY, bearer(forged))[0] == UNAUTHENTICATED

    def test_token_from_another_issuer_is_unauthenticated(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        token = target.forge(iss="https://other-authsvc.invalid")
        assert outcome(guarded, ANY, bearer(token))[0] == UNAUTHENTICATED

    def test_read_token_cannot_write(self, target: Target, guarded: grpc.Channel) -> None:
        read_only = bearer(target.genuine(scopes=["billing.read"]))
        assert outcome(guarded, GET, read_only) == (grpc.StatusCode.OK, "orders")
        assert outcome(guarded, CHARGE, read_only)[0] == PERMISSION_DENIED


class TestDenyByDefault:
    @pytest.mark.parametrize("method", [INTERNAL, LOOKALIKE])
    def test_served_but_unmapped_method_is_denied_with_a_good_token(
        self, target: Target, guarded: grpc.Channel, method: str
    ) -> None:
        assert outcome(guarded, method, bearer(target.genuine()))[0] == PERMISSION_DENIED
        assert outcome(guarded, method, None)[0] in (PERMISSION_DENIED, UNAUTHENTICATED)

    @pytest.mark.parametrize(
        "method", ["/demo.Billing/charge", "/demo.billing/Charge", "/demo.Billing/Charge/", "//"]
    )
    def test_method_name_tricks_reach_no_handler(
        self, target: Target, guarded: grpc.Channel, method: str
    ) -> None:
        code, reply = outcome(guarded, method, bearer(target.genuine()))
        assert code != grpc.StatusCode.OK, reply

    def test_public_method_runs_with_no_caller_even_after_authenticated_calls(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        # One worker thread: a caller left in the contextvar would show here.
        for _ in range(3):
            assert outcome(guarded, ANY, bearer(target.genuine())) == (grpc.StatusCode.OK, "orders")
            assert outcome(guarded, PUBLIC, None) == (grpc.StatusCode.OK, "anonymous")
            assert outcome(guarded, PUBLIC, bearer("a.b.c")) == (grpc.StatusCode.OK, "anonymous")


IDENTITY_HEADERS = [
    "x-authsvc-subject",
    "x-authsvc-service-id",
    "x-service-id",
    "x-client-id",
    "x-forwarded-user",
    "x-remote-user",
    "x-user",
    "x-spiffe-id",
    "x-forwarded-client-cert",
    "x-authorization",
    "proxy-authorization",
    "x-access-token",
    "token",
    "bearer",
    "grpc-authorization",
]


class TestNoIdentityFromOtherHeaders:
    def test_identity_headers_beside_a_token_are_ignored(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        md = bearer(target.genuine()) + [(name, "ops-admin") for name in IDENTITY_HEADERS]
        assert outcome(guarded, CHARGE, md) == (grpc.StatusCode.OK, "orders")

    @pytest.mark.parametrize("name", IDENTITY_HEADERS)
    def test_a_genuine_token_in_another_header_authenticates_no_one(
        self, target: Target, guarded: grpc.Channel, name: str
    ) -> None:
        token = target.genuine()
        for value in (token, f"Bearer {token}"):
            assert outcome(guarded, ANY, [(name, value)])[0] == UNAUTHENTICATED

    def test_binary_authorization_header_authenticates_no_one(
        self, target: Target, guarded: grpc.Channel
    ) -> None:
        md: list[tuple[str, str | bytes]] = [
            ("authorization-bin", f"Bearer {target.genuine()}".encode())
        ]
        assert outcome(guarded, ANY, md)[0] == UNAUTHENTICATED
