"""Every RPC and every status code of DESIGN.md, against a real `authsvc serve` process."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN, World, make_world


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()  # type: ignore[attr-defined,no-any-return]


def _details(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return excinfo.value.details()  # type: ignore[attr-defined,no-any-return]


def _payload(token: str) -> dict[str, object]:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))  # type: ignore[no-any-return]


def _header(token: str) -> dict[str, object]:
    seg = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))  # type: ignore[no-any-return]


def _validate(
    world: World, token: str, audience: str = "billing", scopes: list[str] | None = None
) -> auth_pb2.ValidateTokenResponse:
    return world.server.stub.ValidateToken(
        auth_pb2.ValidateTokenRequest(token=token, audience=audience, required_scopes=scopes or []),
        timeout=10,
    )


class TestIssueToken:
    def test_issues_an_rfc9068_token_for_the_audience(self, world: World) -> None:
        r = world.server.issue("orders", world.orders_secret, "billing", ["billing.read"])
        assert r.token_type == "Bearer"
        assert r.issued_token_type == "urn:ietf:params:oauth:token-type:access_token"
        assert r.expires_in == 900
        assert list(r.scopes) == ["billing.read"]
        header, claims = _header(r.access_token), _payload(r.access_token)
        assert header == {"alg": "RS256", "typ": "at+jwt", "kid": r.key_id}
        assert claims["sub"] == "orders" and claims["client_id"] == "orders"
        assert claims["aud"] == "billing"
        assert claims["scope"] == "billing.read"
        assert claims["iss"] == "https://authsvc.test.invalid"
        assert claims["exp"] == r.expires_at.seconds
        assert claims["exp"] - claims["iat"] == 900 and claims["nbf"] == claims["iat"]
        assert len(base64.urlsafe_b64decode(str(claims["jti"]) + "==")) >= 16

    def test_empty_scopes_grant_every_allowed_scope(self, world: World) -> None:
        r = world.server.issue("orders", world.orders_secret, "billing")
        assert sorted(r.scopes) == ["billing.read", "billing.write"]

    def test_ttl_is_honoured_and_clamped_to_the_maximum(self, world: World) -> None:
        assert world.server.issue("orders", world.orders_secret, "billing", ttl=60).expires_in == 60
        assert (
            world.server.issue("orders", world.orders_secret, "billing", ttl=999_999).expires_in
            == 3600
        )

    def test_every_token_has_a_fresh_jti(self, world: World) -> None:
        jtis = {
            _payload(world.server.issue("orders", world.orders_secret, "billing").access_token)[
                "jti"
            ]
            for _ in range(5)
        }
        assert len(jtis) == 5

    def test_wrong_secret_and_unknown_id_look_the_same(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as wrong:
            world.server.issue("orders", "asvcs_wrong", "billing")
        with pytest.raises(grpc.RpcError) as unknown:
            world.server.issue("nobody", "asvcs_wrong", "billing")
        assert _code(wrong) == _code(unknown) == grpc.StatusCode.UNAUTHENTICATED
        assert _details(wrong) == _details(unknown)
        assert "asvcs_wrong" not in _details(wrong)

    def test_audience_not_allowed_is_permission_denied(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("orders", world.orders_secret, "payroll")
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    def test_scope_not_allowed_is_permission_denied(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("orders", world.orders_secret, "billing", ["billing.admin"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    @pytest.mark.parametrize(
        "request_fields",
        [
            {"service_secret": "x", "audience": "billing"},
            {"service_id": "orders", "audience": "billing"},
            {"service_id": "orders", "service_secret": "x"},
            {
                "service_id": "orders",
                "service_secret": "x",
                "audience": "billing",
                "ttl_seconds": -1,
            },
            {
                "service_id": "orders",
                "service_secret": "x",
                "audience": "billing",
                "scopes": ["a b"],
            },
        ],
    )
    def test_malformed_request_is_invalid_argument(
        self, world: World, request_fields: dict[str, object]
    ) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.IssueToken(auth_pb2.IssueTokenRequest(**request_fields), timeout=10)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


class TestValidateToken:
    def test_valid_token_returns_its_claims(self, world: World) -> None:
        issued = world.server.issue("orders", world.orders_secret, "billing", ["billing.read"])
        r = _validate(world, issued.access_token, scopes=["billing.read"])
        assert r.valid and r.reason == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
        assert r.claims.subject == "orders" and r.claims.audience == "billing"
        assert list(r.claims.scopes) == ["billing.read"]
        assert r.claims.key_id == issued.key_id
        assert r.claims.expires_at == issued.expires_at

    def test_other_audience_is_wrong_audience(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        r = _validate(world, token, audience="inventory")
        assert not r.valid and r.reason == auth_pb2.WRONG_AUDIENCE
        assert not r.HasField("claims")

    def test_missing_scope_is_insufficient_scope(self, world: World) -> None:
        token = world.server.issue(
            "orders", world.orders_secret, "billing", ["billing.read"]
        ).access_token
        r = _validate(world, token, scopes=["billing.write"])
        assert not r.valid and r.reason == auth_pb2.INSUFFICIENT_SCOPE

    def test_tampered_payload_is_bad_signature(self, world: World) -> None:
        token = world.server.issue(
            "orders", world.orders_secret, "billing", ["billing.read"]
        ).access_token
        h, _p, s = token.split(".")
        claims = _payload(token)
        claims["scope"] = "billing.read billing.write"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        r = _validate(world, f"{h}.{forged}.{s}")
        assert not r.valid and r.reason == auth_pb2.BAD_SIGNATURE

    @pytest.mark.parametrize("garbage", ["not-a-token", "a.b.c", "....", "eyJ.eyJ.sig"])
    def test_garbage_is_malformed_not_an_error(self, world: World, garbage: str) -> None:
        r = _validate(world, garbage)
        assert not r.valid and r.reason == auth_pb2.MALFORMED

    def test_unknown_kid_is_unknown_key(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        _h, p, s = token.split(".")
        header = _header(token)
        header["kid"] = "not-our-key"
        h2 = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
        r = _validate(world, f"{h2}.{p}.{s}")
        assert not r.valid and r.reason == auth_pb2.UNKNOWN_KEY

    @pytest.mark.parametrize(
        "request_fields",
        [{"audience": "billing"}, {"token": "a.b.c"}, {"token": "a" * 9000, "audience": "billing"}],
    )
    def test_malformed_request_is_invalid_argument(
        self, world: World, request_fields: dict[str, object]
    ) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(**request_fields), timeout=10
            )
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


class TestValidateTokenStream:
    def test_answers_every_request_in_order_like_validate_token(self, world: World) -> None:
        token = world.server.issue(
            "orders", world.orders_secret, "billing", ["billing.read"]
        ).access_token
        requests = [
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"),
            auth_pb2.ValidateTokenRequest(token=token, audience="inventory"),
            auth_pb2.ValidateTokenRequest(token="a.b.c", audience="billing"),
            auth_pb2.ValidateTokenRequest(
                token=token, audience="billing", required_scopes=["billing.write"]
            ),
        ] * 25
        answers = list(world.server.stub.ValidateTokenStream(iter(requests), timeout=30))
        assert len(answers) == len(requests)
        for request, answer in zip(requests, answers, strict=True):
            assert answer == world.server.stub.ValidateToken(request, timeout=10)

    def test_malformed_request_is_answered_malformed_and_the_stream_goes_on(
        self, world: World
    ) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        requests = [
            auth_pb2.ValidateTokenRequest(audience="billing"),
            auth_pb2.ValidateTokenRequest(token="a.b.c"),
            auth_pb2.ValidateTokenRequest(token="a" * 9000, audience="billing"),
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"),
        ]
        answers = list(world.server.stub.ValidateTokenStream(iter(requests), timeout=30))
        assert [(a.valid, a.reason) for a in answers] == [(False, auth_pb2.MALFORMED)] * 3 + [
            (True, auth_pb2.VALIDATION_FAILURE_UNSPECIFIED)
        ]

    def test_an_open_stream_does_not_hold_up_unary_calls(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        release = threading.Event()

        def held_open() -> Iterator[auth_pb2.ValidateTokenRequest]:
            yield auth_pb2.ValidateTokenRequest(token=token, audience="billing")
            release.wait(60)

        call = world.server.stub.ValidateTokenStream(held_open(), timeout=60)
        try:
            assert next(call).valid
            assert _validate(world, token).valid
        finally:
            release.set()
            call.cancel()

    def test_an_open_stream_sees_a_revocation_and_a_disable_at_the_next_message(
        self, world: World
    ) -> None:
        # Repeat answers come from the verifier's verdict memo and the servicer's answer
        # memo; neither may outlive a revocation or a disable made while the stream is open.
        md = world.admin_md()
        created = world.server.stub.CreateService(
            auth_pb2.CreateServiceRequest(service_id="memo-svc", audiences=["billing"]),
            metadata=md,
            timeout=10,
        )
        revoked = world.server.issue("orders", world.orders_secret, "billing").access_token
        disabled = world.server.issue("memo-svc", created.service_secret, "billing").access_token
        sent: queue.Queue[auth_pb2.ValidateTokenRequest | None] = queue.Queue()

        def requests() -> Iterator[auth_pb2.ValidateTokenRequest]:
            while (request := sent.get(timeout=30)) is not None:
                yield request

        call = world.server.stub.ValidateTokenStream(requests(), timeout=60)

        def check(token: str) -> auth_pb2.ValidateTokenResponse:
            sent.put(auth_pb2.ValidateTokenRequest(token=token, audience="billing"))
            return next(call)

        try:
            for _ in range(3):
                assert check(revoked).valid and check(disabled).valid
            assert world.server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(token=revoked), timeout=10
            ).revoked
            assert check(revoked).reason == auth_pb2.REVOKED
            assert check(disabled).valid
            world.server.stub.DisableService(
                auth_pb2.DisableServiceRequest(service_id="memo-svc"), metadata=md, timeout=10
            )
            assert check(disabled).reason == auth_pb2.SERVICE_DISABLED
            assert _validate(world, disabled).reason == auth_pb2.SERVICE_DISABLED
        finally:
            sent.put(None)
            call.cancel()


class TestRevokeToken:
    def test_presenting_a_token_revokes_it_in_any_encoding(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        assert _validate(world, token).valid
        r = world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=10)
        assert r.revoked
        assert _validate(world, token).reason == auth_pb2.REVOKED
        # The same token re-encoded (padding added to the signature) is still that token.
        assert _validate(world, token + "==").reason == auth_pb2.REVOKED
        # Revoking again is harmless.
        assert world.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token), timeout=10
        ).revoked

    def test_presenting_a_forged_token_revokes_nothing(self, world: World) -> None:
        r = world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token="a.b.c"), timeout=10)
        assert not r.revoked

    def test_revoke_by_jti_needs_an_admin_token(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        jti = str(_payload(token)["jti"])
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(jti=jti), timeout=10)
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        # A genuine token for another audience is not an admin token either.
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(jti=jti),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert _validate(world, token).valid
        r = world.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(jti=jti), metadata=world.admin_md(), timeout=10
        )
        assert r.revoked
        assert _validate(world, token).reason == auth_pb2.REVOKED

    def test_admin_audience_without_admin_scope_is_permission_denied(self, world: World) -> None:
        secret = world.server.create_service("auditor", ["authsvc"], ["authsvc.read"])
        token = world.server.issue("auditor", secret, "authsvc").access_token
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(jti="x"),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    def test_revoke_by_service_spares_tokens_issued_after_the_call(self, world: World) -> None:
        secret = world.server.create_service("batch", ["billing"], [])
        before = world.server.issue("batch", secret, "billing").access_token
        admin = world.admin_md()
        r = world.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id="batch"), metadata=admin, timeout=10
        )
        assert r.revoked
        after = world.server.issue("batch", secret, "billing").access_token
        assert _validate(world, before).reason == auth_pb2.REVOKED
        assert _validate(world, after).valid

    def test_unknown_service_is_not_found(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(service_id="ghost"),
                metadata=world.admin_md(),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.NOT_FOUND

    def test_no_target_is_invalid_argument(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(), timeout=10)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


class TestRotateServiceSecret:
    def test_self_rotation_with_grace_keeps_the_previous_secret_working(self, world: World) -> None:
        old = world.server.create_service("cart", ["billing"], [])
        r = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(
                service_id="cart", current_secret=old, grace_period_seconds=300
            ),
            timeout=10,
        )
        new = r.service_secret
        assert new.startswith("asvcs_") and new != old
        assert r.previous_secret_expires_at.seconds >= int(time.time()) + 290
        assert world.server.issue("cart", new, "billing").access_token
        assert world.server.issue("cart", old, "billing").access_token
        # A second rotation ends the first secret: never more than one previous secret.
        newer = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(
                service_id="cart", current_secret=new, grace_period_seconds=300
            ),
            timeout=10,
        ).service_secret
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("cart", old, "billing")
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert world.server.issue("cart", new, "billing").access_token
        assert world.server.issue("cart", newer, "billing").access_token

    def test_zero_grace_ends_the_previous_secret_now(self, world: World) -> None:
        old = world.server.create_service("search", ["billing"], [])
        new = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id="search", current_secret=old),
            timeout=10,
        ).service_secret
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("search", old, "billing")
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert world.server.issue("search", new, "billing").access_token

    def test_a_previous_secret_in_its_grace_may_log_in_but_never_rotate(self, world: World) -> None:
        s1 = world.server.create_service("wallet", ["billing"], [])
        s2 = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(
                service_id="wallet", current_secret=s1, grace_period_seconds=300
            ),
            timeout=10,
        ).service_secret
        # Whoever holds only the old secret tries to take the service over.
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(
                    service_id="wallet", current_secret=s1, grace_period_seconds=0
                ),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED
        assert "previous secret" in _details(exc) and s1 not in _details(exc)
        # Nothing changed: the owner's secret works, and the old one still logs in.
        assert world.server.issue("wallet", s2, "billing").access_token
        assert world.server.issue("wallet", s1, "billing").access_token
        s3 = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id="wallet", current_secret=s2),
            timeout=10,
        ).service_secret
        assert world.server.issue("wallet", s3, "billing").access_token

    def test_self_rotations_racing_with_one_secret_let_exactly_one_win(self, world: World) -> None:
        s1 = world.server.create_service("ledgerd", ["billing"], [])
        racers = 6
        barrier = threading.Barrier(racers)
        outcomes: list[tuple[grpc.StatusCode, str]] = []

        def rotate() -> None:
            barrier.wait(timeout=30)
            try:
                r = world.server.stub.RotateServiceSecret(
                    auth_pb2.RotateServiceSecretRequest(
                        service_id="ledgerd", current_secret=s1, grace_period_seconds=300
                    ),
                    timeout=30,
                )
                outcomes.append((grpc.StatusCode.OK, r.service_secret))
            except grpc.RpcError as exc:
                outcomes.append((exc.code(), ""))

        threads = [threading.Thread(target=rotate) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        codes = sorted(code.name for code, _ in outcomes)
        assert codes == ["OK"] + ["PERMISSION_DENIED"] * (racers - 1)
        (winner,) = [secret for code, secret in outcomes if code == grpc.StatusCode.OK]
        # The winner's secret is current: it may rotate again.
        assert world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id="ledgerd", current_secret=winner),
            timeout=10,
        ).service_secret

    def test_wrong_current_secret_is_unauthenticated(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(service_id="orders", current_secret="asvcs_x"),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert world.server.issue("orders", world.orders_secret, "billing").access_token

    def test_admin_can_rotate_without_the_current_secret(self, world: World) -> None:
        world.server.create_service("reports", ["billing"], [])
        new = world.server.stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id="reports"),
            metadata=world.admin_md(),
            timeout=10,
        ).service_secret
        assert world.server.issue("reports", new, "billing").access_token

    def test_without_secret_or_admin_is_unauthenticated(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(service_id="orders"), timeout=10
            )
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED

    def test_negative_grace_is_invalid_argument(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(
                    service_id="orders", current_secret=world.orders_secret, grace_period_seconds=-5
                ),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


class TestAdminServices:
    def test_create_list_disable(self, world: World) -> None:
        md = world.admin_md()
        created = world.server.stub.CreateService(
            auth_pb2.CreateServiceRequest(
                service_id="ledger", audiences=["billing"], scopes=["x.y"]
            ),
            metadata=md,
            timeout=10,
        )
        assert created.service_secret.startswith("asvcs_")
        token = world.server.issue("ledger", created.service_secret, "billing").access_token
        listed = world.server.stub.ListServices(
            auth_pb2.ListServicesRequest(), metadata=md, timeout=10
        )
        assert "ledger" in [s.service_id for s in listed.services]
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.CreateService(
                auth_pb2.CreateServiceRequest(service_id="ledger", audiences=["billing"]),
                metadata=md,
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.ALREADY_EXISTS
        world.server.stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id="ledger"), metadata=md, timeout=10
        )
        assert _validate(world, token).reason == auth_pb2.SERVICE_DISABLED
        # Local validators learn of it through the revocation feed: every token it holds ends.
        stream = _watch(world, 0)
        event = next(e for e in stream if e.service_id == "ledger")
        stream.cancel()  # type: ignore[attr-defined]
        assert event.revoked_before.seconds >= int(_payload(token)["iat"]) + 1  # type: ignore[call-overload]
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("ledger", created.service_secret, "billing")
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED

    def test_admin_rpcs_refuse_anonymous_callers(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.ListServices(auth_pb2.ListServicesRequest(), timeout=10)
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.ListServices(
                auth_pb2.ListServicesRequest(),
                metadata=[("authorization", "Basic abc")],
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED

    def test_disable_unknown_service_is_not_found(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.DisableService(
                auth_pb2.DisableServiceRequest(service_id="ghost"),
                metadata=world.admin_md(),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.NOT_FOUND


class TestSigningKeys:
    def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_key(self, world: World) -> None:
        old = world.server.issue("orders", world.orders_secret, "billing")
        md = world.admin_md()
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), timeout=10)
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        r = world.server.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=md, timeout=30
        )
        assert r.key_id and r.key_id != old.key_id
        new = world.server.issue("orders", world.orders_secret, "billing")
        assert new.key_id == r.key_id
        assert _validate(world, old.access_token).valid
        assert _validate(world, new.access_token).valid
        jwks = json.loads(
            world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        )
        kids = {k["kid"] for k in jwks["keys"]}
        assert {old.key_id, r.key_id} <= kids
        keys = world.server.stub.ListSigningKeys(
            auth_pb2.ListSigningKeysRequest(), metadata=md, timeout=10
        )
        states = {k.key_id: k.state for k in keys.keys}
        assert states[r.key_id] == "active" and states[old.key_id] == "retired"
        assert list(states.values()).count("active") == 1

    def test_revoke_previous_stops_old_tokens_at_once(self, world: World) -> None:
        old = world.server.issue("orders", world.orders_secret, "billing")
        r = world.server.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(revoke_previous=True),
            metadata=world.admin_md(),
            timeout=30,
        )
        assert _validate(world, old.access_token).reason == auth_pb2.UNKNOWN_KEY
        jwks = json.loads(
            world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        )
        # Only the fresh key and the new next key are published; every other one is revoked.
        keys = world.server.stub.ListSigningKeys(
            auth_pb2.ListSigningKeysRequest(), metadata=world.admin_md(), timeout=10
        )
        states = {k.key_id: k.state for k in keys.keys}
        published = {k["kid"] for k in jwks["keys"]}
        assert states[r.key_id] == "active" and len(published) == 2
        assert published == {kid for kid, state in states.items() if state in ("active", "next")}
        assert _validate(
            world, world.server.issue("orders", world.orders_secret, "billing").access_token
        ).valid


class TestGetJwks:
    def test_publishes_rsa_public_keys_only(self, world: World) -> None:
        jwks = json.loads(
            world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        )
        assert jwks["keys"]
        for key in jwks["keys"]:
            assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
            assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
            n = base64.urlsafe_b64decode(key["n"] + "==")
            assert len(n) * 8 >= 2048


def _follower_md(world: World) -> list[tuple[str, str]]:
    """A registered service's scopeless token for authsvc itself: what a follower presents."""
    token = world.server.issue("orders", world.orders_secret, "authsvc").access_token
    return [("authorization", f"Bearer {token}")]


