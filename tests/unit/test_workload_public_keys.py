"""authsvc.workload.public_keys: which public keys a service may register, and their ids."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authsvc.errors import InvalidArgument
from authsvc.workload.public_keys import (
    key_from_jwk,
    key_from_public_key,
    parse_jwk_set,
    parse_public_key,
)
from authsvc_client.assertions import AssertionSigner, jwk_thumbprint
from tests.support.workload import (
    jwk_of,
    new_ec,
    new_ed25519,
    new_rsa,
    private_pem,
    public_pem,
)

# RFC 7638 section 3.1 and RFC 8037 appendix A.3: published thumbprints of published keys.
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
    "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lF"
    "d2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
RFC8037_JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return new_rsa()


class TestAccepted:
    def test_rfc7638_example_thumbprint(self) -> None:
        key = key_from_jwk(RFC7638_JWK)
        assert key.key_id == RFC7638_THUMBPRINT
        assert key.jwk_kid == "2011-04-29"
        assert key.algorithms == ("RS256",)  # narrowed by the JWK's alg
        assert key.selected_by("2011-04-29") and key.selected_by(RFC7638_THUMBPRINT)

    def test_rfc8037_example_thumbprint(self) -> None:
        key = key_from_jwk(RFC8037_JWK)
        assert key.key_id == RFC8037_THUMBPRINT
        assert (key.kty, key.algorithms) == ("OKP", ("EdDSA",))

    def test_rsa_pem_and_jwk_give_one_id_with_both_algorithms(
        self, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        from_pem = parse_public_key(public_pem(rsa_key))
        from_jwk = parse_public_key(json.dumps(jwk_of(rsa_key)))
        assert from_pem.key_id == from_jwk.key_id
        assert from_pem.algorithms == ("RS256", "PS256")

    def test_pkcs1_rsa_public_pem(self, rsa_key: rsa.RSAPrivateKey) -> None:
        pem = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
        assert b"BEGIN RSA PUBLIC KEY" in pem
        assert parse_public_key(pem).kty == "RSA"

    def test_ec_p256_and_ed25519(self) -> None:
        ec_key, ed_key = new_ec(), new_ed25519()
        assert parse_public_key(public_pem(ec_key)).algorithms == ("ES256",)
        assert parse_public_key(json.dumps(jwk_of(ed_key))).algorithms == ("EdDSA",)

    def test_stored_jwk_reads_back_as_the_same_key(self, rsa_key: rsa.RSAPrivateKey) -> None:
        for key in (rsa_key, new_ec(), new_ed25519()):
            registered = parse_public_key(public_pem(key))
            again = parse_public_key(registered.to_json())
            assert again.key_id == registered.key_id
            assert again.algorithms == registered.algorithms

    def test_client_kid_is_the_server_key_id(self, rsa_key: rsa.RSAPrivateKey) -> None:
        """The client names its key by the thumbprint the server registered it under."""
        for key in (rsa_key, new_ec(), new_ed25519()):
            signer = AssertionSigner("orders", "https://authsvc.test", key)
            assert signer.key_id == parse_public_key(public_pem(key)).key_id
            assert signer.key_id == jwk_thumbprint(key.public_key())


class TestRefused:
    def test_private_pem_is_refused_without_echoing_it(self, rsa_key: rsa.RSAPrivateKey) -> None:
        pem = private_pem(rsa_key)
        with pytest.raises(InvalidArgument, match="private key") as caught:
            parse_public_key(pem)
        assert "MII" not in str(caught.value) and len(str(caught.value)) < 200

    def test_private_jwk_is_refused_without_echoing_it(self) -> None:
        key = new_ec()
        d = key.private_numbers().private_value.to_bytes(32, "big")
        from tests.support.workload import b64url

        jwk = {**jwk_of(key), "d": b64url(d)}
        with pytest.raises(InvalidArgument, match="private key") as caught:
            parse_public_key(json.dumps(jwk))
        assert b64url(d) not in str(caught.value)

    def test_symmetric_oct_jwk(self) -> None:
        with pytest.raises(InvalidArgument, match="symmetric"):
            key_from_jwk({"kty": "oct", "k": "c2VjcmV0"})

    def test_other_curves(self) -> None:
        for curve in (ec.SECP384R1(), ec.SECP256K1()):
            with pytest.raises(InvalidArgument, match="P-256"):
                parse_public_key(public_pem(new_ec(curve)))
        with pytest.raises(InvalidArgument, match="P-256"):
            key_from_jwk({**jwk_of(new_ec()), "crv": "P-384"})
        with pytest.raises(InvalidArgument, match="Ed25519"):
            key_from_jwk({"kty": "OKP", "crv": "X25519", "x": RFC8037_JWK["x"]})

    def test_small_rsa(self) -> None:
        small = new_rsa(1024)
        with pytest.raises(InvalidArgument, match="2048"):
            parse_public_key(public_pem(small))
        with pytest.raises(InvalidArgument, match="2048"):
            key_from_jwk(jwk_of(small))

    def test_point_not_on_the_curve(self) -> None:
        jwk = jwk_of(new_ec())
        jwk["y"] = jwk["x"]
        with pytest.raises(InvalidArgument, match="P-256"):
            key_from_jwk(jwk)

    def test_use_key_ops_and_alg_that_do_not_fit(self, rsa_key: rsa.RSAPrivateKey) -> None:
        with pytest.raises(InvalidArgument, match="use"):
            key_from_jwk({**jwk_of(rsa_key), "use": "enc"})
        with pytest.raises(InvalidArgument, match="key_ops"):
            key_from_jwk({**jwk_of(rsa_key), "key_ops": ["encrypt"]})
        for alg in ("HS256", "ES256", "none", "RS384"):
            with pytest.raises(InvalidArgument, match="verifies only"):
                key_from_jwk({**jwk_of(rsa_key), "alg": alg})

    def test_not_a_key(self) -> None:
        for text in ("", "hello", "[]", '{"keys": []}', "{not json", "-----BEGIN FOO-----\nx\n"):
            with pytest.raises(InvalidArgument):
                parse_public_key(text)

    def test_a_certificate_is_not_a_public_key(self, tmp_path: object) -> None:
        from tests.support.workload import WorkloadCa

        with pytest.raises(InvalidArgument, match="certificate"):
            parse_public_key(WorkloadCa.create("x").issue(uris=("spiffe://a/b",)))

    def test_unsupported_key_object(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed448

        with pytest.raises(InvalidArgument):
            key_from_public_key(ed448.Ed448PrivateKey.generate().public_key())


class TestJwkSet:
    def test_unusable_keys_are_skipped(self, rsa_key: rsa.RSAPrivateKey) -> None:
        good = jwk_of(rsa_key, kid="k1")
        parsed = parse_jwk_set(
            {"keys": [good, {"kty": "oct", "k": "AA"}, {**jwk_of(new_ec()), "use": "enc"}]}
        )
        assert [k.jwk_kid for k in parsed.keys] == ["k1"]
        assert parsed.skipped == 2

    def test_not_a_set(self) -> None:
        documents: list[object] = [[], {"keys": {}}, {"keys": [1]}, {"kids": []}]
        for document in documents:
            with pytest.raises(ValueError):
                parse_jwk_set(document)
        with pytest.raises(ValueError, match="at most"):
            parse_jwk_set({"keys": [RFC8037_JWK] * 65})


class TestExponent:
    def test_even_or_tiny_exponent(self, rsa_key: rsa.RSAPrivateKey) -> None:
        for e in ("AQ", "Ag", "AQAA"):  # 1, 2, 65536
            with pytest.raises(InvalidArgument, match="exponent"):
                key_from_jwk({**jwk_of(rsa_key), "e": e})


class TestOneThumbprint:
    def test_signing_key_thumbprint_agrees(self, rsa_key: rsa.RSAPrivateKey) -> None:
        """authsvc/keys/jwks.py names signing keys with its own RSA-only copy of RFC 7638;
        until the two are one function, they must agree."""
        from authsvc.keys.jwks import jwk_thumbprint as signing_key_thumbprint

        public = rsa_key.public_key()
        assert signing_key_thumbprint(public) == jwk_thumbprint(public)
        assert signing_key_thumbprint(public) == parse_public_key(public_pem(rsa_key)).key_id
