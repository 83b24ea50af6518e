"""Fixtures: one real authsvc for the client tests, plus a demo "billing" service guarded by
the client package's interceptors, on real ports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from authsvc_client import AuthServerInterceptor, TokenSource, current_claims
from authsvc_client.validation import LocalValidator, RemoteValidator, Validator
from tests.integration.conftest import World, make_world
from tests.support.server import TEST_ISSUER, RunningServer

ISSUER = TEST_ISSUER
CHARGE = "/demo.Billing/Charge"
GET = "/demo.Billing/Get"
LIST = "/demo.Billing/List"
SECRET_METHOD = "/demo.Billing/Internal"
BILLING_SCOPES = {CHARGE: ["billing.write"], GET: ["billing.read"], LIST: ["billing.read"]}


class FakeClock:
    """Epoch seconds that move only when told to (starts at the real time so tokens that
    authsvc signs with its own clock line up)."""

    def __init__(self) -> None:
        import time

        self.now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


# The audience a token source's revocation follower asks for (tokens.OWN_AUDIENCE).
FOLLOWER_AUDIENCE = "authsvc"


class Counter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts unary calls per method on a client channel; IssueToken calls a source makes for
    its own revocation follower (audience authsvc) are counted apart, under `follower`."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.follower = 0
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        with self._lock:
            if getattr(request, "audience", None) == FOLLOWER_AUDIENCE:
                self.follower += 1
            else:
                self.calls[details.method] = self.calls.get(details.method, 0) + 1
        return continuation(details, request)

    def count(self, method: str = "/authsvc.v1.AuthService/IssueToken") -> int:
        return self.calls.get(method, 0)


def _whoami(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    claims = current_claims()
    return b"anonymous" if claims is None else claims.subject.encode()


def _list(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(3):
        claims = current_claims()
        yield f"{i}:{None if claims is None else claims.subject}".encode()


def billing_handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "demo.Billing",
        {
            "Charge": grpc.unary_unary_rpc_method_handler(_whoami),
            "Get": grpc.unary_unary_rpc_method_handler(_whoami),
            "Internal": grpc.unary_unary_rpc_method_handler(_whoami),
            "List": grpc.unary_stream_rpc_method_handler(_list),
        },
    )


class Billing:
    """A real grpc.server on port 0 running the demo billing service behind the interceptor,
    on a plaintext port and on a local-credentials port (call credentials need the latter)."""

    def __init__(self, validator: Validator) -> None:
        from grpc_health.v1 import health, health_pb2_grpc

        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            interceptors=[AuthServerInterceptor(validator, BILLING_SCOPES)],
        )
        self.server.add_generic_rpc_handlers((billing_handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.local_port = self.server.add_secure_port(
            "127.0.0.1:0", grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        )
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.local_address = f"127.0.0.1:{self.local_port}"

    def stop(self) -> None:
        self.server.stop(None)


def call(channel: grpc.Channel, method: str = CHARGE, **kwargs: Any) -> bytes:
    result: bytes = channel.unary_unary(method)(b"", timeout=10, **kwargs)
    return result


def status_of(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Leeway 0 so that a 1-second token really expires within the test.
    w, server = make_world(tmp_path_factory.mktemp("authsvc-client"), AUTHSVC_LEEWAY_SECONDS="0")
    try:
        yield w
    finally:
        stop(server)


def stop(server: RunningServer) -> None:
    server.stop()
    if server.proc.stdout is not None:
        server.proc.stdout.close()  # the helper leaves the pipe open (ResourceWarning)


@pytest.fixture(scope="session")
def local_validator(world: World) -> Iterator[LocalValidator]:
    channel = grpc.insecure_channel(world.server.address)
    # What a deployed validator does: a TokenSource for authsvc's own audience, no scopes.
    follower = TokenSource(
        channel, service_id="billing", service_secret=world.billing_secret, audience="authsvc"
    )
    validator = LocalValidator(channel, "billing", ISSUER, leeway_seconds=0, token_source=follower)
    assert validator.wait_ready(10)
    yield validator
    validator.close()
    follower.close()
    channel.close()


@pytest.fixture(scope="session")
def remote_validator(world: World) -> Iterator[RemoteValidator]:
    channel = grpc.insecure_channel(world.server.address)
    yield RemoteValidator(channel, "billing", cache_ttl_seconds=1.0)
    channel.close()


@pytest.fixture(params=["local", "remote"])
def validator(
    request: pytest.FixtureRequest,
    local_validator: LocalValidator,
    remote_validator: RemoteValidator,
) -> Validator:
    return local_validator if request.param == "local" else remote_validator


@pytest.fixture
def billing(validator: Validator) -> Iterator[Billing]:
    service = Billing(validator)
    yield service
    service.stop()


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def authsvc_channel(world: World, counter: Counter) -> Iterator[grpc.Channel]:
    channel = grpc.intercept_channel(grpc.insecure_channel(world.server.address), counter)
    yield channel
    channel.close()
