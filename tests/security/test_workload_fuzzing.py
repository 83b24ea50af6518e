"""Promise: no input makes a workload-credential check fail with anything but its typed error
(WorkloadAuthError for logins, InvalidArgument for registration), and nothing unsigned or
re-signed by another key is ever accepted. Property tests with a bounded budget."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authsvc.errors import InvalidArgument
from authsvc.workload.assertions import verify_assertion
from authsvc.workload.certificates import check_tls_san, peer_identity
from authsvc.workload.errors import WorkloadAuthError
from authsvc.workload.federation import FederationVerifier, StaticKeys, TrustedIssuer
from authsvc.workload.public_keys import key_from_jwk, parse_public_key
from tests.support.workload import b64url, jwk_of, new_ec, new_rsa, public_pem, raw_signed

BUDGET = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ISSUER = "https://authsvc.example"
NOW = 1_900_000_000
OWN = new_ec()
ATTACKER = new_rsa()
KEYS = [parse_public_key(public_pem(OWN)), parse_public_key(public_pem(new_rsa()))]
CLUSTER = "https://cluster.example"
FEDERATION = FederationVerifier(
    [TrustedIssuer("c", CLUSTER, "authsvc", StaticKeys((key_from_jwk(jwk_of(OWN, kid="k")),)))]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
claim_sets = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from(["orders", CLUSTER]) | json_values,
        "sub": st.sampled_from(["orders"]) | json_values,
        "aud": st.sampled_from([ISSUER, [ISSUER], "authsvc", ["authsvc"]]) | json_values,
        "exp": st.integers(NOW - 600, NOW + 900) | json_values,
        "iat": st.integers(NOW - 600, NOW + 900) | json_values,
        "nbf": st.integers(NOW - 600, NOW + 900) | json_values,
        "jti": st.text(max_size=300) | json_values,
    },
)
headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["none", "HS256", "RS256", "ES256", "EdDSA", "PS256"]) | json_values},
    optional={"kid": st.sampled_from([KEYS[0].key_id, "k"]) | json_values, "typ": json_values},
)


def segment(value: Any) -> str:
    return b64url(json.dumps(value, allow_nan=True).encode())


def only_typed_refusals(token: str) -> None:
    for check in (
        lambda: verify_assertion(token, service_id="orders", keys=KEYS, issuer=ISSUER, now=NOW),
        lambda: FEDERATION.verify(token, now=NOW),
    ):
        try:
            check()
        except WorkloadAuthError:
            pass


class TestNoUnexpectedFailure:
    @BUDGET
    @given(st.text(max_size=300))
    def test_any_text(self, token: str) -> None:
        only_typed_refusals(token)

    @BUDGET
    @given(headers, claim_sets, st.binary(max_size=80))
    def test_any_header_and_claims_with_junk_signature(
        self, header: dict[str, Any], claims: dict[str, Any], signature: bytes
    ) -> None:
        only_typed_refusals(f"{segment(header)}.{segment(claims)}.{b64url(signature)}")

    @BUDGET
    @given(claim_sets)
    def test_never_accepted_when_signed_by_another_key(self, claims: dict[str, Any]) -> None:
        token = raw_signed(claims, ATTACKER, kid=KEYS[1].key_id)
        for check in (
            lambda: verify_assertion(token, service_id="orders", keys=KEYS, issuer=ISSUER, now=NOW),
            lambda: FEDERATION.verify(token, now=NOW),
        ):
            try:
                check()
            except WorkloadAuthError:
                continue
            raise AssertionError("a token signed by an unregistered key was accepted")

    @BUDGET
    @given(claim_sets)
    def test_own_key_signatures_accepted_only_within_the_rules(
        self, claims: dict[str, Any]
    ) -> None:
        token = raw_signed(claims, OWN, kid=KEYS[0].key_id)
        only_typed_refusals(token)
        try:
            verified = verify_assertion(
                token, service_id="orders", keys=KEYS, issuer=ISSUER, now=NOW
            )
        except WorkloadAuthError:
            return
        assert claims["iss"] == claims["sub"] == "orders"
        assert claims["aud"] == ISSUER and isinstance(claims["aud"], str)
        assert isinstance(claims["jti"], str) and 0 < len(claims["jti"]) <= 256
        exp, iat = claims["exp"], claims["iat"]
        assert not isinstance(exp, bool) and NOW - 30 < exp <= NOW + 330
        assert not isinstance(iat, bool) and iat <= NOW + 30
        assert verified.jti == claims["jti"]


class TestRegistrationInputs:
    @BUDGET
    @given(
        st.dictionaries(
            st.sampled_from(
                ["kty", "crv", "x", "y", "n", "e", "d", "alg", "use", "key_ops", "kid", "k"]
            ),
            json_values | st.sampled_from(["RSA", "EC", "OKP", "oct", "P-256", "Ed25519", "AQAB"]),
            max_size=8,
        )
    )
    def test_any_jwk(self, jwk: dict[str, Any]) -> None:
        try:
            key_from_jwk(jwk)
        except InvalidArgument:
            pass

    @BUDGET
    @given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
    def test_any_key_file(self, data: bytes) -> None:
        try:
            parse_public_key(data)
        except InvalidArgument:
            pass

    @BUDGET
    @given(st.text(max_size=200))
    def test_any_san(self, value: str) -> None:
        try:
            check_tls_san(value)
        except InvalidArgument:
            pass

    @BUDGET
    @given(st.binary(max_size=600))
    def test_any_certificate_bytes(self, data: bytes) -> None:
        try:
            peer_identity(
                b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n"
            )
        except WorkloadAuthError:
            pass
