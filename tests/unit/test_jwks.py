"""JWK rendering (RFC 7517/7518) and thumbprints (RFC 7638), read back by the client KeyRing."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicNumbers

from authsvc.keys.jwks import jwk_thumbprint, public_jwk, render_jwks
from authsvc_client.keyring import KeyRing

# RFC 7638 section 3.1: the example key and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
    "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def keys() -> tuple[RSAPrivateKey, RSAPrivateKey]:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=3072),
    )


class TestThumbprint:
    def test_rfc_7638_test_vector(self) -> None:
        n = int.from_bytes(b64decode(RFC7638_N), "big")
        key = RSAPublicNumbers(65537, n).public_key()
        assert jwk_thumbprint(key) == RFC7638_THUMBPRINT

    def test_rfc_key_renders_to_the_rfc_members(self) -> None:
        n = int.from_bytes(b64decode(RFC7638_N), "big")
        jwk = public_jwk(RSAPublicNumbers(65537, n).public_key(), "2011-04-29")
        assert jwk["n"] == RFC7638_N and jwk["e"] == "AQAB"

    def test_distinct_keys_distinct_thumbprints(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        a, b = (jwk_thumbprint(k.public_key()) for k in keys)
        assert a != b and len(a) == 43 and "=" not in a


class TestPublicJwk:
    def test_members(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        key = keys[0].public_key()
        jwk = public_jwk(key, "kid-1")
        assert set(jwk) == {"kty", "use", "alg", "kid", "n", "e"}
        assert (jwk["kty"], jwk["use"], jwk["alg"], jwk["kid"]) == ("RSA", "sig", "RS256", "kid-1")
        assert int.from_bytes(b64decode(jwk["n"]), "big") == key.public_numbers().n
        assert jwk["e"] == "AQAB"

    def test_base64url_unpadded_and_minimal(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        for private in keys:
            jwk = public_jwk(private.public_key(), "k")
            raw_n = b64decode(jwk["n"])
            assert "=" not in jwk["n"] and "+" not in jwk["n"] and "/" not in jwk["n"]
            assert raw_n[0] != 0 and len(raw_n) * 8 == private.key_size

    def test_holds_no_private_member(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        jwk = public_jwk(keys[0].public_key(), "k")
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


class TestRenderJwks:
    def test_compact_json(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        jwk = public_jwk(keys[0].public_key(), "a")
        text = render_jwks([jwk])
        assert text == json.dumps({"keys": [jwk]}, separators=(",", ":"))
        assert render_jwks([]) == '{"keys":[]}'

    def test_round_trip_through_the_client_keyring(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        a, b = (k.public_key() for k in keys)
        kid_a, kid_b = jwk_thumbprint(a), jwk_thumbprint(b)
        ring = KeyRing.from_jwks_json(render_jwks([public_jwk(a, kid_a), public_jwk(b, kid_b)]))
        assert ring.kids == {kid_a, kid_b}
        found_a, found_b = ring.get(kid_a), ring.get(kid_b)
        assert found_a is not None and found_a.public_numbers() == a.public_numbers()
        assert found_b is not None and found_b.public_numbers() == b.public_numbers()
