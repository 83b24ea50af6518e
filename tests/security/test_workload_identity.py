"""Attacks on signed assertions (RFC 7523 private_key_jwt), one class per published attack.

Every refusal is a WorkloadAuthError whose text is the generic credentials message: the caller
(the servicer) answers UNAUTHENTICATED exactly as for a wrong secret.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from authsvc.workload.assertions import verify_assertion
from authsvc.workload.errors import GENERIC_MESSAGE, Reason, WorkloadAuthError
from authsvc.workload.public_keys import RegisteredKey, parse_public_key
from authsvc_client.assertions import AssertionSigner
from tests.support.workload import (
    hmac_forged,
    jwk_of,
    new_ec,
    new_ed25519,
    new_rsa,
    public_pem,
    segment,
    sign,
    unsigned,
)

ISSUER = "https://authsvc.example"
NOW = 1_900_000_000
ORDERS_RSA = new_rsa()
ORDERS_EC = new_ec()
BILLING_KEY = new_ec()
ATTACKER = new_rsa()
ORDERS_KEYS = [parse_public_key(public_pem(ORDERS_RSA)), parse_public_key(public_pem(ORDERS_EC))]
BILLING_KEYS = [parse_public_key(public_pem(BILLING_KEY))]


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "orders",
        "sub": "orders",
        "aud": ISSUER,
        "iat": NOW,
        "exp": NOW + 60,
        "jti": "a1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def refused(token: str, keys: list[RegisteredKey] = ORDERS_KEYS, service: str = "orders") -> Reason:
    with pytest.raises(WorkloadAuthError) as caught:
        verify_assertion(token, service_id=service, keys=keys, issuer=ISSUER, now=NOW)
    assert str(caught.value) == GENERIC_MESSAGE
    assert token not in repr(caught.value) and "orders" not in str(caught.value)
    return caught.value.reason


def accepted(token: str) -> None:
    verify_assertion(token, service_id="orders", keys=ORDERS_KEYS, issuer=ISSUER, now=NOW)


class TestAudienceInjection:
    """rfc7523bis (2025): `aud` is the issuer as one string, nothing else."""

    def test_the_issuer_alone_is_accepted(self) -> None:
        accepted(sign(claims(), ORDERS_RSA, "RS256"))

    @pytest.mark.parametrize(
        "aud",
        [
            [ISSUER],
            [ISSUER, "https://other-as.example"],
            ISSUER + "/token",
            ISSUER + "/authsvc.v1.AuthService/IssueToken",
            ISSUER + "/",
            "https://other-as.example",
            "",
        ],
    )
    def test_anything_else_is_refused(self, aud: Any) -> None:
        assert refused(sign(claims(aud=aud), ORDERS_RSA, "RS256")) == Reason.WRONG_AUDIENCE

    def test_missing_audience(self) -> None:
        assert refused(sign(claims(aud=None), ORDERS_RSA, "RS256")) == Reason.WRONG_AUDIENCE


class TestAlgNone:
    @pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
    def test_unsigned(self, alg: str) -> None:
        token = f"{segment({'alg': alg})}.{segment(claims())}."
        assert refused(token) == Reason.MALFORMED
        with_junk_signature = token + "c2lnbmF0dXJl"
        assert refused(with_junk_signature) == Reason.ALGORITHM_NOT_ALLOWED

    def test_unsigned_naming_a_registered_kid(self) -> None:
        token = unsigned(claims(), kid=ORDERS_KEYS[0].key_id) + "AA"
        assert refused(token) == Reason.ALGORITHM_NOT_ALLOWED


class TestHmacWithThePublicKey:
    """The verifier's public key is public: as an HMAC secret it lets anyone sign."""

    @pytest.mark.parametrize("key", [ORDERS_RSA, ORDERS_EC], ids=["rsa", "ec"])
    def test_hs256_keyed_with_the_registered_key(self, key: Any) -> None:
        registered = parse_public_key(public_pem(key))
        for secret in (
            public_pem(key),
            registered.to_json().encode(),
            json.dumps(jwk_of(key)).encode(),
        ):
            forged = hmac_forged(claims(), secret, kid=registered.key_id)
            assert refused(forged) == Reason.ALGORITHM_NOT_ALLOWED


