"""TokenVerifier: one test per ValidationFailure reason and per rule of the strict verifier."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from hypothesis import example, given, settings
from hypothesis import strategies as st

from authsvc_client.claims import SCOPE_CLAIM, Claims, ValidationResult, valid_result
from authsvc_client.errors import TokenInvalid, error_for_reason
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import _JSON, TokenVerifier, _json_object

NOW = 1_700_000_000
ISSUER = "https://authsvc.internal"
AUD = "svc-b"
LEEWAY = 30
DROP = object()  # marks a member to leave out


@dataclass(frozen=True)
class Env:
    key: RSAPrivateKey
    kid: str
    other: RSAPrivateKey
    ring: KeyRing


@pytest.fixture(scope="module")
def env() -> Env:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "kid-1"
    return Env(key=key, kid=kid, other=other, ring=KeyRing({kid: key.public_key()}))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _apply(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **over}
    return {k: v for k, v in merged.items() if v is not DROP}


def payload(**over: Any) -> dict[str, Any]:
    base = {
        "iss": ISSUER,
        "sub": "svc-a",
        "aud": AUD,
        "exp": NOW + 900,
        "nbf": NOW,
        "iat": NOW,
        "jti": secrets.token_urlsafe(18),
        "scope": "read write",
        "client_id": "svc-a",
    }
    return _apply(base, over)


def header(kid_: str = "kid-1", /, **over: Any) -> dict[str, Any]:
    return _apply({"alg": "RS256", "typ": "at+jwt", "kid": kid_}, over)


def segment(part: dict[str, Any] | bytes) -> str:
    if isinstance(part, bytes):
        return b64(part)
    return b64(json.dumps(part, separators=(",", ":")).encode("utf-8"))


def sign(key: RSAPrivateKey, hdr: dict[str, Any] | bytes, body: dict[str, Any] | bytes) -> str:
    signing_input = f"{segment(hdr)}.{segment(body)}"
    signature = key.sign(signing_input.encode("ascii"), PKCS1v15(), SHA256())
    return f"{signing_input}.{b64(signature)}"


def good(env: Env, **over: Any) -> str:
    return sign(env.key, header(env.kid), payload(**over))


def make(env: Env, **kw: Any) -> TokenVerifier:
    options: dict[str, Any] = {
        "keys": lambda: env.ring,
        "revocations": RevocationSet(),
        "issuer": ISSUER,
        "leeway_seconds": LEEWAY,
        "clock": lambda: float(NOW),
    }
    options.update(kw)
    return TokenVerifier(**options)


def reason(result: ValidationResult) -> str:
    return result.reason_name


def jti_of(token: str) -> str:
    body = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return str(claims["jti"])


def pad(seg: str) -> str:
    return seg + "=" * (-len(seg) % 4)


def std_alphabet(seg: str) -> str:
    return seg.replace("-", "+").replace("_", "/")


class TestValidToken:
    def test_valid_token_returns_its_claims(self, env: Env) -> None:
        token = good(env, scope="read write")
        result = make(env).verify(token, audience=AUD, required_scopes=["read"], now=NOW)
        assert result.valid and result.reason_name == "VALIDATION_FAILURE_UNSPECIFIED"
        assert result.claims == Claims(
            issuer=ISSUER,
            subject="svc-a",
            audience=AUD,
            scopes=("read", "write"),
            issued_at=NOW,
            not_before=NOW,
            expires_at=NOW + 900,
            jti=jti_of(token),
            key_id=env.kid,
            client_id="svc-a",
        )

    def test_bytes_token_is_accepted(self, env: Env) -> None:
        assert make(env).verify(good(env).encode("ascii"), audience=AUD).valid

    def test_now_defaults_to_the_injected_clock(self, env: Env) -> None:
        token = good(env)
        assert make(env).verify(token, audience=AUD).valid
        late = make(env, clock=lambda: float(NOW + 10_000))
        assert reason(late.verify(token, audience=AUD)) == "EXPIRED"

    @pytest.mark.parametrize(
        "typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+Jwt"]
    )
    def test_typ_forms_of_rfc_9068(self, env: Env, typ: str) -> None:
        token = sign(env.key, header(env.kid, typ=typ), payload())
        assert make(env).verify(token, audience=AUD).valid

    def test_unknown_extra_claims_are_ignored(self, env: Env) -> None:
        token = good(env, extra={"nested": [1, 2.5, None, True]}, amr=["pwd"])
        assert make(env).verify(token, audience=AUD).valid

    def test_empty_scope_means_no_scopes(self, env: Env) -> None:
        result = make(env).verify(good(env, scope=""), audience=AUD, now=NOW)
        assert result.claims is not None and result.claims.scopes == ()

    def test_result_round_trips_through_proto(self, env: Env) -> None:
        result = make(env).verify(good(env), audience=AUD, now=NOW)
        assert ValidationResult.from_proto(result.to_proto()) == result
        failed = make(env).verify("x", audience=AUD)
        assert ValidationResult.from_proto(failed.to_proto()) == failed


class TestShape:
    def test_token_over_the_size_limit_is_malformed(self, env: Env) -> None:
        token = good(env, filler="x" * 200)
        assert make(env).verify(token, audience=AUD).valid
        small = make(env, max_token_bytes=len(token) - 1)
        assert reason(small.verify(token, audience=AUD)) == "MALFORMED"
        assert reason(small.verify(token.encode(), audience=AUD)) == "MALFORMED"
        assert make(env, max_token_bytes=len(token)).verify(token, audience=AUD).valid

    def test_oversized_revoked_token_is_malformed_before_any_decoding(self, env: Env) -> None:
        token = good(env, filler="x" * 200)
        revoked = RevocationSet()
        revoked.add(RevocationEntry(1, jti_of(token), None, None, NOW + 900))
        small = make(env, revocations=revoked, max_token_bytes=len(token) - 1)
        assert reason(small.verify(token, audience=AUD)) == "MALFORMED"

    def test_non_ascii_token_is_malformed(self, env: Env) -> None:
        token = good(env)
        assert reason(make(env).verify(token + "é", audience=AUD)) == "MALFORMED"
        assert reason(make(env).verify(token.encode() + b"\xff", audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("parts", [1, 2, 4, 5])
    def test_not_three_parts_is_malformed(self, env: Env, parts: int) -> None:
        token = good(env)
        pieces = token.split(".")
        shaped = ".".join((pieces * 2)[:parts])
        assert reason(make(env).verify(shaped, audience=AUD)) == "MALFORMED"

    def test_jwe_compact_is_malformed(self, env: Env) -> None:
        jwe = ".".join([segment({"alg": "RSA-OAEP", "enc": "A256GCM"}), "a", "b", "c", "d"])
        assert reason(make(env).verify(jwe, audience=AUD)) == "MALFORMED"

    def test_json_serialised_jws_is_malformed(self, env: Env) -> None:
        h, p, s = good(env).split(".")
        general = json.dumps({"payload": p, "signatures": [{"protected": h, "signature": s}]})
        flattened = json.dumps({"payload": p, "protected": h, "signature": s})
        assert reason(make(env).verify(general, audience=AUD)) == "MALFORMED"
        assert reason(make(env).verify(flattened, audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("token", ["", ".", "..", "a.b.c", "...."])
    def test_degenerate_strings_are_malformed(self, env: Env, token: str) -> None:
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    def test_a_value_that_is_not_a_token_is_malformed(self, env: Env) -> None:
        not_a_token: Any = 12345
        assert reason(make(env).verify(not_a_token, audience=AUD)) == "MALFORMED"


class TestJsonParsing:
    def sign_raw(self, env: Env, body: bytes, hdr: bytes | None = None) -> str:
        return sign(env.key, hdr if hdr is not None else header(env.kid), body)

    def valid_body(self, extra: str = "") -> bytes:
        return (
            f'{{"iss":"{ISSUER}","sub":"svc-a","aud":"{AUD}","exp":{NOW + 900},"nbf":{NOW},'
            f'"iat":{NOW},"jti":"j1","scope":"read","client_id":"svc-a"{extra}}}'
        ).encode()

    def test_hand_written_body_is_valid(self, env: Env) -> None:
        assert make(env).verify(self.sign_raw(env, self.valid_body()), audience=AUD).valid

    def test_duplicate_claim_names_are_malformed(self, env: Env) -> None:
        body = self.valid_body(extra=',"aud":"svc-evil"')
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    def test_duplicate_header_names_are_malformed(self, env: Env) -> None:
        hdr = b'{"alg":"RS256","typ":"at+jwt","kid":"kid-1","kid":"kid-2"}'
        token = self.sign_raw(env, self.valid_body(), hdr)
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
    def test_non_finite_numbers_are_malformed(self, env: Env, number: str) -> None:
        body = self.valid_body(extra=f',"x":{number}')
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    def test_utf8_bom_is_malformed(self, env: Env) -> None:
        body = b"\xef\xbb\xbf" + self.valid_body()
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
    def test_invalid_utf8_is_malformed(self, env: Env, raw: bytes) -> None:
        # Stray bytes, a truncated sequence, an encoded surrogate, an overlong '/'.
        body = self.valid_body()[:-1] + b',"x":"' + raw + b'"}'
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    def test_escaped_lone_surrogate_is_malformed(self, env: Env) -> None:
        body = self.valid_body(extra=',"x":"\\ud800"')
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    def test_escaped_surrogate_pair_is_fine(self, env: Env) -> None:
        body = self.valid_body(extra=',"x":"\\ud83d\\ude00"')
        assert make(env).verify(self.sign_raw(env, body), audience=AUD).valid

    def test_deep_nesting_is_malformed_not_a_crash(self, env: Env) -> None:
        body = self.valid_body(extra=',"x":' + "[" * 4000 + "]" * 4000)
        token = self.sign_raw(env, body)
        result = make(env, max_token_bytes=20_000).verify(token, audience=AUD)
        assert reason(result) == "MALFORMED"

    @pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"", b"{", b"{}x"])
    def test_payload_not_a_json_object_is_malformed(self, env: Env, body: bytes) -> None:
        assert reason(make(env).verify(self.sign_raw(env, body), audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("hdr", [b"[]", b"null", b"RS256", b""])
    def test_header_not_a_json_object_is_malformed(self, env: Env, hdr: bytes) -> None:
        token = self.sign_raw(env, self.valid_body(), hdr)
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"


class TestRevocation:
    def revoked_set(self, *jtis: str) -> RevocationSet:
        revocations = RevocationSet()
        for i, jti in enumerate(jtis, start=1):
            revocations.add(RevocationEntry(i, jti, None, None, NOW + 900))
        return revocations

    def test_revoked_jti_is_revoked(self, env: Env) -> None:
        token = good(env)
        verifier = make(env, revocations=self.revoked_set(jti_of(token)))
        assert reason(verifier.verify(token, audience=AUD)) == "REVOKED"

    def test_service_cutoff_revokes_tokens_issued_before_it(self, env: Env) -> None:
        revocations = RevocationSet()
        revocations.add(RevocationEntry(1, None, "svc-a", NOW + 1, NOW + 900))
        verifier = make(env, revocations=revocations)
        assert reason(verifier.verify(good(env, iat=NOW), audience=AUD)) == "REVOKED"
        # Issued at the cutoff second or later: still valid (iat < revoked_before is revoked).
        assert verifier.verify(good(env, iat=NOW + 1), audience=AUD, now=NOW + 1).valid
        other = good(env, sub="svc-c", client_id="svc-c")
        assert verifier.verify(other, audience=AUD).valid

    def test_revoked_token_stays_revoked_in_any_re_encoding(self, env: Env) -> None:
        token = good(env)
        verifier = make(env, revocations=self.revoked_set(jti_of(token)))
        h, p, s = token.split(".")
        variants = [
            f"{pad(h)}.{pad(p)}.{pad(s)}",
            f"{h}.{p}.{std_alphabet(s)}",
            f"{std_alphabet(pad(h))}.{std_alphabet(pad(p))}.{std_alphabet(pad(s))}",
            f"{h}.{p}.",
            f"{h}.{p}.AAAA",
        ]
        for variant in variants:
            assert reason(verifier.verify(variant, audience=AUD)) == "REVOKED"

    def test_revocation_is_checked_before_the_signature(self, env: Env) -> None:
        forged = sign(env.other, header(env.kid), payload(jti="stolen"))
        verifier = make(env, revocations=self.revoked_set("stolen"))
        assert reason(verifier.verify(forged, audience=AUD)) == "REVOKED"

    def test_revocation_added_after_caching_applies(self, env: Env) -> None:
        token = good(env)
        revocations = RevocationSet()
        verifier = make(env, revocations=revocations)
        assert verifier.verify(token, audience=AUD).valid
        revocations.add(RevocationEntry(1, jti_of(token), None, None, NOW + 900))
        assert reason(verifier.verify(token, audience=AUD)) == "REVOKED"


class TestCanonicalEncoding:
    def test_padding_is_malformed(self, env: Env) -> None:
        candidates = (good(env, filler="a" * n) for n in range(3))
        token = next(t for t in candidates if len(t.split(".")[1]) % 4)
        h, p, s = token.split(".")
        assert len(h) % 4 and len(p) % 4 and len(s) % 4
        for variant in (f"{pad(h)}.{p}.{s}", f"{h}.{pad(p)}.{s}", f"{h}.{p}.{pad(s)}"):
            assert reason(make(env).verify(variant, audience=AUD)) == "MALFORMED"

    def test_standard_alphabet_is_malformed(self, env: Env) -> None:
        h, p, s = good(env).split(".")
        assert std_alphabet(s) != s
        assert reason(make(env).verify(f"{h}.{p}.{std_alphabet(s)}", audience=AUD)) == "MALFORMED"

    def test_nonzero_trailing_bits_are_malformed(self, env: Env) -> None:
        h, p, s = good(env).split(".")
        # 256 signature bytes use 342 characters: the last one carries 4 unused bits.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(s[-1])
        assert last & 0b1111 == 0
        tweaked = s[:-1] + alphabet[last | 1]
        assert base64.urlsafe_b64decode(pad(tweaked)) == base64.urlsafe_b64decode(pad(s))
        assert reason(make(env).verify(f"{h}.{p}.{tweaked}", audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("junk", [" ", "\n", "!", "*"])
    def test_junk_characters_are_malformed(self, env: Env, junk: str) -> None:
        h, p, s = good(env).split(".")
        variants = (f"{h}{junk}.{p}.{s}", f"{h}.{p[:5]}{junk}{p[5:]}.{s}", f"{h}.{p}.{s}{junk}")
        for variant in variants:
            assert reason(make(env).verify(variant, audience=AUD)) == "MALFORMED"


class TestHeader:
    @pytest.mark.parametrize(
        "extra",
        [
            {"jku": "https://evil.example/jwks.json"},
            {"x5u": "https://evil.example/cert.pem"},
            {"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}},
            {"x5c": ["MIIB"]},
            {"crit": ["exp"]},
            {"cty": "JWT"},
            {"b64": False},
        ],
    )
    def test_any_other_header_parameter_is_malformed(self, env: Env, extra: dict[str, Any]) -> None:
        token = sign(env.key, header(env.kid, **extra), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    def test_embedded_jwk_is_never_used(self, env: Env) -> None:
        numbers = env.other.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(numbers.n.to_bytes(256, "big")), "e": "AQAB"}
        token = sign(env.other, header(env.kid, jwk=jwk), payload())
        assert not make(env).verify(token, audience=AUD).valid

    @pytest.mark.parametrize("missing", ["alg", "typ", "kid"])
    def test_missing_header_parameter_is_malformed(self, env: Env, missing: str) -> None:
        token = sign(env.key, header(env.kid, **{missing: DROP}), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("name", ["alg", "typ", "kid"])
    def test_non_string_header_parameter_is_malformed(self, env: Env, name: str) -> None:
        token = sign(env.key, header(env.kid, **{name: 1}), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
    def test_alg_none_in_any_casing_is_bad_signature(self, env: Env, alg: str) -> None:
        unsigned = f"{segment(header(env.kid, alg=alg))}.{segment(payload())}."
        assert reason(make(env).verify(unsigned, audience=AUD)) == "BAD_SIGNATURE"

    def test_hs256_keyed_with_the_public_key_is_bad_signature(self, env: Env) -> None:
        pem = env.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = f"{segment(header(env.kid, alg='HS256'))}.{segment(payload())}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64(mac)}"
        assert reason(make(env).verify(token, audience=AUD)) == "BAD_SIGNATURE"

    @pytest.mark.parametrize(
        "alg", ["RS384", "RS512", "PS256", "ES256", "HS256", "rs256", "RS256 "]
    )
    def test_any_alg_but_rs256_is_bad_signature(self, env: Env, alg: str) -> None:
        token = sign(env.key, header(env.kid, alg=alg), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "BAD_SIGNATURE"

    @pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt ", "application/jwt", "", "at+JWT+x"])
    def test_typ_other_than_at_jwt_is_malformed(self, env: Env, typ: str) -> None:
        token = sign(env.key, header(env.kid, typ=typ), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"


class TestKeyLookup:
    def test_unknown_kid_is_unknown_key(self, env: Env) -> None:
        token = sign(env.key, header("kid-other"), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "UNKNOWN_KEY"

    def test_empty_ring_is_unknown_key(self, env: Env) -> None:
        verifier = make(env, keys=lambda: KeyRing({}))
        assert reason(verifier.verify(good(env), audience=AUD)) == "UNKNOWN_KEY"

    def test_on_unknown_kid_is_called_once_and_its_ring_is_used(self, env: Env) -> None:
        calls: list[str] = []
        fresh = KeyRing({"kid-new": env.key.public_key()})

        def refresh(kid: str) -> KeyRing | None:
            calls.append(kid)
            return fresh

        token = sign(env.key, header("kid-new"), payload())
        assert make(env, on_unknown_kid=refresh).verify(token, audience=AUD).valid
        assert calls == ["kid-new"]

    def test_on_unknown_kid_returning_none_retries_keys_once(self, env: Env) -> None:
        calls: list[str] = []
        token = sign(env.key, header("kid-x"), payload())

        def refresh(kid: str) -> KeyRing | None:
            calls.append(kid)
            return None

        result = make(env, on_unknown_kid=refresh).verify(token, audience=AUD)
        assert reason(result) == "UNKNOWN_KEY"
        assert calls == ["kid-x"]

    def test_on_unknown_kid_that_updates_the_source_is_seen(self, env: Env) -> None:
        holder = {"ring": KeyRing({})}

        def refresh(kid: str) -> KeyRing | None:
            holder["ring"] = env.ring
            return None

        verifier = make(env, keys=lambda: holder["ring"], on_unknown_kid=refresh)
        assert verifier.verify(good(env), audience=AUD).valid

    def test_on_unknown_kid_failure_is_unknown_key_not_an_exception(self, env: Env) -> None:
        def refresh(kid: str) -> KeyRing | None:
            raise ConnectionError("jwks endpoint down")

        token = sign(env.key, header("kid-x"), payload())
        result = make(env, on_unknown_kid=refresh).verify(token, audience=AUD)
        assert reason(result) == "UNKNOWN_KEY"


class TestSignature:
    def test_signature_by_another_key_is_bad_signature(self, env: Env) -> None:
        token = sign(env.other, header(env.kid), payload())
        assert reason(make(env).verify(token, audience=AUD)) == "BAD_SIGNATURE"

    def test_all_zero_psychic_signature_is_bad_signature(self, env: Env) -> None:
        h, p, _ = good(env).split(".")
        result = make(env).verify(f"{h}.{p}.{b64(bytes(256))}", audience=AUD)
        assert reason(result) == "BAD_SIGNATURE"

    @pytest.mark.parametrize("length", [0, 1, 255, 257, 512])
    def test_signature_not_modulus_length_is_bad_signature(self, env: Env, length: int) -> None:
        h, p, s = good(env).split(".")
        real = base64.urlsafe_b64decode(pad(s))
        wrong = (real * 2)[:length] if length > 0 else b""
        assert reason(make(env).verify(f"{h}.{p}.{b64(wrong)}", audience=AUD)) == "BAD_SIGNATURE"

    def test_signature_with_leading_zero_stripped_is_bad_signature(self, env: Env) -> None:
        # Find a token whose signature starts with a zero byte, then drop that byte.
        for _ in range(2000):
            h, p, s = good(env).split(".")
            raw = base64.urlsafe_b64decode(pad(s))
            if raw[0] == 0:
                token = f"{h}.{p}.{b64(raw[1:])}"
                assert reason(make(env).verify(token, audience=AUD)) == "BAD_SIGNATURE"
                return
        pytest.skip("no signature with a leading zero byte in 2000 tries")

    def test_altered_payload_is_bad_signature(self, env: Env) -> None:
        token = good(env, scope="read")
        h, _, s = token.split(".")
        body = json.loads(base64.urlsafe_b64decode(pad(token.split(".")[1])))
        body["scope"] = "read admin"
        forged = f"{h}.{segment(body)}.{s}"
        assert reason(make(env).verify(forged, audience=AUD)) == "BAD_SIGNATURE"


class TestClaims:
    @pytest.mark.parametrize(
        "missing", ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "client_id"]
    )
    def test_missing_required_claim_is_malformed(self, env: Env, missing: str) -> None:
        token = good(env, **{missing: DROP})
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    @pytest.mark.parametrize(
        "claim,value",
        [
            ("aud", [AUD]),
            ("aud", [AUD, "svc-c"]),
            ("exp", str(NOW + 900)),
            ("exp", float(NOW + 900)),
            ("exp", True),
            ("nbf", float(NOW)),
            ("iat", float(NOW)),
            ("iat", None),
            ("exp", -1),
            ("exp", 10**20),
            ("iss", 1),
            ("sub", ""),
            ("sub", ["svc-a"]),
            ("jti", ""),
            ("jti", 7),
            ("scope", ["read"]),
            ("scope", "read  write"),
            ("scope", " read"),
            ("scope", "read "),
            ("client_id", "svc-other"),
            ("client_id", None),
        ],
    )
    def test_wrong_type_or_shape_is_malformed(self, env: Env, claim: str, value: Any) -> None:
        token = good(env, **{claim: value})
        assert reason(make(env).verify(token, audience=AUD)) == "MALFORMED"

    def test_wrong_issuer(self, env: Env) -> None:
        token = good(env, iss="https://evil.example")
        assert reason(make(env).verify(token, audience=AUD)) == "WRONG_ISSUER"

    def test_issuer_compared_exactly(self, env: Env) -> None:
        token = good(env, iss=ISSUER + "/")
        assert reason(make(env).verify(token, audience=AUD)) == "WRONG_ISSUER"

    def test_wrong_audience(self, env: Env) -> None:
        token = good(env, aud="svc-c")
        assert reason(make(env).verify(token, audience=AUD)) == "WRONG_AUDIENCE"
        assert reason(make(env).verify(good(env), audience="svc-b2")) == "WRONG_AUDIENCE"

    def test_service_disabled(self, env: Env) -> None:
        verifier = make(env, is_subject_enabled=lambda sub: sub != "svc-a")
        assert reason(verifier.verify(good(env), audience=AUD)) == "SERVICE_DISABLED"
        other = good(env, sub="svc-c", client_id="svc-c")
        assert verifier.verify(other, audience=AUD).valid

    def test_insufficient_scope(self, env: Env) -> None:
        token = good(env, scope="read write")
        verifier = make(env)
        assert verifier.verify(token, audience=AUD, required_scopes=["read", "write"]).valid
        result = verifier.verify(token, audience=AUD, required_scopes=["read", "admin"])
        assert reason(result) == "INSUFFICIENT_SCOPE"
        # Scope names are whole words, not prefixes.
        assert reason(verifier.verify(token, audience=AUD, required_scopes=["rea"])) == (
            "INSUFFICIENT_SCOPE"
        )

    def test_required_scopes_as_a_single_string_is_a_programming_error(self, env: Env) -> None:
        with pytest.raises(TypeError):
            make(env).verify(good(env), audience=AUD, required_scopes="read")

    def test_empty_audience_is_a_programming_error(self, env: Env) -> None:
        with pytest.raises(ValueError):
            make(env).verify(good(env, aud=""), audience="")


class TestTimeAndLeeway:
    def test_expiry_boundary(self, env: Env) -> None:
        token = good(env, exp=NOW + 100)
        verifier = make(env)
        assert verifier.verify(token, audience=AUD, now=NOW + 100 + LEEWAY - 0.001).valid
        assert reason(verifier.verify(token, audience=AUD, now=NOW + 100 + LEEWAY)) == "EXPIRED"

    def test_zero_leeway_expires_at_exp(self, env: Env) -> None:
        token = good(env, exp=NOW + 100)
        verifier = make(env, leeway_seconds=0)
        assert verifier.verify(token, audience=AUD, now=NOW + 99.999).valid
        assert reason(verifier.verify(token, audience=AUD, now=NOW + 100)) == "EXPIRED"

    def test_not_before_boundary(self, env: Env) -> None:
        verifier = make(env)
        at_edge = good(env, nbf=NOW + LEEWAY)
        assert verifier.verify(at_edge, audience=AUD, now=NOW).valid
        beyond = good(env, nbf=NOW + LEEWAY + 1)
        assert reason(verifier.verify(beyond, audience=AUD, now=NOW)) == "NOT_YET_VALID"

    def test_issued_in_the_future_boundary(self, env: Env) -> None:
        verifier = make(env)
        assert verifier.verify(good(env, iat=NOW + LEEWAY), audience=AUD, now=NOW).valid
        future = good(env, iat=NOW + LEEWAY + 1)
        assert reason(verifier.verify(future, audience=AUD, now=NOW)) == "NOT_YET_VALID"

    def test_expiry_is_checked_before_not_before(self, env: Env) -> None:
        token = good(env, nbf=NOW + 1000, exp=NOW + 10)
        assert reason(make(env).verify(token, audience=AUD, now=NOW + 500)) == "EXPIRED"


class TestCache:
    def test_key_removed_from_ring_stops_a_cached_token(self, env: Env) -> None:
        holder = {"ring": env.ring}
        verifier = make(env, keys=lambda: holder["ring"])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        assert verifier.cached_tokens == 1
        holder["ring"] = KeyRing({})
        assert reason(verifier.verify(token, audience=AUD)) == "UNKNOWN_KEY"
        holder["ring"] = env.ring
        assert verifier.verify(token, audience=AUD).valid

    def test_forged_token_reusing_a_cached_jti_is_rejected(self, env: Env) -> None:
        verifier = make(env)
        token = good(env, scope="read")
        assert verifier.verify(token, audience=AUD).valid
        h, p, s = token.split(".")
        body = json.loads(base64.urlsafe_b64decode(pad(p)))
        body["scope"] = "read admin"
        forged = f"{h}.{segment(body)}.{s}"
        assert reason(verifier.verify(forged, audience=AUD)) == "BAD_SIGNATURE"
        by_other_key = sign(env.other, header(env.kid), body)
        assert reason(verifier.verify(by_other_key, audience=AUD)) == "BAD_SIGNATURE"
        assert reason(verifier.verify(f"{h}.{pad(p)}.{s}", audience=AUD)) == "MALFORMED"

    def test_a_hit_skips_rsa_and_relies_on_the_exact_bytes(self, env: Env) -> None:
        holder = {"ring": env.ring}
        verifier = make(env, keys=lambda: holder["ring"])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        # Same kid, different key: only a full verification would notice.
        holder["ring"] = KeyRing({env.kid: env.other.public_key()})
        assert verifier.verify(token, audience=AUD).valid
        assert reason(verifier.verify(good(env), audience=AUD)) == "BAD_SIGNATURE"

    def test_a_hit_still_checks_audience_time_subject_and_scopes(self, env: Env) -> None:
        enabled = {"svc-a": True}
        verifier = make(env, is_subject_enabled=lambda sub: enabled[sub])
        token = good(env, scope="read", nbf=NOW + LEEWAY + 10)
        assert reason(verifier.verify(token, audience=AUD, now=NOW)) == "NOT_YET_VALID"
        assert verifier.cached_tokens == 1
        assert verifier.verify(token, audience=AUD, now=NOW + 10).valid
        assert reason(verifier.verify(token, audience="svc-c", now=NOW + 10)) == "WRONG_AUDIENCE"
        result = verifier.verify(token, audience=AUD, required_scopes=["write"], now=NOW + 10)
        assert reason(result) == "INSUFFICIENT_SCOPE"
        enabled["svc-a"] = False
        assert reason(verifier.verify(token, audience=AUD, now=NOW + 10)) == "SERVICE_DISABLED"

    def test_expired_entries_are_dropped(self, env: Env) -> None:
        verifier = make(env)
        token = good(env, exp=NOW + 60)
        assert verifier.verify(token, audience=AUD, now=NOW).valid
        assert verifier.cached_tokens == 1
        assert reason(verifier.verify(token, audience=AUD, now=NOW + 60 + LEEWAY)) == "EXPIRED"
        assert verifier.cached_tokens == 0

    def test_cache_is_bounded_oldest_first(self, env: Env) -> None:
        verifier = make(env, cache_size=2)
        tokens = [good(env) for _ in range(3)]
        for token in tokens:
            assert verifier.verify(token, audience=AUD).valid
        assert verifier.cached_tokens == 2

    def test_only_signature_verified_tokens_are_cached(self, env: Env) -> None:
        verifier = make(env)
        verifier.verify(sign(env.other, header(env.kid), payload()), audience=AUD)
        verifier.verify(good(env, aud=["x"]), audience=AUD)
        verifier.verify(good(env, exp=NOW - 3600), audience=AUD)
        verifier.verify("garbage", audience=AUD)
        assert verifier.cached_tokens == 0

    def test_a_revoked_jti_leaves_the_cache_at_once(self, env: Env) -> None:
        revocations = RevocationSet()
        verifier = make(env, revocations=revocations, cache_size=2)
        tokens = [good(env) for _ in range(3)]
        for token in tokens:
            assert verifier.verify(token, audience=AUD).valid
        assert verifier.cached_tokens == 2  # the first was evicted
        revocations.add(RevocationEntry(1, jti_of(tokens[0]), None, None, NOW + 900))
        assert verifier.cached_tokens == 2  # not cached: nothing to drop
        revocations.add(RevocationEntry(2, jti_of(tokens[1]), None, None, NOW + 900))
        assert verifier.cached_tokens == 1
        assert reason(verifier.verify(tokens[1], audience=AUD)) == "REVOKED"
        assert verifier.verify(tokens[2], audience=AUD).valid
        assert verifier.cached_tokens == 1

    def test_a_ring_swapped_for_an_equal_one_keeps_cached_tokens_valid(self, env: Env) -> None:
        holder = {"ring": env.ring}
        verifier = make(env, keys=lambda: holder["ring"])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        for ring in (KeyRing({env.kid: env.key.public_key()}), KeyRing({}), env.ring):
            holder["ring"] = ring
            expected = "UNKNOWN_KEY" if env.kid not in ring else "VALIDATION_FAILURE_UNSPECIFIED"
            assert reason(verifier.verify(token, audience=AUD)) == expected

    def test_cache_can_be_disabled(self, env: Env) -> None:
        verifier = make(env, cache_size=0)
        assert verifier.verify(good(env), audience=AUD).valid
        assert verifier.cached_tokens == 0


class TestVerdictMemo:
    """A valid verdict reused for the exact request while nothing it depends on has changed."""

    def test_without_subjects_version_an_enabled_callback_is_asked_every_time(
        self, env: Env
    ) -> None:
        enabled = {"svc-a": True}
        verifier = make(env, is_subject_enabled=lambda sub: enabled[sub])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        enabled["svc-a"] = False
        assert reason(verifier.verify(token, audience=AUD)) == "SERVICE_DISABLED"

    def test_subjects_version_is_what_tells_a_reused_verdict_to_look_again(self, env: Env) -> None:
        state = {"disabled": frozenset[str]()}
        asked: list[str] = []

        def enabled(sub: str) -> bool:
            asked.append(sub)
            return sub not in state["disabled"]

        verifier = make(env, is_subject_enabled=enabled, subjects_version=lambda: state["disabled"])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        assert verifier.verify(token, audience=AUD).valid
        assert asked == ["svc-a"]  # the repeat was answered without asking again
        state["disabled"] = frozenset({"svc-a"})  # a new object: a new version
        assert reason(verifier.verify(token, audience=AUD)) == "SERVICE_DISABLED"
        state["disabled"] = frozenset()
        assert verifier.verify(token, audience=AUD).valid

    def test_a_revocation_after_a_reused_verdict_applies_at_once(self, env: Env) -> None:
        revocations = RevocationSet()
        verifier = make(env, revocations=revocations)
        by_jti, by_service = good(env), good(env, sub="svc-c", client_id="svc-c")
        for token in (by_jti, by_service):
            assert verifier.verify(token, audience=AUD).valid
            assert verifier.verify(token, audience=AUD).valid
        revocations.add(RevocationEntry(1, jti_of(by_jti), None, None, NOW + 900))
        revocations.add(RevocationEntry(2, None, "svc-c", NOW + 1, NOW + 900))
        assert reason(verifier.verify(by_jti, audience=AUD)) == "REVOKED"
        assert reason(verifier.verify(by_service, audience=AUD)) == "REVOKED"

    def test_a_revocation_that_lands_during_a_verification_is_not_missed_next_time(
        self, env: Env
    ) -> None:
        # The revocation arrives after this verification's revocation check (from inside the
        # enabled callback, which _check calls later): that verdict may still say valid, but
        # it was reached under the old revocations version and must not be reused.
        revocations = RevocationSet()
        token = good(env)
        landed: list[bool] = []

        def enabled(_sub: str) -> bool:
            if not landed:
                landed.append(True)
                revocations.add(RevocationEntry(1, jti_of(token), None, None, NOW + 900))
            return True

        verifier = make(
            env, revocations=revocations, is_subject_enabled=enabled, subjects_version=lambda: 0
        )
        assert verifier.verify(token, audience=AUD).valid
        assert reason(verifier.verify(token, audience=AUD)) == "REVOKED"

    def test_a_reused_verdict_still_keeps_to_its_time_bounds(self, env: Env) -> None:
        verifier = make(env)
        token = good(env, exp=NOW + 60)
        assert verifier.verify(token, audience=AUD, now=NOW).valid
        assert verifier.verify(token, audience=AUD, now=NOW + 60 + LEEWAY - 1).valid
        assert reason(verifier.verify(token, audience=AUD, now=NOW + 60 + LEEWAY)) == "EXPIRED"
        early = good(env, nbf=NOW + 100, exp=NOW + 900)
        assert verifier.verify(early, audience=AUD, now=NOW + 100).valid
        # A clock that went back: the verdict reached later is not reused earlier.
        assert reason(verifier.verify(early, audience=AUD, now=NOW)) == "NOT_YET_VALID"

    def test_each_audience_scope_list_and_certificate_has_its_own_verdict(self, env: Env) -> None:
        verifier = make(env)
        token = good(env, scope="read")
        assert verifier.verify(token, audience=AUD).valid
        assert verifier.verify(token, audience=AUD, required_scopes=["read"]).valid
        assert reason(verifier.verify(token, audience="svc-c")) == "WRONG_AUDIENCE"
        result = verifier.verify(token, audience=AUD, required_scopes=["read", "write"])
        assert reason(result) == "INSUFFICIENT_SCOPE"
        bound = good(env, cnf={"x5t#S256": b64(hashlib.sha256(b"cert-1").digest())})
        thumb1 = b64(hashlib.sha256(b"cert-1").digest())
        thumb2 = b64(hashlib.sha256(b"cert-2").digest())
        assert verifier.verify(bound, audience=AUD, client_cert_thumbprint=thumb1).valid
        mismatch = verifier.verify(bound, audience=AUD, client_cert_thumbprint=thumb2)
        assert reason(mismatch) == "CERTIFICATE_MISMATCH"
        assert reason(verifier.verify(bound, audience=AUD)) == "CERTIFICATE_MISMATCH"

    def test_a_ring_without_the_key_stops_a_reused_verdict(self, env: Env) -> None:
        holder = {"ring": env.ring}
        verifier = make(env, keys=lambda: holder["ring"])
        token = good(env)
        assert verifier.verify(token, audience=AUD).valid
        assert verifier.verify(token, audience=AUD).valid
        holder["ring"] = KeyRing({})
        assert reason(verifier.verify(token, audience=AUD)) == "UNKNOWN_KEY"

    def test_the_memo_is_bounded_by_the_cache_size(self, env: Env) -> None:
        verifier = make(env, cache_size=2)
        tokens = [good(env) for _ in range(3)]
        for token in tokens:
            assert verifier.verify(token, audience=AUD).valid
            assert verifier.verify(token, audience=AUD, required_scopes=["read"]).valid
        assert len(verifier._verdicts) == 2


_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
)
_JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_CLAIM_NAMES = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "client_id", "x"]
_CLAIM_SETS = st.dictionaries(st.sampled_from(_CLAIM_NAMES), _SCALARS, max_size=9)


class TestNeverRaises:
    @settings(max_examples=150, deadline=None)
    @given(text=st.text(max_size=400))
    def test_arbitrary_text(self, env: Env, text: str) -> None:
        result = make(env).verify(text, audience=AUD)
        assert not result.valid and result.claims is None

    @settings(max_examples=150, deadline=None)
    @given(data=st.binary(max_size=400))
    def test_arbitrary_bytes(self, env: Env, data: bytes) -> None:
        assert not make(env).verify(data, audience=AUD).valid

    @settings(max_examples=150, deadline=None)
    @given(hdr=st.dictionaries(st.text(max_size=5), _JSON_VALUES, max_size=4), body=_CLAIM_SETS)
    def test_arbitrary_json_segments(
        self, env: Env, hdr: dict[str, Any], body: dict[str, Any]
    ) -> None:
        token = f"{segment(hdr)}.{segment(body)}.{b64(bytes(256))}"
        assert not make(env).verify(token, audience=AUD).valid

    @settings(max_examples=200, deadline=None)
    @given(
        position=st.integers(min_value=0),
        char=st.sampled_from(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. "
        ),
    )
    def test_no_single_character_change_of_a_valid_token_is_valid(
        self, env: Env, position: int, char: str
    ) -> None:
        token = _FIXED_TOKEN.setdefault("token", good(env))
        index = position % len(token)
        if token[index] == char:
            return
        mutated = token[:index] + char + token[index + 1 :]
        assert not make(env).verify(mutated, audience=AUD).valid


_FIXED_TOKEN: dict[str, str] = {}


def thumbprint_of(data: bytes) -> str:
    """An x5t#S256 as RFC 8705 section 3.1 spells it: base64url(SHA-256), no padding."""
    return b64(hashlib.sha256(data).digest())


