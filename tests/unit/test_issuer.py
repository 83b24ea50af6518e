"""TokenIssuer: what it signs, that the verifier accepts it, and the exp cap at key retirement."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from authsvc.keys.jwks import jwk_thumbprint
from authsvc.tokens.issuer import TokenIssuer
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.verifier import TokenVerifier

NOW = 1_700_000_000.75
ISSUER = "https://authsvc.internal"


@pytest.fixture(scope="module")
def key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def decode(segment: str) -> dict[str, Any]:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


def issue(key: RSAPrivateKey, **over: Any) -> Any:
    options: dict[str, Any] = {
        "private_key": key,
        "kid": jwk_thumbprint(key.public_key()),
        "subject": "svc-a",
        "audience": "svc-b",
        "scopes": ["read", "write"],
        "ttl_seconds": 900,
        "now": NOW,
    }
    options.update(over)
    return TokenIssuer(ISSUER).issue(**options)


class TestIssue:
    def test_issued_token_verifies(self, key: RSAPrivateKey) -> None:
        issued = issue(key)
        kid = jwk_thumbprint(key.public_key())
        verifier = TokenVerifier(
            keys=lambda: KeyRing({kid: key.public_key()}),
            revocations=RevocationSet(),
            issuer=ISSUER,
        )
        result = verifier.verify(issued.token, audience="svc-b", required_scopes=["write"], now=NOW)
        assert result.valid and result.claims == issued.claims

    def test_header_is_exactly_rfc_9068(self, key: RSAPrivateKey) -> None:
        issued = issue(key)
        header_segment = issued.token.split(".")[0]
        raw = base64.urlsafe_b64decode(header_segment + "=" * (-len(header_segment) % 4))
        kid = jwk_thumbprint(key.public_key())
        assert raw == f'{{"alg":"RS256","typ":"at+jwt","kid":"{kid}"}}'.encode()

    def test_claims(self, key: RSAPrivateKey) -> None:
        issued = issue(key)
        body = decode(issued.token.split(".")[1])
        assert body == {
            "iss": ISSUER,
            "sub": "svc-a",
            "aud": "svc-b",
            "exp": int(NOW) + 900,
            "nbf": int(NOW),
            "iat": int(NOW),
            "jti": issued.claims.jti,
            "scope": "read write",
            "client_id": "svc-a",
        }
        assert issued.claims.scopes == ("read", "write")
        assert issued.claims.key_id == jwk_thumbprint(key.public_key())

    def test_jti_has_at_least_128_random_bits(self, key: RSAPrivateKey) -> None:
        jtis = {issue(key).claims.jti for _ in range(20)}
        assert len(jtis) == 20
        for jti in jtis:
            assert len(base64.urlsafe_b64decode(jti + "=" * (-len(jti) % 4))) * 8 >= 128

    def test_no_scopes_is_an_empty_scope_claim(self, key: RSAPrivateKey) -> None:
        issued = issue(key, scopes=[])
        assert decode(issued.token.split(".")[1])["scope"] == ""

    def test_exp_is_capped_at_the_keys_retirement(self, key: RSAPrivateKey) -> None:
        issued = issue(key, ttl_seconds=900, not_after=int(NOW) + 120.5)
        assert issued.claims.expires_at == int(NOW) + 120
        uncapped = issue(key, ttl_seconds=900, not_after=NOW + 5000)
        assert uncapped.claims.expires_at == int(NOW) + 900

    def test_a_key_retiring_now_cannot_issue(self, key: RSAPrivateKey) -> None:
        with pytest.raises(ValueError):
            issue(key, not_after=NOW)

    def test_repr_never_shows_the_token(self, key: RSAPrivateKey) -> None:
        issued = issue(key)
        assert issued.token not in repr(issued)
        assert issued.token.split(".")[2][:20] not in repr(issued)
        assert issued.claims.jti in repr(issued)

    @pytest.mark.parametrize(
        "over",
        [
            {"subject": ""},
            {"audience": ""},
            {"kid": ""},
            {"scopes": ["read", ""]},
            {"scopes": ["read write"]},
            # Refused before signing, not only by the self-verification after it.
            {"scopes": ['q"']},
            {"scopes": ["tab\t"]},
            {"ttl_seconds": 0},
            {"scopes": ["x" * 200] * 50},
        ],
    )
    def test_bad_requests_are_refused(self, key: RSAPrivateKey, over: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            issue(key, **over)

    def test_short_keys_are_refused(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        with pytest.raises(ValueError):
            issue(small)

    def test_a_token_the_fleet_would_reject_is_never_handed_out(self, key: RSAPrivateKey) -> None:
        # Past 9999-12-31 a NumericDate no longer fits a protobuf Timestamp, so the verifier
        # calls it MALFORMED; self-verification catches that before the token leaves.
        with pytest.raises(RuntimeError, match="issued token failed self-verification"):
            issue(key, now=253_402_300_800.0)


class TestPrepareThenSign:
    def test_prepare_then_sign_is_issue(self, key: RSAPrivateKey) -> None:
        issuer = TokenIssuer(ISSUER)
        unsigned = issuer.prepare(
            key_bits=key.key_size,
            kid="k1",
            subject="svc-a",
            audience="svc-b",
            scopes=["read"],
            ttl_seconds=60,
            now=NOW,
        )
        issued = issuer.sign(unsigned, key)
        assert issued.claims == unsigned.claims and issued.token.startswith(unsigned.signing_input)
        assert unsigned.signing_input not in repr(unsigned)

    def test_each_key_is_self_verified_with_its_own_public_half(self, key: RSAPrivateKey) -> None:
        """The self-verifiers are kept per kid; another key under the same kid must get its own."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer = TokenIssuer(ISSUER)
        for signing_key in (key, other, key):
            unsigned = issuer.prepare(
                key_bits=2048,
                kid="same-kid",
                subject="svc-a",
                audience="svc-b",
                scopes=[],
                ttl_seconds=60,
                now=NOW,
            )
            assert issuer.sign(unsigned, signing_key).claims == unsigned.claims

    def test_a_key_of_another_size_than_prepared_for_is_refused(self, key: RSAPrivateKey) -> None:
        issuer = TokenIssuer(ISSUER)
        unsigned = issuer.prepare(
            key_bits=3072, kid="k", subject="s", audience="a", scopes=[], ttl_seconds=60, now=NOW
        )
        with pytest.raises(ValueError, match="another size"):
            issuer.sign(unsigned, key)