class TestKeyTypeConfusion:
    def test_rs256_header_on_an_ec_key(self) -> None:
        ec_only = [ORDERS_KEYS[1]]
        token = sign(claims(), ATTACKER, "RS256", kid=ec_only[0].key_id)
        assert refused(token, ec_only) == Reason.ALGORITHM_NOT_ALLOWED

    def test_es256_and_eddsa_headers_on_an_rsa_key(self) -> None:
        rsa_only = [ORDERS_KEYS[0]]
        assert refused(sign(claims(), new_ec(), "ES256"), rsa_only) == Reason.ALGORITHM_NOT_ALLOWED
        assert (
            refused(sign(claims(), new_ed25519(), "EdDSA"), rsa_only)
            == Reason.ALGORITHM_NOT_ALLOWED
        )

    def test_algorithms_outside_the_pinned_set(self) -> None:
        for alg in ("RS384", "RS512", "ES384", "PS512"):
            token = f"{segment({'alg': alg})}.{segment(claims())}.c2ln"
            assert refused(token) == Reason.ALGORITHM_NOT_ALLOWED


class TestKeyOfAnotherService:
    def test_billing_signs_as_orders(self) -> None:
        """billing's registered key is valid, but not orders': only orders' keys are tried."""
        signer = AssertionSigner("orders", ISSUER, BILLING_KEY)
        assert refused(signer.sign_at(NOW)) == Reason.BAD_SIGNATURE  # kid names billing's key
        assert refused(sign(claims(), BILLING_KEY, "ES256")) == Reason.BAD_SIGNATURE

    def test_billing_assertion_for_an_orders_login(self) -> None:
        own = AssertionSigner("billing", ISSUER, BILLING_KEY).sign_at(NOW)
        # verified with billing's keys it is billing's, never orders'
        assert refused(own, BILLING_KEYS, service="orders") == Reason.WRONG_ISSUER

    def test_embedded_key_headers_are_never_used(self) -> None:
        attacker_jwk = jwk_of(ATTACKER)
        for header in (
            {"jwk": attacker_jwk},
            {"jku": "https://attacker.example/jwks"},
            {"x5u": "https://attacker.example/cert"},
        ):
            assert refused(sign(claims(), ATTACKER, "RS256", **header)) == Reason.BAD_SIGNATURE


class TestLifetime:
    def test_expired(self) -> None:
        token = sign(claims(iat=NOW - 600, exp=NOW - 300), ORDERS_RSA, "RS256")
        assert refused(token) == Reason.EXPIRED

    def test_far_future_exp(self) -> None:
        for exp in (NOW + 3600, NOW + 365 * 86400, 2**53):
            assert refused(sign(claims(exp=exp), ORDERS_RSA, "RS256")) == Reason.LIFETIME_TOO_LONG

    def test_missing_jti_exp_iat(self) -> None:
        for missing in ("jti", "exp", "iat"):
            token = sign(claims(**{missing: None}), ORDERS_RSA, "RS256")
            assert refused(token) == Reason.MISSING_CLAIM, missing


class TestReplayContract:
    def test_replay_is_settled_by_the_caller_from_jti(self) -> None:
        """The verifier is pure: the same assertion verifies twice with the same jti and the
        same deadline, which the use case records once in the database (single use)."""
        token = AssertionSigner("orders", ISSUER, ORDERS_EC).sign_at(NOW)
        first = verify_assertion(
            token, service_id="orders", keys=ORDERS_KEYS, issuer=ISSUER, now=NOW
        )
        again = verify_assertion(
            token, service_id="orders", keys=ORDERS_KEYS, issuer=ISSUER, now=NOW + 5
        )
        assert (first.jti, first.remember_jti_until) == (again.jti, again.remember_jti_until)
        assert first.remember_jti_until >= NOW + 60 + 30