CERT_A = thumbprint_of(b"DER of certificate A")
CERT_B = thumbprint_of(b"DER of certificate B")
STANDARD_ALPHABET = "+" + CERT_A[1:]  # '+' is base64, not base64url
# 43 characters: the last one carries 2 pad bits, which a canonical encoder leaves at zero.
TRAILING_BITS = CERT_A[:-1] + ("B" if CERT_A[-1] != "B" else "C")


def bound(env: Env, thumbprint: str = CERT_A, **over: Any) -> str:
    return good(env, cnf={"x5t#S256": thumbprint}, **over)


class TestCertificateBinding:
    """RFC 8705 section 3: a token with `cnf.x5t#S256` is valid only with that certificate."""

    def test_a_bound_token_with_its_thumbprint_is_valid(self, env: Env) -> None:
        result = make(env).verify(bound(env), audience=AUD, client_cert_thumbprint=CERT_A)
        assert result.valid and result.claims is not None
        assert result.claims.cert_thumbprint == CERT_A
        assert result.claims.actors == ()
        assert Claims.from_proto(result.claims.to_proto()) == result.claims
        assert ValidationResult.from_proto(result.to_proto()) == result

    @pytest.mark.parametrize("presented", [None, "", CERT_B, CERT_A[:-1], CERT_A + "A", "é" * 43])
    def test_without_or_with_another_thumbprint_it_is_certificate_mismatch(
        self, env: Env, presented: str | None
    ) -> None:
        result = make(env).verify(bound(env), audience=AUD, client_cert_thumbprint=presented)
        assert reason(result) == "CERTIFICATE_MISMATCH" and result.claims is None

    @pytest.mark.parametrize("presented", [None, "", CERT_B, "anything at all"])
    def test_an_unbound_token_ignores_the_thumbprint(self, env: Env, presented: str | None) -> None:
        result = make(env).verify(good(env), audience=AUD, client_cert_thumbprint=presented)
        assert result.valid and result.claims is not None
        assert result.claims.cert_thumbprint == ""

    @pytest.mark.parametrize(
        "cnf",
        [
            None,
            "x5t",
            [CERT_A],
            {},
            {"x5t#S256": None},
            {"x5t#S256": 42},
            {"x5t#S256": ""},
            {"x5t#S256": CERT_A + "="},  # padding
            {"x5t#S256": STANDARD_ALPHABET},
            {"x5t#S256": TRAILING_BITS},
            {"x5t#S256": b64(hashlib.sha1(b"x").digest())},  # SHA-1 length
            {"x5t#S256": b64(hashlib.sha512(b"x").digest())},
            {"x5t": b64(hashlib.sha1(b"x").digest())},  # RFC 8705 names no SHA-1 form
            {"jkt": CERT_A},  # RFC 9449 DPoP: a binding this verifier cannot check
            {"x5t#S256": CERT_A, "jkt": CERT_A},
            {"x5t#S256": CERT_A, "jwk": {"kty": "EC"}},
        ],
    )
    def test_a_cnf_that_is_not_exactly_one_x5t_s256_is_malformed(self, env: Env, cnf: Any) -> None:
        token = good(env, cnf=cnf)
        result = make(env).verify(token, audience=AUD, client_cert_thumbprint=CERT_A)
        assert reason(result) == "MALFORMED"

    def test_the_base64_forms_refused_are_refused_for_their_form(self) -> None:
        """The padded, standard-alphabet and trailing-bit values above each hold 32 bytes
        to a lenient decoder: only their spelling is wrong (one digest, one spelling)."""
        for text in (CERT_A + "=", STANDARD_ALPHABET, TRAILING_BITS):
            assert len(base64.b64decode(pad(std_alphabet(text)))) == 32

    def test_the_cache_never_lets_a_bound_token_skip_the_check(self, env: Env) -> None:
        verifier = make(env)
        token = bound(env)
        assert verifier.verify(token, audience=AUD, client_cert_thumbprint=CERT_A).valid
        assert verifier.cached_tokens == 1
        for presented in (None, CERT_B):
            result = verifier.verify(token, audience=AUD, client_cert_thumbprint=presented)
            assert reason(result) == "CERTIFICATE_MISMATCH"
        assert verifier.verify(token, audience=AUD, client_cert_thumbprint=CERT_A).valid
        assert verifier.cached_tokens == 1  # every answer above came from the one entry

    def test_a_mismatch_first_is_cached_and_the_right_certificate_still_passes(
        self, env: Env
    ) -> None:
        verifier = make(env)
        token = bound(env)
        assert reason(verifier.verify(token, audience=AUD)) == "CERTIFICATE_MISMATCH"
        assert verifier.cached_tokens == 1
        assert verifier.verify(token, audience=AUD, client_cert_thumbprint=CERT_A).valid

    def test_without_a_cache_the_same_rules_hold(self, env: Env) -> None:
        verifier = make(env, cache_size=0)
        token = bound(env)
        assert verifier.verify(token, audience=AUD, client_cert_thumbprint=CERT_A).valid
        assert reason(verifier.verify(token, audience=AUD)) == "CERTIFICATE_MISMATCH"
        assert verifier.cached_tokens == 0

    def test_which_reason_wins(self, env: Env) -> None:
        """The binding is checked after every claim (an expired or misaddressed bound token
        says so, whoever presents it) and before the scopes (a caller without the certificate
        learns nothing of what the token would be allowed)."""
        verifier = make(env)
        expired = bound(env, exp=NOW - 3600)
        assert reason(verifier.verify(expired, audience=AUD)) == "EXPIRED"
        assert reason(verifier.verify(bound(env), audience="svc-c")) == "WRONG_AUDIENCE"
        token = bound(env, scope="read")
        no_cert = verifier.verify(token, audience=AUD, required_scopes=["write"])
        assert reason(no_cert) == "CERTIFICATE_MISMATCH"
        with_cert = verifier.verify(
            token, audience=AUD, required_scopes=["write"], client_cert_thumbprint=CERT_A
        )
        assert reason(with_cert) == "INSUFFICIENT_SCOPE"

    def test_a_revoked_bound_token_is_revoked_with_or_without_its_certificate(
        self, env: Env
    ) -> None:
        revocations = RevocationSet()
        verifier = make(env, revocations=revocations)
        token = bound(env)
        revocations.add(RevocationEntry(1, jti_of(token), None, None, NOW + 900))
        for presented in (None, CERT_A):
            result = verifier.verify(token, audience=AUD, client_cert_thumbprint=presented)
            assert reason(result) == "REVOKED"


