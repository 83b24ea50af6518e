"""Validators against a real authsvc: revocation propagation, key rotation, authsvc outages."""

from __future__ import annotations

import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authsvc_client import (
    LocalValidator,
    RemoteValidator,
    TokenSource,
    ValidatorUnavailable,
    call_credentials,
)
from authsvc_client.v1 import auth_pb2
from tests.client.conftest import ISSUER, Billing, FakeClock, call, status_of, stop
from tests.integration.conftest import World, sqlite_env
from tests.support.server import RunningServer, run_cli, start_server

# The documented bound for a revocation to reach a connected local validator (see the report
# in test_revocation_reaches_local_validator_within_bound for the measured figure).
REVOCATION_BOUND_SECONDS = 2.0

FAST_RECONNECT = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def _token(world: World, **kw: object) -> str:
    return world.server.issue("orders", world.orders_secret, "billing", **kw).access_token  # type: ignore[arg-type]


def _revoke(server: RunningServer, token: str) -> None:
    server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=5)


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


class TestLocalValidator:
    def test_valid_expired_revoked(self, world: World, local_validator: LocalValidator) -> None:
        token = _token(world)
        assert local_validator.validate(token).claims is not None
        assert local_validator.validate(token, required_scopes=["nope"]).reason_name == (
            "INSUFFICIENT_SCOPE"
        )
        _revoke(world.server, token)
        assert _wait_for(lambda: local_validator.validate(token).reason_name == "REVOKED", 30)

    def test_disabled_service_is_service_disabled_locally_and_remotely(
        self, world: World, local_validator: LocalValidator, remote_validator: RemoteValidator
    ) -> None:
        # Disabling writes a revocation of the service's tokens; the feed says it is a disable,
        # so the local validator gives the reason authsvc gives, not REVOKED.
        secret = world.server.create_service("ledger", ["billing"], ["billing.read"])
        token = world.server.issue("ledger", secret, "billing").access_token
        assert local_validator.validate(token).valid
        assert remote_validator.validate(token).valid
        world.server.stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id="ledger"),
            metadata=world.admin_md(),
            timeout=10,
        )
        for validator in (local_validator, remote_validator):
            assert _wait_for(lambda v=validator: not v.validate(token).valid, 10)
        assert local_validator.validate(token).reason_name == "SERVICE_DISABLED"
        assert remote_validator.validate(token).reason_name == "SERVICE_DISABLED"
        # A token revoked on its own stays REVOKED from both.
        other = _token(world)
        _revoke(world.server, other)
        for validator in (local_validator, remote_validator):
            assert _wait_for(lambda v=validator: v.validate(other).reason_name == "REVOKED", 10)

    def test_revocation_reaches_local_validator_within_bound(
        self, world: World, local_validator: LocalValidator
    ) -> None:
        latencies: list[float] = []
        for _ in range(20):
            token = _token(world)
            assert local_validator.validate(token).valid
            started = time.monotonic()
            _revoke(world.server, token)  # returns once authsvc has committed it
            assert _wait_for(
                lambda t=token: local_validator.validate(t).reason_name == "REVOKED",
                REVOCATION_BOUND_SECONDS,
            )
            latencies.append(time.monotonic() - started)
        figures = {
            "median_ms": round(statistics.median(latencies) * 1000, 1),
            "max_ms": round(max(latencies) * 1000, 1),
        }
        print(f"revocation propagation to a local validator over 20 revocations: {figures}")
        assert max(latencies) < REVOCATION_BOUND_SECONDS

    def test_key_rotation_under_continuous_traffic_has_no_failed_call(
        self, world: World
    ) -> None:
        authsvc = grpc.insecure_channel(world.server.address)
        validator = LocalValidator(
            authsvc,
            "billing",
            ISSUER,
            unknown_kid_interval_seconds=1,
            token_source=world.follower_token,
        )
        assert validator.wait_ready(10)
        billing = Billing(validator)
        clock = FakeClock()
        source = TokenSource(authsvc, service_id="orders", service_secret=world.orders_secret,
                             audience="billing", clock=clock)
        creds = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
            call_credentials(source),
        )
        channel = grpc.secure_channel(billing.local_address, creds)
        stop_traffic = threading.Event()
        ok = [0]
        failures: list[grpc.StatusCode] = []

        def traffic() -> None:
            while not stop_traffic.is_set():
                code = status_of(lambda: call(channel))
                if code == grpc.StatusCode.OK:
                    ok[0] += 1
                else:
                    failures.append(code)

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        try:
            for w in workers:
                w.start()
            # Progress, not time: calls before the rotation, between it and the clients'
            # refresh, and after it, however slowly a loaded machine runs them.
            assert _wait_for(lambda: ok[0] >= 20, 60)
            kids_before = set(validator.keys.ring.kids)
            rotated = world.server.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=world.admin_md(), timeout=10
            )
            done = ok[0]
            assert _wait_for(lambda: ok[0] >= done + 15, 60)
            clock.advance(3600)  # every client now needs a token from the new key
            assert _wait_for(lambda: rotated.key_id in validator.keys.ring.kids, 30)
            done = ok[0]
            assert _wait_for(lambda: ok[0] >= done + 20, 60)
        finally:
            stop_traffic.set()
            for w in workers:
                w.join()
            channel.close()
            billing.stop()
            validator.close()
            authsvc.close()
        # The key a rotation activates was published before it signed: no unknown-kid fetch.
        assert rotated.key_id in kids_before
        assert validator.unknown_kid_refetches == 0
        assert failures == []
        assert ok[0] > 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnWorld:
    """An authsvc of the test's own, on a fixed port so that it can be restarted in place."""

    def __init__(self, folder: Path) -> None:
        self.env = sqlite_env(folder, AUTHSVC_LEEWAY_SECONDS="0")
        run_cli(self.env, "db", "upgrade")
        self.address = f"127.0.0.1:{_free_port()}"
        self.server: RunningServer | None = None
        self.start()
        assert self.server is not None
        self.orders_secret: str = self.server.create_service(
            "orders", ["billing"], ["billing.read", "billing.write"]
        )

    def start(self) -> RunningServer:
        self.server = start_server(self.env, "--listen", self.address)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            stop(self.server)
            self.server = None

    def crash(self) -> None:
        """SIGKILL: the connection drops at once, as when a host dies."""
        if self.server is not None:
            self.server.stop(sig=signal.SIGKILL)
            stop(self.server)
            self.server = None

    def issue(self) -> str:
        assert self.server is not None
        return self.server.issue("orders", self.orders_secret, "billing").access_token

    def follower_token(self) -> str:
        """orders' scopeless token for authsvc: what the LocalValidator follows the feed with
        (raises while the server is down, as a TokenSource would)."""
        if self.server is None:
            raise ConnectionError("authsvc is down")
        return self.server.issue("orders", self.orders_secret, "authsvc").access_token


