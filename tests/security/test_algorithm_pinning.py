"""Promise: validation pins RS256; `none`, HMAC keyed with the public key, algorithm swaps,
psychic signatures and malformed PKCS#1 padding never validate (RFC 8725 sections 2.1-3.2)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from authsvc_client.v1 import auth_pb2
from tests.security.forge import (
    OwnKey,
    Target,
    b64url,
    claims,
    header,
    segment,
    sign,
    unb64url,
)

pytestmark = pytest.mark.usefixtures("after_each_batch")

HMAC_HASHES: dict[str, Callable[[], object]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
}
# DER DigestInfo prefixes (RFC 8017 section 9.2 note 1).
SHA256_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
SHA1_INFO = bytes.fromhex("3021300906052b0e03021a05000414")


def published_key(target: Target) -> tuple[str, str, RSAPublicKey]:
    """What any attacker holds: the JWK Set text and the active key rebuilt from it."""
    jwks_json = target.world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
    kid = target.active_key().kid
    jwk = next(k for k in json.loads(jwks_json)["keys"] if k["kid"] == kid)
    numbers = RSAPublicNumbers(
        int.from_bytes(unb64url(jwk["e"]), "big"), int.from_bytes(unb64url(jwk["n"]), "big")
    )
    return kid, jwks_json, numbers.public_key()


def public_key_encodings(target: Target) -> dict[str, bytes]:
    kid, jwks_json, public = published_key(target)
    spki_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pkcs1_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    jwk = next(k for k in json.loads(jwks_json)["keys"] if k["kid"] == kid)
    return {
        "spki-pem": spki_pem,
        "spki-pem-no-newline": spki_pem.rstrip(b"\n"),
        "pkcs1-pem": pkcs1_pem,
        "pkcs1-pem-no-newline": pkcs1_pem.rstrip(b"\n"),
        "spki-der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pkcs1-der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        ),
        "jwks-json-as-served": jwks_json.encode(),
        "jwk-json-compact": json.dumps(jwk, separators=(",", ":")).encode(),
        "jwk-json-spaced": json.dumps(jwk).encode(),
        "ssh-rsa": ssh,
        "ssh-rsa-newline": ssh + b"\n",
        "modulus-bytes": unb64url(jwk["n"]),
    }


def hmac_token(kid: str, alg: str, secret: bytes) -> str:
    signing_input = f"{segment(header(kid, alg=alg))}.{segment(claims())}"
    mac = hmac.new(secret, signing_input.encode(), HMAC_HASHES[alg]).digest()  # type: ignore[arg-type]
    return f"{signing_input}.{b64url(mac)}"


class TestAlgNone:
    @pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "NoNe", "none "])
    @pytest.mark.parametrize("signature", ["", "AAAA"])
    def test_unsecured_token_in_any_casing_is_bad_signature(
        self, target: Target, alg: str, signature: str
    ) -> None:
        kid = target.active_key().kid
        token = f"{segment(header(kid, alg=alg))}.{segment(claims())}.{signature}"
        assert target.reason(token) == "BAD_SIGNATURE"

    @pytest.mark.parametrize("alg", ["rs256", "Rs256", "RS256 ", " RS256", "RS256\u0000", ""])
    def test_near_miss_spellings_of_rs256_are_refused(self, target: Target, alg: str) -> None:
        key = target.active_key()
        assert target.reason(sign(key.private, header(key.kid, alg=alg), claims())) == (
            "BAD_SIGNATURE"
        )

    def test_genuine_signature_under_the_none_header_is_refused(self, target: Target) -> None:
        # A real RS256 signature does not rescue a header that names another algorithm.
        key = target.active_key()
        assert target.reason(sign(key.private, header(key.kid, alg="none"), claims())) == (
            "BAD_SIGNATURE"
        )


class TestHmacKeyedWithThePublicKey:
    @pytest.mark.parametrize("alg", sorted(HMAC_HASHES))
    def test_every_encoding_of_the_public_key_is_refused(self, target: Target, alg: str) -> None:
        kid = target.active_key().kid
        encodings = public_key_encodings(target)
        assert len(encodings) == 12
        reasons = {
            name: target.reason(hmac_token(kid, alg, secret)) for name, secret in encodings.items()
        }
        assert reasons == {name: "BAD_SIGNATURE" for name in encodings}

    def test_hs256_relabelled_as_rs256_is_bad_signature(self, target: Target) -> None:
        # The HMAC value under an RS256 header: 32 bytes, not a modulus-sized signature.
        kid = target.active_key().kid
        pem = public_key_encodings(target)["spki-pem"]
        signing_input = f"{segment(header(kid))}.{segment(claims())}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        assert target.reason(f"{signing_input}.{b64url(mac)}") == "BAD_SIGNATURE"


class TestAlgorithmSwaps:
    @pytest.mark.parametrize(
        ("alg", "pad", "digest"),
        [
            ("RS384", padding.PKCS1v15(), hashes.SHA384()),
            ("RS512", padding.PKCS1v15(), hashes.SHA512()),
            ("PS256", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()),
            ("PS512", padding.PSS(padding.MGF1(hashes.SHA512()), 64), hashes.SHA512()),
        ],
    )
    def test_our_key_under_another_rsa_algorithm_is_refused(
        self, target: Target, alg: str, pad: padding.AsymmetricPadding, digest: hashes.HashAlgorithm
    ) -> None:
        key = target.active_key()
        for header_alg in (alg, "RS256"):  # honestly labelled, and relabelled as RS256
            signing_input = f"{segment(header(key.kid, alg=header_alg))}.{segment(claims())}"
            signature = key.private.sign(signing_input.encode(), pad, digest)
            assert target.reason(f"{signing_input}.{b64url(signature)}") == "BAD_SIGNATURE"

    @pytest.mark.parametrize("alg", ["ES256", "RS256"])
    def test_ecdsa_signature_is_refused(self, target: Target, alg: str) -> None:
        ec_key = ec.generate_private_key(ec.SECP256R1())
        signing_input = f"{segment(header(target.active_key().kid, alg=alg))}.{segment(claims())}"
        signature = ec_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        assert target.reason(f"{signing_input}.{b64url(signature)}") == "BAD_SIGNATURE"

    def test_eddsa_signature_is_refused(self, target: Target) -> None:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        hdr = header(target.active_key().kid, alg="EdDSA")
        signing_input = f"{segment(hdr)}.{segment(claims())}"
        token = f"{signing_input}.{b64url(ed_key.sign(signing_input.encode()))}"
        assert target.reason(token) == "BAD_SIGNATURE"


def _with_signature(token: str, signature: bytes) -> str:
    return token.rsplit(".", 1)[0] + "." + b64url(signature)


def _leading_zero_token(target: Target, key: OwnKey) -> str:
    """A genuine token whose signature happens to start with a zero octet (about 1 in 256)."""
    now = int(time.time())
    for _ in range(20_000):
        token = sign(key.private, header(key.kid), claims(now))
        if unb64url(token.rsplit(".", 1)[1])[0] == 0:
            return token
    raise AssertionError("no signature with a leading zero octet in 20000 tries")


class TestPsychicSignatures:
    @pytest.mark.parametrize(
        "value", ["all-zero", "0-short", "1", "1-short", "n", "n-1", "n+1", "s+n", "s-n-abs", "2^k"]
    )
    def test_degenerate_signature_values_are_bad_signature(
        self, target: Target, value: str
    ) -> None:
        key = target.active_key()
        n = key.private.public_key().public_numbers().n
        k = (n.bit_length() + 7) // 8
        genuine = target.genuine()
        s = int.from_bytes(unb64url(genuine.rsplit(".", 1)[1]), "big")
        numbers = {
            "all-zero": (0, k),
            "0-short": (0, 1),
            "1": (1, k),
            "1-short": (1, 1),
            "n": (n, k),
            "n-1": (n - 1, k),
            "n+1": (n + 1, k),
            "s+n": (s + n, ((s + n).bit_length() + 7) // 8),
            "s-n-abs": (n - s, k),
            "2^k": (2 ** (8 * k) - 1, k),
        }
        number, length = numbers[value]
        forged = _with_signature(genuine, number.to_bytes(length, "big"))
        assert target.reason(forged) == "BAD_SIGNATURE"

    def test_leading_zero_octet_is_kept_not_stripped_or_added(self, target: Target) -> None:
        key = target.active_key()
        token = _leading_zero_token(target, key)
        signature = unb64url(token.rsplit(".", 1)[1])
        assert target.validate(token).valid  # RFC 8017: exactly k octets, zero included
        assert target.reason(_with_signature(token, signature[1:])) == "BAD_SIGNATURE"
        assert target.reason(_with_signature(token, b"\x00" + signature)) == "BAD_SIGNATURE"
        assert target.reason(_with_signature(token, signature + b"\x00")) == "BAD_SIGNATURE"

    def test_extra_zero_octet_before_a_genuine_signature_is_bad_signature(
        self, target: Target
    ) -> None:
        genuine = target.genuine()
        signature = unb64url(genuine.rsplit(".", 1)[1])
        assert target.reason(_with_signature(genuine, b"\x00" + signature)) == "BAD_SIGNATURE"

    def test_signature_of_another_token_is_bad_signature(self, target: Target) -> None:
        one, other = target.genuine(), target.genuine()
        assert target.reason(_with_signature(one, unb64url(other.rsplit(".", 1)[1]))) == (
            "BAD_SIGNATURE"
        )


def _raw_rsa_token(key: OwnKey, encode: Callable[[bytes, int], bytes]) -> str:
    """Sign an arbitrary encoded message EM with the raw RSA private operation (EM^d mod n),
    as Wycheproof does to produce signatures with broken PKCS#1 v1.5 padding."""
    numbers = key.private.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    k = (n.bit_length() + 7) // 8
    signing_input = f"{segment(header(key.kid))}.{segment(claims())}"
    em = encode(hashlib.sha256(signing_input.encode()).digest(), k)
    assert len(em) == k
    s = pow(int.from_bytes(em, "big"), d, n)
    return f"{signing_input}.{b64url(s.to_bytes(k, 'big'))}"