class TestErrors:
    def test_one_token_invalid_subclass_per_reason(self) -> None:
        reasons = [v for v in auth_pb2.ValidationFailure.values() if v != 0]
        classes = {error_for_reason(r) for r in reasons}
        assert len(classes) == len(reasons)
        for r in reasons:
            cls = error_for_reason(r)
            assert issubclass(cls, TokenInvalid) and cls.reason == r
            assert ValidationResult.fail(r).reason_name == auth_pb2.ValidationFailure.Name(r)

    def test_reason_name(self) -> None:
        assert ValidationResult.fail(auth_pb2.EXPIRED).reason_name == "EXPIRED"

    def test_result_invariants_are_enforced(self) -> None:
        with pytest.raises(ValueError):
            ValidationResult(True, auth_pb2.EXPIRED, None)
        with pytest.raises(ValueError):
            ValidationResult(False, auth_pb2.VALIDATION_FAILURE_UNSPECIFIED, None)

    def test_server_answer_breaking_the_invariant_fails_closed(self) -> None:
        no_claims = auth_pb2.ValidateTokenResponse(valid=True)
        assert ValidationResult.from_proto(no_claims).reason_name == "MALFORMED"
        no_reason = auth_pb2.ValidateTokenResponse(valid=False)
        assert ValidationResult.from_proto(no_reason).reason_name == "MALFORMED"

    def test_messages_hold_no_token_text(self, env: Env) -> None:
        token = good(env)
        for r in auth_pb2.ValidationFailure.values():
            if r:
                message = str(error_for_reason(r)())
                assert token not in message and jti_of(token) not in message
        assert token not in repr(make(env))