class TestCertificateBinding:
    """RFC 8705 section 3: a thumbprint given to prepare() becomes `cnf.x5t#S256`."""

    THUMBPRINT = base64.urlsafe_b64encode(hashlib.sha256(b"a client certificate").digest())
    THUMBPRINT_TEXT = THUMBPRINT.rstrip(b"=").decode("ascii")

    def verifier(self, key: RSAPrivateKey) -> TokenVerifier:
        kid = jwk_thumbprint(key.public_key())
        return TokenVerifier(
            keys=lambda: KeyRing({kid: key.public_key()}),
            revocations=RevocationSet(),
            issuer=ISSUER,
        )

    def test_a_bound_token_carries_cnf_and_verifies_only_with_its_thumbprint(
        self, key: RSAPrivateKey
    ) -> None:
        issued = issue(key, cert_thumbprint=self.THUMBPRINT_TEXT)
        body = decode(issued.token.split(".")[1])
        assert body["cnf"] == {"x5t#S256": self.THUMBPRINT_TEXT}
        assert issued.claims.cert_thumbprint == self.THUMBPRINT_TEXT
        verifier = self.verifier(key)
        bound = verifier.verify(
            issued.token, audience="svc-b", now=NOW, client_cert_thumbprint=self.THUMBPRINT_TEXT
        )
        assert bound.valid and bound.claims == issued.claims
        assert verifier.verify(issued.token, audience="svc-b", now=NOW).reason_name == (
            "CERTIFICATE_MISMATCH"
        )

    def test_no_thumbprint_issues_an_unbound_token(self, key: RSAPrivateKey) -> None:
        issued = issue(key)
        assert "cnf" not in decode(issued.token.split(".")[1])
        assert issued.claims.cert_thumbprint == ""

    @pytest.mark.parametrize(
        "thumbprint",
        [
            "not a thumbprint",
            THUMBPRINT.decode("ascii"),  # padded
            THUMBPRINT_TEXT[:-1],  # 31 bytes and a bit
            base64.urlsafe_b64encode(hashlib.sha1(b"x").digest()).decode().rstrip("="),
        ],
    )
    def test_a_thumbprint_that_is_no_sha256_is_refused(
        self, key: RSAPrivateKey, thumbprint: str
    ) -> None:
        with pytest.raises(ValueError, match="x5t#S256"):
            issue(key, cert_thumbprint=thumbprint)
