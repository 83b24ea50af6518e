"""Promise: every RFC 9068 claim must be present with its exact JSON type; issuer and audience
match exactly; times honour only the documented leeway; scopes follow RFC 6749 grammar; a
disabled subject's tokens stop. Attack tokens are signed with authsvc's own key, so the claim
under test is the only thing wrong with them."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from tests.security.forge import DROP, Target, header, rpc_code, sign
from tests.support.server import TEST_ISSUER

pytestmark = pytest.mark.usefixtures("after_each_batch")

LEEWAY = 30  # AUTHSVC_LEEWAY_SECONDS default, documented in SECURITY.md and config
MARGIN = 8  # slack for the real clocks of the test and the server process
REQUIRED = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "client_id"]

WRONG_TYPES: list[tuple[str, Any]] = [
    ("exp", "9999999999"),
    ("exp", 9999999999.0),
    ("exp", True),
    ("exp", None),
    ("exp", [9999999999]),
    ("exp", -1),
    ("exp", 2**63),
    ("nbf", "0"),
    ("nbf", 0.5),
    ("nbf", False),
    ("iat", "0"),
    ("iat", {"$date": 0}),
    ("iat", None),
    ("aud", ["billing"]),
    ("aud", ["billing", "orders"]),
    ("aud", {"billing": True}),
    ("aud", None),
    ("aud", 1),
    ("iss", None),
    ("iss", [TEST_ISSUER]),
    ("iss", 1),
    ("sub", ""),
    ("sub", None),
    ("sub", ["orders"]),
    ("sub", 7),
    ("jti", ""),
    ("jti", 12345),
    ("jti", None),
    ("jti", ["a"]),
    ("scope", ["billing.read"]),
    ("scope", None),
    ("scope", 1),
    ("scope", {"billing.read": True}),
    ("client_id", "billing"),
    ("client_id", None),
    ("client_id", ["orders"]),
]


class TestRequiredClaims:
    @pytest.mark.parametrize("missing", REQUIRED)
    def test_missing_claim_is_malformed(self, target: Target, missing: str) -> None:
        assert target.reason(target.forge(**{missing: DROP})) == "MALFORMED"

    @pytest.mark.parametrize(("claim", "value"), WRONG_TYPES)
    def test_wrong_json_type_or_shape_is_malformed(
        self, target: Target, claim: str, value: Any
    ) -> None:
        assert target.reason(target.forge(**{claim: value})) == "MALFORMED"

    def test_the_control_token_with_every_claim_is_valid(self, target: Target) -> None:
        assert target.validate(target.forge()).valid

    @pytest.mark.parametrize("typ", ["JWT", "jwt", "at+JWT ", "application/jwt", "at jwt", ""])
    def test_typ_other_than_at_jwt_is_malformed(self, target: Target, typ: str) -> None:
        key = target.active_key()
        token = target.forge(header(key.kid, typ=typ))
        assert target.reason(token) == "MALFORMED"

    def test_missing_typ_is_malformed(self, target: Target) -> None:
        assert target.reason(target.forge(header(target.active_key().kid, typ=DROP))) == (
            "MALFORMED"
        )

    @pytest.mark.parametrize("typ", ["application/at+jwt", "AT+JWT", "Application/At+Jwt"])
    def test_rfc_9068_typ_spellings_are_accepted(self, target: Target, typ: str) -> None:
        assert target.validate(target.forge(header(target.active_key().kid, typ=typ))).valid


class TestTimeBoundaries:
    """The server's leeway is 30 s; the test keeps MARGIN seconds away from each edge."""

    def test_expired_beyond_the_leeway_is_expired(self, target: Target) -> None:
        now = int(time.time())
        token = target.forge(exp=now - LEEWAY - MARGIN, iat=now - 600, nbf=now - 600)
        assert target.reason(token) == "EXPIRED"

    def test_expired_within_the_leeway_is_still_valid(self, target: Target) -> None:
        now = int(time.time())
        token = target.forge(exp=now - LEEWAY + MARGIN, iat=now - 600, nbf=now - 600)
        assert target.validate(token).valid

    def test_not_before_beyond_the_leeway_is_not_yet_valid(self, target: Target) -> None:
        now = int(time.time())
        assert target.reason(target.forge(nbf=now + LEEWAY + MARGIN)) == "NOT_YET_VALID"

    def test_not_before_within_the_leeway_is_valid(self, target: Target) -> None:
        now = int(time.time())
        assert target.validate(target.forge(nbf=now + LEEWAY - MARGIN)).valid

    def test_issued_in_the_future_beyond_the_leeway_is_not_yet_valid(self, target: Target) -> None:
        now = int(time.time())
        assert target.reason(target.forge(iat=now + LEEWAY + MARGIN)) == "NOT_YET_VALID"

    def test_issued_in_the_future_within_the_leeway_is_valid(self, target: Target) -> None:
        now = int(time.time())
        assert target.validate(target.forge(iat=now + LEEWAY - MARGIN)).valid

    @pytest.mark.parametrize("exp", [0, 1])
    def test_epoch_expiry_is_expired(self, target: Target, exp: int) -> None:
        assert target.reason(target.forge(exp=exp, iat=0, nbf=0)) == "EXPIRED"

    def test_far_future_expiry_beyond_a_timestamp_is_malformed(self, target: Target) -> None:
        assert target.reason(target.forge(exp=253_402_300_800)) == "MALFORMED"

    def test_an_issued_token_lives_no_longer_than_the_server_maximum(self, target: Target) -> None:
        response = target.world.server.issue(
            "orders", target.world.orders_secret, "billing", ttl=10**9
        )
        assert response.expires_in <= 3600