def _em(digest_info: bytes, k: int, *, block: bytes = b"\x00\x01", fill: int = 0xFF) -> bytes:
    return block + bytes([fill]) * (k - len(block) - 1 - len(digest_info)) + b"\x00" + digest_info


MALFORMED_PADDINGS: dict[str, Callable[[bytes, int], bytes]] = {
    "sha1-oid-with-sha256-digest": lambda h, k: _em(SHA1_INFO[:-1] + b"\x20" + h, k),
    "bare-digest-without-digestinfo": lambda h, k: _em(h, k),
    "block-type-02": lambda h, k: _em(SHA256_INFO + h, k, block=b"\x00\x02"),
    "block-type-00": lambda h, k: _em(SHA256_INFO + h, k, block=b"\x00\x00"),
    "leading-octet-01": lambda h, k: _em(SHA256_INFO + h, k, block=b"\x01\x01"),
    "padding-fe-not-ff": lambda h, k: _em(SHA256_INFO + h, k, fill=0xFE),
    "padding-zero-filled": lambda h, k: _em(SHA256_INFO + h, k, fill=0x00),
    "one-padding-octet-flipped": lambda h, k: (lambda em: em[:5] + b"\x7f" + em[6:])(
        _em(SHA256_INFO + h, k)
    ),
    "no-zero-separator": lambda h, k: (
        b"\x00\x01" + b"\xff" * (k - 2 - len(SHA256_INFO) - 32) + SHA256_INFO + h
    ),
    "short-padding-trailing-garbage": lambda h, k: (
        b"\x00\x01"
        + b"\xff" * 8
        + b"\x00"
        + SHA256_INFO
        + h
        + b"\x00" * (k - 11 - len(SHA256_INFO) - 32)
    ),
    "digestinfo-long-form-length": lambda h, k: _em(b"\x30\x81\x31" + SHA256_INFO[2:] + h, k),
    "digestinfo-trailing-octet": lambda h, k: _em(b"\x30\x32" + SHA256_INFO[2:] + h + b"\x00", k),
    "digestinfo-null-params-missing": lambda h, k: _em(
        bytes.fromhex("302f300b0609608648016503040201") + b"\x04\x20" + h, k
    ),
    "digest-of-another-message": lambda h, k: _em(
        SHA256_INFO + hashlib.sha256(b"another message").digest(), k
    ),
    "digest-truncated": lambda h, k: _em(SHA256_INFO[:-1] + b"\x1f" + h[:31], k),
}


class TestMalformedPkcs1Padding:
    def test_the_raw_construction_yields_a_valid_token_when_padding_is_right(
        self, target: Target
    ) -> None:
        # Control: proves the malformed cases below fail for their padding alone.
        token = _raw_rsa_token(target.active_key(), lambda h, k: _em(SHA256_INFO + h, k))
        assert target.validate(token).valid

    @pytest.mark.parametrize("case", sorted(MALFORMED_PADDINGS))
    def test_malformed_padding_is_bad_signature(self, target: Target, case: str) -> None:
        token = _raw_rsa_token(target.active_key(), MALFORMED_PADDINGS[case])
        assert target.reason(token) == "BAD_SIGNATURE"