@pytest.fixture
def own_world(tmp_path: Path) -> Iterator[OwnWorld]:
    w = OwnWorld(tmp_path)
    try:
        yield w
    finally:
        w.stop()


class TestAuthsvcOutage:
    def test_remote_denies_local_keeps_known_keys_then_fails_closed_and_resumes(
        self, own_world: OwnWorld
    ) -> None:
        # Reconnect backoff is the channel's: keep it short so the resume is quick to see. A
        # channel of its own, so gRPC's process-wide subchannel pool (which keeps the backoff
        # of earlier failures to this address) does not slow other channels.
        authsvc = grpc.insecure_channel(own_world.address, options=FAST_RECONNECT)
        local = LocalValidator(
            authsvc,
            "billing",
            ISSUER,
            max_feed_outage_seconds=1.5,
            token_source=own_world.follower_token,
        )
        remote = RemoteValidator(authsvc, "billing", cache_ttl_seconds=0, timeout_seconds=1)
        assert local.wait_ready(10)
        local_billing, remote_billing = Billing(local), Billing(remote)
        revoked_early, kept, revoked_later = own_world.issue(), own_world.issue(), own_world.issue()
        md = [("authorization", f"Bearer {kept}")]
        try:
            assert own_world.server is not None
            _revoke(own_world.server, revoked_early)
            assert _wait_for(lambda: local.validate(revoked_early).reason_name == "REVOKED", 30)
            applied = local.feed.events_applied

            own_world.crash()  # authsvc goes away
            with grpc.insecure_channel(remote_billing.address) as ch:
                assert status_of(lambda: call(ch, metadata=md)) == grpc.StatusCode.UNAVAILABLE
            with grpc.insecure_channel(local_billing.address) as ch:
                assert call(ch, metadata=md) == b"orders"  # known key, within the bound
                assert _wait_for(lambda: not local.healthy, 30)
                assert status_of(lambda: call(ch, metadata=md)) == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(ValidatorUnavailable):
                local.validate(kept)

            # authsvc comes back on the same address: the feed resumes from its cursor
            restarted = own_world.start()
            _revoke(restarted, revoked_later)
            assert _wait_for(lambda: local.healthy, 30)
            assert _wait_for(lambda: local.validate(revoked_later).reason_name == "REVOKED", 30)
            assert local.validate(revoked_early).reason_name == "REVOKED"
            assert local.validate(kept).valid
            # exactly one new event applied: nothing replayed twice, nothing missed
            assert local.feed.events_applied == applied + 1
            assert local.feed.connects >= 2
            with grpc.insecure_channel(remote_billing.address) as ch:
                assert call(ch, metadata=md) == b"orders"
        finally:
            local_billing.stop()
            remote_billing.stop()
            local.close()
            authsvc.close()


class TestEmergencyKeyRevocation:
    def test_revoke_previous_reaches_a_local_validator_within_its_refresh_interval(
        self, own_world: OwnWorld
    ) -> None:
        assert own_world.server is not None
        admin = own_world.server.create_service("ops", [], [], admin=True)
        authsvc = grpc.insecure_channel(own_world.address)
        local = LocalValidator(
            authsvc,
            "billing",
            ISSUER,
            jwks_refresh_seconds=1,
            token_source=own_world.follower_token,
        )
        try:
            assert local.wait_ready(10)
            old = own_world.issue()
            assert local.validate(old).valid
            token = own_world.server.issue("ops", admin, "authsvc").access_token
            own_world.server.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(revoke_previous=True),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=30,
            )
            # The cached answer for `old` must not outlive the key: refused after one refresh.
            assert _wait_for(lambda: local.validate(old).reason_name == "UNKNOWN_KEY", 5)
            assert local.validate(own_world.issue()).valid
        finally:
            local.close()
            authsvc.close()
