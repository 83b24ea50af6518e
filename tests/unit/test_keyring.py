"""KeyRing: which JWKs become verification keys, and what is refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from authsvc_client.keyring import KeyRing


@pytest.fixture(scope="module")
def keys() -> tuple[RSAPrivateKey, RSAPrivateKey]:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk(key: RSAPublicKey, kid: str, /, **over: Any) -> dict[str, Any]:
    numbers = key.public_numbers()
    base: dict[str, Any] = {
        "kty": "RSA",
        "use": "sig",
        "alg": "RS256",
        "kid": kid,
        "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64(numbers.e.to_bytes(3, "big")),
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def jwks(*items: dict[str, Any]) -> str:
    return json.dumps({"keys": list(items)})


class TestFromJwksJson:
    def test_rsa_signing_keys_are_kept(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        a, b = keys
        ring = KeyRing.from_jwks_json(jwks(jwk(a.public_key(), "a"), jwk(b.public_key(), "b")))
        assert ring.kids == {"a", "b"} and len(ring) == 2
        found = ring.get("a")
        assert found is not None and found.public_numbers() == a.public_key().public_numbers()
        assert ring.get("missing") is None

    def test_use_and_alg_may_be_absent(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        ring = KeyRing.from_jwks_json(jwks(jwk(keys[0].public_key(), "a", use=None, alg=None)))
        assert ring.kids == {"a"}

    @pytest.mark.parametrize(
        "over",
        [
            {"use": "enc"},
            {"alg": "RS512"},
            {"alg": "PS256"},
            {"alg": "none"},
            {"kty": "EC"},
            {"kty": "oct"},
            {"kid": None},
            {"kid": 5},
            {"kid": ""},
            {"n": None},
            {"e": 65537},
            {"n": "not base64!"},
            {"n": "AQAB="},
        ],
    )
    def test_unusable_keys_are_skipped(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey], over: dict[str, Any]
    ) -> None:
        good = jwk(keys[1].public_key(), "good")
        ring = KeyRing.from_jwks_json(jwks(jwk(keys[0].public_key(), "bad", **over), good))
        assert ring.kids == {"good"}

    def test_keys_under_2048_bits_are_skipped(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        assert len(KeyRing.from_jwks_json(jwks(jwk(small.public_key(), "small")))) == 0

    def test_non_object_members_are_skipped(self) -> None:
        assert len(KeyRing.from_jwks_json(json.dumps({"keys": [1, "x", None, []]}))) == 0

    def test_a_kid_naming_two_keys_is_dropped(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        a, b = keys
        same_a, same_b = jwk(a.public_key(), "same"), jwk(b.public_key(), "same")
        text = jwks(same_a, same_b, jwk(a.public_key(), "x"))
        assert KeyRing.from_jwks_json(text).kids == {"x"}

    def test_the_same_key_twice_is_kept_once(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        a = keys[0].public_key()
        assert KeyRing.from_jwks_json(jwks(jwk(a, "k"), jwk(a, "k"))).kids == {"k"}

    @pytest.mark.parametrize(
        "text", ["", "not json", "[]", "{}", '{"keys": {}}', '{"keys": "x"}', "null", "[" * 5000]
    )
    def test_text_that_is_not_a_jwk_set_raises_value_error(self, text: str) -> None:
        with pytest.raises(ValueError):
            KeyRing.from_jwks_json(text)

    def test_error_message_holds_no_key_material(
        self, keys: tuple[RSAPrivateKey, RSAPrivateKey]
    ) -> None:
        item = jwk(keys[0].public_key(), "a")
        text = json.dumps({"keys": item})  # an object where an array belongs
        with pytest.raises(ValueError) as info:
            KeyRing.from_jwks_json(text)
        assert item["n"] not in str(info.value) and item["n"][:16] not in str(info.value)


class TestKeyRing:
    def test_is_a_snapshot_of_the_mapping(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        source = {"a": keys[0].public_key()}
        ring = KeyRing(source)
        source["b"] = keys[1].public_key()
        assert ring.kids == {"a"} and "b" not in ring

    def test_refuses_keys_that_are_not_rsa(self) -> None:
        ec_key: Any = ec.generate_private_key(ec.SECP256R1()).public_key()
        with pytest.raises(TypeError):
            KeyRing({"e": ec_key})

    def test_refuses_short_rsa_keys(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        with pytest.raises(ValueError):
            KeyRing({"s": small.public_key()})

    def test_repr_lists_kids_only(self, keys: tuple[RSAPrivateKey, RSAPrivateKey]) -> None:
        ring = KeyRing({"a": keys[0].public_key()})
        assert repr(ring) == "KeyRing(kids=['a'])"