def _scope_token(name: str) -> bool:
    """RFC 6749 section 3.3's scope-token, stated character by character (not as the regex
    under test): one or more of %x21 / %x23-5B / %x5D-7E."""
    return bool(name) and all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in name)


# JSON texts near the shapes the fast paths care about: objects with or without nesting,
# whitespace around them, duplicates, trailing text, non-objects and broken text.
_JSON_TEXTS = st.one_of(
    st.builds(
        lambda value, before, after: before + json.dumps(value) + after,
        _JSON_VALUES,
        st.sampled_from(["", " ", "\n", "\t\r"]),
        st.sampled_from(["", " ", "\n", "x", "}", "{}", ",", '"']),
    ),
    st.builds(
        lambda members, dup: (
            "{"
            + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members + members[:dup])
            + "}"
        ),
        st.lists(st.tuples(st.text(max_size=3), _JSON_VALUES), max_size=4),
        st.integers(min_value=0, max_value=2),
    ),
    st.text(alphabet='{}[]":,0123456789.eE-+ ntrufalsNIy\\', max_size=24),
)


class TestShortcutsKeepTheRules:
    """The cheaper forms on the cold path equal the plain forms they replaced."""

    def test_valid_result_builds_what_the_dataclasses_build(self) -> None:
        values: dict[str, Any] = {
            "issuer": "https://iss",
            "subject": "svc-a",
            "audience": "svc-b",
            "scopes": ("read", "write"),
            "issued_at": 1,
            "not_before": 2,
            "expires_at": 3,
            "jti": "j",
            "key_id": "k",
            "client_id": "svc-c",
            "cert_thumbprint": "t",
            "actors": ("svc-d",),
        }
        # A field added to Claims fails here until valid_result sets it too.
        assert [f.name for f in dataclasses.fields(Claims)] == list(values)
        built = valid_result(**values)
        expected = ValidationResult.ok(Claims(**values))
        assert type(built) is ValidationResult and type(built.claims) is Claims
        assert built == expected and hash(built) == hash(expected)
        assert repr(built) == repr(expected)
        assert built.claims is not None
        assert dataclasses.asdict(built.claims) == values
        for obj, name in ((built, "valid"), (built.claims, "issuer")):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, name, None)
            with pytest.raises(dataclasses.FrozenInstanceError):
                delattr(obj, name)

    @settings(max_examples=400, deadline=None)
    @given(text=_JSON_TEXTS)
    def test_json_object_decodes_exactly_like_the_decoder(self, text: str) -> None:
        try:
            expected: Any = _JSON.decode(text)
        except (ValueError, RecursionError) as exc:
            with pytest.raises(type(exc)):
                _json_object(text)
        else:
            assert _json_object(text) == expected

    @pytest.mark.parametrize(
        "text", ['{"a":1,"a":2}', '{"a":{"b":1,"b":2}}', '{"a":[{"b":1,"b":2}]}', "{", '{"a":}']
    )
    def test_json_object_refuses_what_the_decoder_refuses(self, text: str) -> None:
        with pytest.raises(ValueError):
            _JSON.decode(text)
        with pytest.raises(ValueError):
            _json_object(text)

    @settings(max_examples=500, deadline=None)
    @given(
        scope=st.one_of(
            st.text(alphabet=" ab~!#[]", max_size=10),
            st.text(alphabet=' ab"\\\t\x7f\x00\u00e9', max_size=6),
        )
    )
    @example(scope="a  b")
    @example(scope=" a")
    @example(scope="a ")
    @example(scope=" ")
    @example(scope="a\tb")
    def test_one_scope_regex_equals_matching_each_name(self, scope: str) -> None:
        names = scope.split(" ") if scope else []
        each = all(_scope_token(name) for name in names)
        assert (scope == "" or SCOPE_CLAIM.fullmatch(scope) is not None) == each

    @pytest.mark.parametrize("dots", [0, 1, 3, 4, 5])
    def test_anything_but_two_dots_is_malformed(self, env: Env, dots: int) -> None:
        h, p, s = good(env).split(".")
        shaped = ".".join([h, p, s, s, s, s][: dots + 1])
        assert reason(make(env).verify(shaped, audience=AUD)) == "MALFORMED"
        assert make(env).verify(".".join([h, p, s]), audience=AUD).valid