def _watch(
    world: World, after: int, metadata: list[tuple[str, str]] | None = None
) -> Iterator[auth_pb2.RevocationEvent]:
    return world.server.stub.WatchRevocations(  # type: ignore[no-any-return]
        auth_pb2.WatchRevocationsRequest(after_cursor=after),
        timeout=30,
        metadata=_follower_md(world) if metadata is None else metadata,
    )


class TestWatchRevocations:
    def test_replays_then_streams_new_revocations(self, world: World) -> None:
        t1 = world.server.issue("orders", world.orders_secret, "billing").access_token
        world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=t1), timeout=10)
        stream = _watch(world, 0)
        seen: list[auth_pb2.RevocationEvent] = []
        for event in stream:
            seen.append(event)
            if event.jti == _payload(t1)["jti"]:
                break
        cursors = [e.cursor for e in seen]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        t2 = world.server.issue("orders", world.orders_secret, "billing").access_token
        world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=t2), timeout=10)
        live = next(stream)
        assert live.jti == _payload(t2)["jti"] and live.cursor > cursors[-1]
        assert live.expires_at.seconds >= int(_payload(t2)["exp"])  # type: ignore[call-overload]
        stream.cancel()
        # Resuming from a cursor sends only what came after it.
        resumed = _watch(world, cursors[-1])
        assert next(resumed).jti == live.jti
        resumed.cancel()

    def test_negative_cursor_is_invalid_argument(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            next(_watch(world, -1))
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT


class TestStandardServices:
    def test_health_reports_serving(self, world: World) -> None:
        stub = health_pb2_grpc.HealthStub(world.server.channel)
        for service in ("", "authsvc.v1.AuthService"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING

    def test_reflection_lists_the_service(self, world: World) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(world.server.channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for s in next(responses).list_services_response.service}
        assert {"authsvc.v1.AuthService", "grpc.health.v1.Health"} <= names

    def test_reflection_v1_lists_the_services(self, world: World) -> None:
        # grpcurl asks for grpc.reflection.v1 first; its messages are v1alpha's on the wire.
        call = world.server.channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = call(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for s in next(responses).list_services_response.service}
        assert {
            "authsvc.v1.AuthService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names

    def test_every_listed_service_resolves(self, world: World) -> None:
        # What `buf curl --list-methods` and `grpcurl describe` do after listing: a service
        # listed but not described made the first fail after printing the methods.
        stub = reflection_pb2_grpc.ServerReflectionStub(world.server.channel)
        listed = next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = sorted(s.name for s in listed.list_services_response.service)
        answers = stub.ServerReflectionInfo(
            iter(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                for name in names
            ),
            timeout=10,
        )
        unresolved = [
            name
            for name, answer in zip(names, answers, strict=True)
            if answer.HasField("error_response")
            or not answer.file_descriptor_response.file_descriptor_proto
        ]
        assert unresolved == []


class TestExpiryAndThrottling:
    """Servers with tight settings so expiry and throttling show within seconds."""

    def test_expired_token_is_expired(self, tmp_path: Path) -> None:
        w, server = make_world(tmp_path, AUTHSVC_LEEWAY_SECONDS="0")
        try:
            token = server.issue("orders", w.orders_secret, "billing", ttl=1).access_token
            time.sleep(2.1)
            assert _validate(w, token).reason == auth_pb2.EXPIRED
        finally:
            server.stop()

    def test_repeated_failures_are_throttled(self, tmp_path: Path) -> None:
        w, server = make_world(tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="3")
        try:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as exc:
                    server.issue("orders", "asvcs_wrong", "billing")
                assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as exc:
                server.issue("orders", w.orders_secret, "billing")
            assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(exc.value.trailing_metadata())  # type: ignore[attr-defined]
            assert int(trailers["retry-after"]) > 0
            # Another service is not affected.
            assert server.issue("billing", w.billing_secret, "orders").access_token
        finally:
            server.stop()


def test_admin_constant_is_the_created_admin(world: World) -> None:
    assert world.server.issue(ADMIN, world.admin_secret, "authsvc").scopes == ["authsvc.admin"]


class TestAudit:
    def test_every_issue_is_one_audit_row_with_the_callers_request_id(self, world: World) -> None:
        from authsvc.storage.engine import make_engine
        from authsvc.storage.repository import Repository

        world.server.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                service_id="orders", service_secret=world.orders_secret, audience="billing"
            ),
            metadata=[("x-request-id", "req-audit-1")],
            timeout=10,
        )
        engine = make_engine(world.server.env["AUTHSVC_DATABASE_URL"])
        try:
            rows = Repository(engine).list_audit_events(limit=20)
        finally:
            engine.dispose()
        mine = [r for r in rows if r.request_id == "req-audit-1"]
        assert [(r.actor, r.action, r.target, r.outcome) for r in mine] == [
            ("orders", "issue_token", "billing", "ok")
        ]
        assert mine[0].peer.startswith("ipv4:127.0.0.1")
