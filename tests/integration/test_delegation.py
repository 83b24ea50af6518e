"""Delegation (RFC 8693 token exchange with an access token) against a real `authsvc serve`:
front calls orders, orders calls billing on front's behalf, billing calls ledger on the same
chain. Every refusal issue 15 lists, with its status code."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import FOLLOWER_AUDIENCE, RemoteValidator
from tests.support.server import RunningServer, base_env, create_service, run_cli, start_server

ACCESS = "urn:ietf:params:oauth:token-type:access_token"
ADMIN = "ops-admin"


@dataclass
class Chain:
    server: RunningServer
    secrets: dict[str, str] = field(repr=False)

    def token(
        self, service: str, audience: str, ttl: int = 0, scopes: list[str] | None = None
    ) -> str:
        return str(
            self.server.issue(service, self.secrets[service], audience, scopes, ttl).access_token
        )

    def exchange(
        self,
        subject_token: str,
        actor: str,
        audience: str,
        *,
        secret: str | None = None,
        scopes: list[str] | None = None,
    ) -> auth_pb2.IssueTokenResponse:
        reply: auth_pb2.IssueTokenResponse = self.server.stub.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(
                subject_token=subject_token,
                subject_token_type=ACCESS,
                audience=audience,
                scopes=scopes or [],
                service_id=actor,
                service_secret=self.secrets[actor] if secret is None else secret,
            ),
            timeout=10,
        )
        return reply

    def validate(self, token: str, audience: str) -> auth_pb2.ValidateTokenResponse:
        reply: auth_pb2.ValidateTokenResponse = self.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience=audience), timeout=10
        )
        return reply

    def admin_md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token(ADMIN, 'authsvc')}")]

    def until(self, token: str, audience: str, reason: str, seconds: float = 5.0) -> None:
        """Wait for the server to say `reason` (revocations apply within a sync interval)."""
        deadline = time.monotonic() + seconds
        while True:
            got = auth_pb2.ValidationFailure.Name(self.validate(token, audience).reason)
            if got == reason or time.monotonic() > deadline:
                assert got == reason
                return
            time.sleep(0.05)


def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    folder: Path = tmp_path_factory.mktemp("delegation")
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_DELEGATION_MAX_DEPTH="2",
        AUTHSVC_LEEWAY_SECONDS="0",
    )
    run_cli(env, "db", "upgrade")
    secrets = {
        ADMIN: create_service(env, ADMIN, admin=True),
        # front may call orders, and (on its own or through others) billing.read and ledger;
        # billing.export and inventory are front's alone, so no actor may pass them on.
        "front": create_service(
            env,
            "front",
            "orders=orders.read",
            "billing=billing.read",
            "billing=billing.export",
            "ledger=ledger.read",
            "inventory=inventory.read",
        ),
        "orders": create_service(
            env, "orders", "billing=billing.read", "billing=billing.write", "ledger=ledger.read"
        ),
        "billing": create_service(env, "billing", "ledger=ledger.read", "audit=audit.write"),
        "ledger": create_service(env, "ledger", "audit=audit.write"),
        "mallory": create_service(env, "mallory", "billing=billing.write"),
    }
    server = start_server(env)
    try:
        yield Chain(server, secrets)
    finally:
        server.stop()


class TestDelegation:
    def test_orders_calls_billing_on_fronts_behalf(self, chain: Chain) -> None:
        subject = chain.token("front", "orders", ttl=600)
        derived = chain.exchange(subject, "orders", "billing")
        checked = chain.validate(derived.access_token, "billing")
        assert checked.valid
        assert checked.claims.subject == "front"
        assert list(checked.claims.actors) == ["orders"]
        assert checked.claims.client_id == "orders"
        # Within both grants: billing.read is the one scope both front and orders hold.
        assert list(derived.scopes) == ["billing.read"]
        # RFC 8693 section 2.2.1: what was issued, and how to present it.
        assert derived.issued_token_type == ACCESS
        assert derived.token_type == "Bearer"

    def test_a_longer_chain_nests_the_actors_nearest_first(self, chain: Chain) -> None:
        first = chain.exchange(chain.token("front", "orders"), "orders", "billing")
        second = chain.exchange(first.access_token, "billing", "ledger")
        checked = chain.validate(second.access_token, "ledger")
        assert checked.claims.subject == "front"
        assert list(checked.claims.actors) == ["billing", "orders"]

    def test_a_chain_deeper_than_the_limit_is_permission_denied(self, chain: Chain) -> None:
        first = chain.exchange(chain.token("front", "orders"), "orders", "billing")
        second = chain.exchange(first.access_token, "billing", "ledger")  # depth 2: the limit
        details = _refused(
            lambda: chain.exchange(second.access_token, "ledger", "audit"),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "too deep" in details

    def test_it_never_outlives_the_subject_token(self, chain: Chain) -> None:
        subject = chain.token("front", "orders", ttl=60)
        derived = chain.exchange(subject, "orders", "billing")
        front_exp = chain.validate(subject, "orders").claims.expires_at.seconds
        assert derived.expires_at.seconds <= front_exp

    def test_a_subject_token_for_someone_else_is_refused(self, chain: Chain) -> None:
        # front's token for billing, presented by orders (it was never addressed to orders).
        stolen = chain.token("front", "billing")
        _refused(
            lambda: chain.exchange(stolen, "orders", "billing"), grpc.StatusCode.UNAUTHENTICATED
        )
        # front's token for orders, replayed by mallory with mallory's own valid credentials.
        for_orders = chain.token("front", "orders")
        _refused(
            lambda: chain.exchange(for_orders, "mallory", "billing"),
            grpc.StatusCode.UNAUTHENTICATED,
        )

    def test_an_expired_subject_token_is_refused(self, chain: Chain) -> None:
        subject = chain.token("front", "orders", ttl=1)
        time.sleep(2.1)  # AUTHSVC_LEEWAY_SECONDS=0
        _refused(
            lambda: chain.exchange(subject, "orders", "billing"), grpc.StatusCode.UNAUTHENTICATED
        )

    def test_scope_widening_is_permission_denied(self, chain: Chain) -> None:
        subject = chain.token("front", "orders")
        # orders may have billing.write, front may not: the chain may not either.
        details = _refused(
            lambda: chain.exchange(subject, "orders", "billing", scopes=["billing.write"]),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "billing.write" in details
        # An audience front has no grant for, or authsvc itself (no admin by delegation).
        for audience in ("audit", "authsvc"):
            _refused(
                lambda audience=audience: chain.exchange(subject, "orders", audience),
                grpc.StatusCode.PERMISSION_DENIED,
            )

    def test_the_actors_own_grants_bound_it_too(self, chain: Chain) -> None:
        subject = chain.token("front", "orders")
        # front may have billing.export, orders may not: asked for, refused by name.
        details = _refused(
            lambda: chain.exchange(subject, "orders", "billing", scopes=["billing.export"]),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "billing.export" in details
        # front may call inventory, orders may not at all.
        _refused(
            lambda: chain.exchange(subject, "orders", "inventory"),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        # Asking for nothing gets the intersection, never front's grant alone.
        derived = chain.exchange(subject, "orders", "billing")
        assert list(derived.scopes) == ["billing.read"]
        assert chain.validate(derived.access_token, "billing").claims.scopes == ["billing.read"]

    def test_an_actor_whose_own_credentials_fail_is_unauthenticated(self, chain: Chain) -> None:
        subject = chain.token("front", "orders")
        details = _refused(
            lambda: chain.exchange(subject, "orders", "billing", secret="asvcs_wrong"),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert details == "invalid service credentials"
        # Without any actor credential the request itself is malformed.
        _refused(
            lambda: chain.server.stub.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(
                    subject_token=subject, subject_token_type=ACCESS, audience="billing"
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

    def test_the_audit_row_names_subject_and_actors(self, chain: Chain) -> None:
        chain.exchange(chain.token("front", "orders"), "orders", "billing")
        rows = json.loads(chain.server.cli("audit", "list", "--json", "--limit", "200").stdout)
        exchanges = [r for r in rows if r["action"] == "exchange_token" and r["outcome"] == "ok"]
        assert any(
            r["actor"] == "orders" and "subject=front actors=orders" in r["detail"]
            for r in exchanges
        )


class TestRevocationFollowsTheChain:
    def test_revoking_the_subject_token_revokes_what_was_derived(self, chain: Chain) -> None:
        subject = chain.token("front", "orders")
        derived = chain.exchange(subject, "orders", "billing").access_token
        further = chain.exchange(derived, "billing", "ledger").access_token
        chain.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=subject), timeout=10)
        chain.until(derived, "billing", "REVOKED")
        chain.until(further, "ledger", "REVOKED")
        _refused(
            lambda: chain.exchange(subject, "orders", "billing"), grpc.StatusCode.UNAUTHENTICATED
        )

    def test_revoking_an_actors_tokens_revokes_its_delegated_ones(self, chain: Chain) -> None:
        subject = chain.token("front", "orders")
        delegated = chain.exchange(subject, "orders", "billing").access_token
        chain.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id="orders"), metadata=chain.admin_md(), timeout=10
        )
        chain.until(delegated, "billing", "REVOKED")

    def test_a_disabled_subject_service_stops_its_chain(self, chain: Chain) -> None:
        secret = create_service(
            chain.server.env, "kiosk", "orders=orders.read", "billing=billing.read"
        )
        chain.secrets["kiosk"] = secret
        subject = chain.token("kiosk", "orders")
        delegated = chain.exchange(subject, "orders", "billing").access_token
        chain.server.cli("services", "disable", "kiosk")
        chain.until(delegated, "billing", "SERVICE_DISABLED")
        _refused(
            lambda: chain.exchange(subject, "orders", "billing"), grpc.StatusCode.UNAUTHENTICATED
        )


class TestARemoteValidatorsCacheFollowsTheChain:
    """RemoteValidator(follow_revocations=True) drops a cached answer the moment its
    revocation arrives on the feed; for a delegated token, that includes the revocation of a
    token it was exchanged from and of an actor service (the chain the verifier checks)."""

    @pytest.fixture
    def billing(self, chain: Chain) -> Iterator[RemoteValidator]:
        channel = grpc.insecure_channel(chain.server.address)
        validator = RemoteValidator(
            channel,
            "billing",
            cache_ttl_seconds=300,  # far beyond the test: only the feed can drop an entry
            follow_revocations=True,
            token_source=lambda: chain.token("billing", FOLLOWER_AUDIENCE),
        )
        try:
            deadline = time.monotonic() + 10
            while not validator.feed.connected and time.monotonic() < deadline:
                time.sleep(0.02)
            assert validator.feed.connected
            yield validator
        finally:
            validator.close()
            channel.close()

    def _cached(self, validator: RemoteValidator, token: str) -> None:
        assert validator.validate(token).valid
        assert validator.validate(token).valid
        assert len(validator._core.cache) >= 1  # the answer is held, not asked again

    def _until(self, validator: RemoteValidator, token: str, reason: str) -> None:
        deadline = time.monotonic() + 5
        while True:
            got = auth_pb2.ValidationFailure.Name(validator.validate(token).reason)
            if got == reason or time.monotonic() > deadline:
                assert got == reason
                return
            time.sleep(0.05)

    def test_revoking_the_subject_token(self, chain: Chain, billing: RemoteValidator) -> None:
        subject = chain.token("front", "orders")
        derived = chain.exchange(subject, "orders", "billing").access_token
        self._cached(billing, derived)
        chain.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=subject), timeout=10)
        self._until(billing, derived, "REVOKED")

    def test_revoking_the_actors_tokens(self, chain: Chain, billing: RemoteValidator) -> None:
        env = chain.server.env
        chain.secrets["tram"] = create_service(
            env, "tram", "relay=relay.use", "billing=billing.read"
        )
        chain.secrets["relay"] = create_service(env, "relay", "billing=billing.read")
        subject = chain.token("tram", "relay")
        derived = chain.exchange(subject, "relay", "billing").access_token
        self._cached(billing, derived)
        chain.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id="relay"), metadata=chain.admin_md(), timeout=10
        )
        self._until(billing, derived, "REVOKED")

    def test_disabling_the_actor(self, chain: Chain, billing: RemoteValidator) -> None:
        env = chain.server.env
        chain.secrets["bus"] = create_service(
            env, "bus", "courier=courier.use", "billing=billing.read"
        )
        chain.secrets["courier"] = create_service(env, "courier", "billing=billing.read")
        subject = chain.token("bus", "courier")
        derived = chain.exchange(subject, "courier", "billing").access_token
        self._cached(billing, derived)
        chain.server.cli("services", "disable", "courier")
        self._until(billing, derived, "SERVICE_DISABLED")