class TestExactIssuer:
    @pytest.mark.parametrize(
        "issuer",
        [
            TEST_ISSUER + "/",
            TEST_ISSUER.upper(),
            TEST_ISSUER.replace("https://", "http://"),
            TEST_ISSUER + " ",
            " " + TEST_ISSUER,
            TEST_ISSUER + "\u0000",
            TEST_ISSUER + ".evil.example",
            TEST_ISSUER[:-1],
            TEST_ISSUER + "#",
            TEST_ISSUER.replace("authsvc", "authsvc\u200b"),
            "",
        ],
    )
    def test_issuer_must_match_exactly(self, target: Target, issuer: str) -> None:
        assert target.reason(target.forge(iss=issuer)) == "WRONG_ISSUER"


class TestExactAudience:
    @pytest.mark.parametrize(
        "audience",
        [
            "Billing",
            "billing ",
            " billing",
            "billing.evil",
            "bill",
            "billing\u0000",
            "*",
            "",
            "authsvc",
        ],
    )
    def test_token_audience_must_match_exactly(self, target: Target, audience: str) -> None:
        assert target.reason(target.forge(aud=audience)) == "WRONG_AUDIENCE"

    @pytest.mark.parametrize("validator", ["orders", "Billing", "billing ", "inventory", "authsvc"])
    def test_genuine_token_for_billing_is_refused_by_every_other_audience(
        self, target: Target, validator: str
    ) -> None:
        assert target.reason(target.genuine(), audience=validator) == "WRONG_AUDIENCE"

    def test_token_for_billing_cannot_act_as_an_admin_token(self, target: Target) -> None:
        md = [("authorization", f"Bearer {target.genuine()}")]
        with pytest.raises(grpc.RpcError) as excinfo:
            target.world.server.stub.ListServices(
                auth_pb2.ListServicesRequest(), metadata=md, timeout=10
            )
        assert rpc_code(excinfo.value) == grpc.StatusCode.UNAUTHENTICATED


class TestScopeGrammar:
    @pytest.mark.parametrize(
        "scope",
        [
            "billing.read  billing.write",
            " billing.read",
            "billing.read ",
            " ",
            "billing.read\tbilling.write",
            "billing.read\nbilling.write",
            "billing.read\u0000",
            "billing.r\u00e9ad",
            'billing."read"',
            "billing\\read",
            "billing.read\u00a0billing.write",
        ],
    )
    def test_scope_outside_the_rfc_6749_grammar_is_malformed(
        self, target: Target, scope: str
    ) -> None:
        assert target.reason(target.forge(scope=scope), scopes=["billing.read"]) == "MALFORMED"

    @pytest.mark.parametrize(
        "required", ["billing", "billing.rea", "BILLING.READ", "billing.read.all", "billing.*"]
    )
    def test_scopes_match_whole_names_exactly(self, target: Target, required: str) -> None:
        token = target.genuine(scopes=["billing.read"])
        assert target.reason(token, scopes=[required]) == "INSUFFICIENT_SCOPE"

    def test_every_required_scope_must_be_granted(self, target: Target) -> None:
        token = target.genuine(scopes=["billing.read"])
        assert target.validate(token, scopes=["billing.read"]).valid
        assert target.reason(token, scopes=["billing.read", "billing.write"]) == (
            "INSUFFICIENT_SCOPE"
        )

    def test_empty_scope_grants_nothing(self, target: Target) -> None:
        token = target.forge(scope="")
        assert target.validate(token).valid
        assert target.reason(token, scopes=["billing.read"]) == "INSUFFICIENT_SCOPE"

    @pytest.mark.parametrize("required", ["billing.read billing.write", "", "a\tb", "é"])
    def test_required_scopes_outside_the_grammar_are_invalid_argument(
        self, target: Target, required: str
    ) -> None:
        with pytest.raises(grpc.RpcError) as excinfo:
            target.validate(target.genuine(), scopes=[required])
        assert rpc_code(excinfo.value) == grpc.StatusCode.INVALID_ARGUMENT

    def test_scope_not_allowed_for_the_service_is_never_issued(self, target: Target) -> None:
        with pytest.raises(grpc.RpcError) as excinfo:
            target.world.server.issue(
                "orders", target.world.orders_secret, "billing", ["authsvc.admin"]
            )
        assert rpc_code(excinfo.value) == grpc.StatusCode.PERMISSION_DENIED


class TestDisabledSubject:
    def test_disabling_a_service_stops_its_tokens_and_its_logins(self, target: Target) -> None:
        w = target.world
        stub = w.server.stub
        created = stub.CreateService(
            auth_pb2.CreateServiceRequest(
                service_id="ledger", audiences=["billing"], scopes=["billing.read"]
            ),
            metadata=w.admin_md(),
            timeout=10,
        )
        token = w.server.issue("ledger", created.service_secret, "billing").access_token
        assert target.validate(token).valid
        stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id="ledger"), metadata=w.admin_md(), timeout=10
        )
        assert target.reason(token) == "SERVICE_DISABLED"
        # A token for the disabled subject minted after the cutoff (as a stolen signing path
        # would) is refused too: the subject check does not depend on the revocation.
        later = int(time.time()) + 5
        key = target.active_key()
        forged = sign(
            key.private,
            header(key.kid),
            {
                "iss": TEST_ISSUER,
                "sub": "ledger",
                "aud": "billing",
                "exp": later + 600,
                "nbf": later - 5,
                "iat": later,
                "jti": "after-disable",
                "scope": "billing.read",
                "client_id": "ledger",
            },
        )
        assert target.reason(forged) == "SERVICE_DISABLED"
        with pytest.raises(grpc.RpcError) as excinfo:
            w.server.issue("ledger", created.service_secret, "billing")
        assert rpc_code(excinfo.value) == grpc.StatusCode.UNAUTHENTICATED
