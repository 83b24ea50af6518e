"""Grants per audience and changing a live service, on real `authsvc serve` processes over gRPC.

Issue 12 items 6 and 7: a token for one audience carries only what was granted for that
audience; UpdateService and EnableService (and the CLI behind them) change a live service, and
the change applies to the very next login, on every replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from authsvc_client import LocalValidator
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN, World
from tests.support.server import (
    TEST_ISSUER,
    RunningServer,
    base_env,
    run_cli,
    running_server,
)


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = exc.value.code()  # type: ignore[attr-defined]
    return code


def _details(exc: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return str(exc.value.details())  # type: ignore[attr-defined]


def _create(server: RunningServer, name: str, *flags: str) -> str:
    out = server.cli("services", "create", name, "--json", *flags).stdout
    return str(json.loads(out)["service_secret"])


def _validate(server: RunningServer, token: str, audience: str) -> auth_pb2.ValidateTokenResponse:
    return server.stub.ValidateToken(  # type: ignore[no-any-return]
        auth_pb2.ValidateTokenRequest(token=token, audience=audience), timeout=10
    )


def _update(world: World, service_id: str, **fields: Any) -> auth_pb2.Service:
    reply = world.server.stub.UpdateService(
        auth_pb2.UpdateServiceRequest(service_id=service_id, **fields),
        metadata=world.admin_md(),
        timeout=10,
    )
    return reply.service


def _grants(service: auth_pb2.Service) -> dict[str, list[str]]:
    return {g.audience: list(g.scopes) for g in service.grants}


def _audit(server: RunningServer, action: str, target: str) -> list[dict[str, Any]]:
    rows = json.loads(server.cli("audit", "list", "--json", "--limit", "10000").stdout)
    return [r for r in rows if r["action"] == action and r["target"] == target]


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class TestTokensCarryOnlyTheirAudiencesGrant:
    def test_a_billing_token_never_carries_a_scope_granted_only_for_inventory(
        self, world: World
    ) -> None:
        """The regression of issue 12 item 6: before grants per audience, `reporter`'s billing
        token carried inventory.admin."""
        server = world.server
        secret = _create(
            server,
            "reporter",
            "--grant",
            "billing=billing.read",
            "--grant",
            "inventory=inventory.admin",
        )
        billing = server.issue("reporter", secret, "billing")
        assert list(billing.scopes) == ["billing.read"]
        assert _validate(server, billing.access_token, "billing").claims.scopes == ["billing.read"]
        assert list(server.issue("reporter", secret, "inventory").scopes) == ["inventory.admin"]
        with pytest.raises(grpc.RpcError) as exc:
            server.issue("reporter", secret, "billing", ["billing.read", "inventory.admin"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert _details(exc).endswith("scope not allowed for this service: inventory.admin")

    def test_plain_flags_still_grant_every_scope_for_every_audience(self, world: World) -> None:
        server = world.server
        secret = _create(
            server, "plain", "--audience", "billing", "--audience", "inventory",
            "--scope", "billing.read", "--scope", "inventory.admin",
        )  # fmt: skip
        for audience in ("billing", "inventory"):
            reply = server.issue("plain", secret, audience)
            assert list(reply.scopes) == ["billing.read", "inventory.admin"]

    def test_an_audience_without_scopes_gets_scopeless_tokens_only(self, world: World) -> None:
        server = world.server
        secret = _create(server, "quiet", "--grant", "billing=", "--grant", "search=search.q")
        assert list(server.issue("quiet", secret, "billing").scopes) == []
        with pytest.raises(grpc.RpcError) as exc:
            server.issue("quiet", secret, "billing", ["search.q"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert "search.q" in _details(exc)

    def test_admin_grants_the_admin_scope_for_authsvc_only(self, world: World) -> None:
        server = world.server
        secret = _create(server, "ops2", "--admin", "--audience", "billing", "--scope", "b.r")
        assert list(server.issue("ops2", secret, "billing").scopes) == ["b.r"]
        with pytest.raises(grpc.RpcError) as exc:
            server.issue("ops2", secret, "billing", ["authsvc.admin"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert list(server.issue("ops2", secret, "authsvc").scopes) == ["authsvc.admin"]

    def test_any_service_still_gets_a_scopeless_token_for_authsvc(self, world: World) -> None:
        server = world.server
        secret = _create(server, "follower", "--grant", "billing=billing.read")
        assert list(server.issue("follower", secret, "authsvc").scopes) == []
        with pytest.raises(grpc.RpcError) as exc:
            server.issue("follower", secret, "authsvc", ["billing.read"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    def test_create_service_rpc_takes_grants_and_list_shows_them(self, world: World) -> None:
        reply = world.server.stub.CreateService(
            auth_pb2.CreateServiceRequest(
                service_id="rpc-made",
                audiences=["billing"],
                scopes=["billing.read"],
                grants=[auth_pb2.Grant(audience="inventory", scopes=["inventory.admin"])],
            ),
            metadata=world.admin_md(),
            timeout=10,
        )
        expected = {"billing": ["billing.read"], "inventory": ["inventory.admin"]}
        assert _grants(reply.service) == expected
        # audiences and scopes stay filled for older clients
        assert list(reply.service.audiences) == ["billing", "inventory"]
        assert list(reply.service.scopes) == ["billing.read", "inventory.admin"]
        listed = world.server.stub.ListServices(
            auth_pb2.ListServicesRequest(), metadata=world.admin_md(), timeout=10
        )
        [service] = [s for s in listed.services if s.service_id == "rpc-made"]
        assert _grants(service) == expected
        assert list(world.server.issue("rpc-made", reply.service_secret, "inventory").scopes) == [
            "inventory.admin"
        ]


class TestUpdateService:
    def test_a_change_applies_to_the_next_login_and_is_audited_once(self, world: World) -> None:
        server = world.server
        secret = _create(server, "cart", "--audience", "billing", "--scope", "billing.read")
        service = _update(world, "cart", add_audiences=["inventory"], add_scopes=["audit.read"])
        assert _grants(service) == {
            "billing": ["billing.read", "audit.read"],
            "inventory": ["billing.read", "audit.read"],
        }
        assert list(server.issue("cart", secret, "inventory").scopes) == [
            "billing.read",
            "audit.read",
        ]
        service = _update(
            world,
            "cart",
            revoke_grants=[auth_pb2.Grant(audience="inventory", scopes=["billing.read"])],
            remove_scopes=["audit.read"],
        )
        assert _grants(service) == {"billing": ["billing.read"], "inventory": []}
        assert list(server.issue("cart", secret, "inventory").scopes) == []
        _update(world, "cart", remove_audiences=["inventory"])
        with pytest.raises(grpc.RpcError) as exc:
            server.issue("cart", secret, "inventory")
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        rows = _audit(server, "update_service", "service:cart")
        assert [(r["actor"], r["outcome"]) for r in rows] == [(ADMIN, "ok")] * 3
        assert rows[0]["detail"] == "billing=billing.read"  # newest first

    def test_a_token_issued_before_a_change_keeps_its_scopes(self, world: World) -> None:
        server = world.server
        secret = _create(server, "keeper", "--audience", "billing", "--scope", "billing.write")
        before = server.issue("keeper", secret, "billing").access_token
        _update(world, "keeper", remove_scopes=["billing.write"], add_scopes=["billing.read"])
        assert list(_validate(server, before, "billing").claims.scopes) == ["billing.write"]
        assert list(server.issue("keeper", secret, "billing").scopes) == ["billing.read"]

    @pytest.mark.parametrize(
        ("fields", "code"),
        [
            ({}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"add_scopes": ["a"], "remove_scopes": ["a"]}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"add_audiences": ["bad audience"]}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"remove_scopes": ["never.granted"]}, grpc.StatusCode.FAILED_PRECONDITION),
            ({"remove_audiences": ["billing"]}, grpc.StatusCode.FAILED_PRECONDITION),
        ],
    )
    def test_bad_changes_are_refused_and_change_nothing(
        self, world: World, fields: dict[str, Any], code: grpc.StatusCode
    ) -> None:
        name = f"bad-{abs(hash(json.dumps(fields, sort_keys=True))) % 10**8}"
        _create(world.server, name, "--audience", "billing", "--scope", "billing.read")
        with pytest.raises(grpc.RpcError) as exc:
            _update(world, name, **fields)
        assert _code(exc) == code
        listed = json.loads(world.server.cli("services", "list", "--json").stdout)
        [service] = [s for s in listed if s["service_id"] == name]
        assert service["grants"] == {"billing": ["billing.read"]}

    def test_an_unknown_service_is_not_found(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            _update(world, "ghost", add_scopes=["a"])
        assert _code(exc) == grpc.StatusCode.NOT_FOUND

    def test_update_and_enable_need_an_admin_token(self, world: World) -> None:
        token = world.server.issue("billing", world.billing_secret, "authsvc").access_token
        for call, request in (
            (world.server.stub.UpdateService, auth_pb2.UpdateServiceRequest(
                service_id="billing", add_scopes=["authsvc.admin"])),
            (world.server.stub.EnableService, auth_pb2.EnableServiceRequest(service_id="billing")),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as exc:
                call(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
            assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as exc:
                call(request, timeout=10)
            assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert list(world.server.issue("billing", world.billing_secret, "orders").scopes) == [
            "orders.read"
        ]


class TestEnableService:
    def test_enable_keeps_what_the_disable_revoked_on_the_server_and_a_local_validator(
        self, world: World
    ) -> None:
        server = world.server
        secret = _create(server, "payroll", "--audience", "billing")
        local = LocalValidator(
            grpc.insecure_channel(server.address),
            "billing",
            TEST_ISSUER,
            token_source=world.follower_token,
        )
        try:
            assert local.wait_ready(30)
            before = server.issue("payroll", secret, "billing").access_token
            assert local.validate(before).valid
            server.stub.DisableService(
                auth_pb2.DisableServiceRequest(service_id="payroll"),
                metadata=world.admin_md(),
                timeout=10,
            )
            with pytest.raises(grpc.RpcError) as exc:
                server.issue("payroll", secret, "billing")
            assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
            assert _wait_for(lambda: not local.validate(before).valid)

            reply = server.stub.EnableService(
                auth_pb2.EnableServiceRequest(service_id="payroll"),
                metadata=world.admin_md(),
                timeout=10,
            )
            assert not reply.service.disabled
            after = server.issue("payroll", secret, "billing").access_token
            assert _validate(server, after, "billing").valid
            assert _wait_for(lambda: local.validate(after).valid)
            # What the disable revoked stays revoked, on the server and the local validator.
            assert not _validate(server, before, "billing").valid
            assert not local.validate(before).valid
            rows = _audit(server, "enable_service", "service:payroll")
            assert [(r["actor"], r["outcome"]) for r in rows] == [(ADMIN, "ok")]
        finally:
            local.close()

    def test_enabling_an_enabled_or_unknown_service(self, world: World) -> None:
        _create(world.server, "awake", "--audience", "billing")
        reply = world.server.stub.EnableService(
            auth_pb2.EnableServiceRequest(service_id="awake"),
            metadata=world.admin_md(),
            timeout=10,
        )
        assert not reply.service.disabled
        rows = _audit(world.server, "enable_service", "service:awake")
        assert [r["outcome"] for r in rows] == ["already_enabled"]
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.EnableService(
                auth_pb2.EnableServiceRequest(service_id="ghost"),
                metadata=world.admin_md(),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.NOT_FOUND


class TestReplicas:
    def test_a_change_through_one_replica_applies_to_the_next_login_on_the_other(
        self, postgres_url: str
    ) -> None:
        """Logins read the service in their own transaction: no sync interval in between. The
        sync interval is set long, so only the database can carry the change."""
        env = base_env(postgres_url, AUTHSVC_SYNC_INTERVAL_SECONDS="30")
        run_cli(env, "db", "upgrade")
        with running_server(env) as a, running_server(env) as b:
            admin_secret = a.create_service("ops", [], [], admin=True)
            admin = [
                ("authorization", f"Bearer {a.issue('ops', admin_secret, 'authsvc').access_token}")
            ]
            secret = a.create_service("orders", ["billing"], ["billing.read"])
            assert list(b.issue("orders", secret, "billing").scopes) == ["billing.read"]

            a.stub.UpdateService(
                auth_pb2.UpdateServiceRequest(
                    service_id="orders",
                    grants=[auth_pb2.Grant(audience="inventory", scopes=["inventory.admin"])],
                    remove_scopes=["billing.read"],
                ),
                metadata=admin,
                timeout=10,
            )
            assert list(b.issue("orders", secret, "billing").scopes) == []
            assert list(b.issue("orders", secret, "inventory").scopes) == ["inventory.admin"]

            b.cli("services", "disable", "orders")
            with pytest.raises(grpc.RpcError) as exc:
                a.issue("orders", secret, "billing")
            assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
            a.stub.EnableService(
                auth_pb2.EnableServiceRequest(service_id="orders"), metadata=admin, timeout=10
            )
            token = b.issue("orders", secret, "inventory").access_token
            # A replica applies its own writes at once: validate where the enable was made.
            assert _validate(a, token, "inventory").valid
