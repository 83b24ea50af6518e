"""Promise: only canonical compact JWS validates; re-encoded, oversized, nested, duplicated, BOM,
surrogate, NUL, JWE and JSON-serialised inputs are refused with a reason, never an error, and a
revoked token stays REVOKED however it is respelled (RFC 7515 section 2 and appendix C)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from tests.security.forge import (
    Target,
    attacker_key,
    b64url,
    claims,
    header,
    rpc_code,
    segment,
    sign,
)

pytestmark = pytest.mark.usefixtures("after_each_batch")

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
PARTS = {"header": 0, "payload": 1, "signature": 2}


def _std(seg: str) -> str | None:
    if "-" not in seg and "_" not in seg:
        return None
    return seg.replace("-", "+").replace("_", "/")


def _trailing_bits(seg: str) -> str | None:
    if len(seg) % 4 == 0:
        return None
    last = ALPHABET.index(seg[-1])
    return seg[:-1] + ALPHABET[last | 1]


RESPELLINGS: dict[str, Callable[[str], str | None]] = {
    "padding": lambda s: s + "=" * (-len(s) % 4) if len(s) % 4 else s + "==",
    "standard-alphabet": _std,
    "nonzero-trailing-bits": _trailing_bits,
    "trailing-space": lambda s: s + " ",
    "trailing-newline": lambda s: s + "\n",
    "embedded-newline": lambda s: s[:10] + "\n" + s[10:],
    "trailing-junk": lambda s: s + "!",
    "leading-junk": lambda s: "*" + s,
    "embedded-junk": lambda s: s[:4] + "%" + s[4:],
}


def respell(token: str, part: str, how: str) -> str | None:
    segments = token.split(".")
    new = RESPELLINGS[how](segments[PARTS[part]])
    if new is None:
        return None
    segments[PARTS[part]] = new
    return ".".join(segments)


def respellable(target: Target, part: str, how: str) -> tuple[str, str]:
    """A genuine token and its respelling (some tokens lack the characters a rule needs)."""
    for _ in range(20):
        token = target.genuine()
        variant = respell(token, part, how)
        if variant is not None:
            return token, variant
    if part == "payload":
        # Six '~' hold an aligned 0x7e7e7e group, which base64url spells "fn5-".
        token = target.forge(x="~~~~~~")
        variant = respell(token, part, how)
        if variant is not None:
            return token, variant
    pytest.skip(f"the {part} of issued tokens never allows {how}")


# An issued token's header is fixed per key and its base64url has no '-' or '_' to respell in
# the standard alphabet; padding and trailing bits cover respelling the header.
CASES = [
    (part, how)
    for part in PARTS
    for how in RESPELLINGS
    if (part, how) != ("header", "standard-alphabet")
]


class TestNonCanonicalBase64url:
    @pytest.mark.parametrize(("part", "how"), CASES)
    def test_respelled_genuine_token_is_malformed(
        self, target: Target, part: str, how: str
    ) -> None:
        token, variant = respellable(target, part, how)
        assert target.validate(token).valid
        assert target.reason(variant) == "MALFORMED"

    @pytest.mark.parametrize(("part", "how"), CASES)
    def test_revoked_token_stays_revoked_in_any_respelling(
        self, target: Target, part: str, how: str
    ) -> None:
        token, variant = respellable(target, part, how)
        assert target.revoke(token)
        assert target.reason(token) == "REVOKED"
        assert target.reason(variant) == "REVOKED"
        # Presenting a respelling must not fail either, and must never un-revoke.
        target.revoke(variant)
        assert target.reason(token) == "REVOKED"


def _signed_raw(target: Target, hdr: bytes | str | None, body: bytes | str) -> str:
    key = target.active_key()
    return sign(key.private, header(key.kid) if hdr is None else hdr, body)


def _claims_json(**over: object) -> str:
    return json.dumps(claims(**over), separators=(",", ":"))


class TestHostileJson:
    def test_deeply_nested_claim_is_malformed(self, target: Target) -> None:
        body = _claims_json()[:-1] + ',"x":' + "[" * 2500 + "]" * 2500 + "}"
        token = _signed_raw(target, None, body)
        assert len(token) < 8192
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)

    def test_deeply_nested_objects_in_the_header_are_malformed(self, target: Target) -> None:
        kid = target.active_key().kid
        hdr = json.dumps(header(kid))[:-1] + ',"x":' + "[" * 2000 + "]" * 2000 + "}"
        assert target.reason(_signed_raw(target, hdr, _claims_json())) == "MALFORMED"

    @pytest.mark.parametrize("number", ["1" * 4400, "1e400", "-1e400", "NaN", "Infinity"])
    def test_huge_or_non_finite_numbers_are_malformed(self, target: Target, number: str) -> None:
        body = _claims_json(exp=0).replace('"exp":0', f'"exp":{number}')
        assert target.reason(_signed_raw(target, None, body)) == "MALFORMED"
        assert not target.revoke(_signed_raw(target, None, body))

    def test_huge_payload_under_the_limit_is_answered_not_an_error(self, target: Target) -> None:
        many = {f"m{i}": i for i in range(300)}
        token = _signed_raw(target, None, json.dumps({**claims(), **many}))
        assert len(token) < 8192
        assert target.validate(token).valid  # genuinely signed; extra claims are ignored
        forged = sign(attacker_key(), header(target.active_key().kid), {**claims(), **many})
        assert target.reason(forged) == "BAD_SIGNATURE"

    def test_payload_over_the_limit_is_invalid_argument(self, target: Target) -> None:
        token = _signed_raw(target, None, json.dumps({**claims(), "pad": "x" * 9000}))
        for call in (target.validate, target.revoke):
            with pytest.raises(grpc.RpcError) as excinfo:
                call(token)
            assert rpc_code(excinfo.value) == grpc.StatusCode.INVALID_ARGUMENT

    @pytest.mark.parametrize(
        "duplicate",
        [
            '"sub":"admin"',
            '"aud":"authsvc"',
            '"scope":"authsvc.admin"',
            '"iss":"https://evil.invalid"',
            '"exp":9999999999',
            '"\\u0073ub":"admin"',  # the same name spelled with an escape
        ],
    )
    def test_duplicate_claim_names_are_malformed(self, target: Target, duplicate: str) -> None:
        for body in (
            _claims_json()[:-1] + "," + duplicate + "}",
            "{" + duplicate + "," + _claims_json()[1:],
        ):
            assert target.reason(_signed_raw(target, None, body)) == "MALFORMED"

    @pytest.mark.parametrize(
        "duplicate", ['"alg":"none"', '"kid":"other"', '"typ":"JWT"', '"alg":"RS256"']
    )
    def test_duplicate_header_names_are_malformed(self, target: Target, duplicate: str) -> None:
        hdr = json.dumps(header(target.active_key().kid), separators=(",", ":"))
        assert target.reason(
            _signed_raw(target, hdr[:-1] + "," + duplicate + "}", _claims_json())
        ) == ("MALFORMED")

    @pytest.mark.parametrize("part", ["header", "payload"])
    def test_utf8_bom_is_malformed(self, target: Target, part: str) -> None:
        kid = target.active_key().kid
        hdr = json.dumps(header(kid)).encode()
        body = _claims_json().encode()
        if part == "header":
            hdr = b"\xef\xbb\xbf" + hdr
        else:
            body = b"\xef\xbb\xbf" + body
        token = _signed_raw(target, hdr, body)
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)

    @pytest.mark.parametrize(
        "raw",
        [
            b'"sub":"\\ud800"',
            b'"sub":"orders\\udfff"',
            b'"aud":"\\udc00billing"',
            b'"jti":"\\ud83d"',
            b'"scope":"billing.read \\ud800"',
            b'"sub":"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes (CESU-8)
            b'"sub":"\xc0\xaf"',  # overlong encoding
            b'"sub":"\xff"',
        ],
    )
    def test_lone_surrogates_and_invalid_utf8_are_malformed(
        self, target: Target, raw: bytes
    ) -> None:
        name = raw.split(b'"')[1].decode()
        body = json.dumps(claims(**{name: "PLACEHOLDER"})).encode()
        body = body.replace(b'"' + name.encode() + b'": "PLACEHOLDER"', raw)
        assert b"PLACEHOLDER" not in body
        token = _signed_raw(target, None, body)
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)

    def test_escaped_surrogate_pair_is_fine(self, target: Target) -> None:
        body = _claims_json(sub="X", client_id="X").replace('"X"', '"orders\\ud83d\\ude00"')
        response = target.validate(_signed_raw(target, None, body))
        assert response.valid and response.claims.subject == "orders\U0001f600"

    @pytest.mark.parametrize(
        ("claim", "expected"),
        [("iss", "WRONG_ISSUER"), ("aud", "WRONG_AUDIENCE"), ("scope", "MALFORMED")],
    )
    def test_nul_in_a_claim_never_truncates_it(
        self, target: Target, claim: str, expected: str
    ) -> None:
        # NUL-terminated comparison would read "billing\0x" as "billing".
        value = {
            "iss": claims()["iss"] + "\u0000x",
            "aud": "billing\u0000x",
            "scope": "billing.read\u0000x",
        }
        token = _signed_raw(target, None, json.dumps(claims(**{claim: value[claim]})))
        assert target.reason(token, scopes=["billing.read"]) == expected

    def test_nul_in_the_subject_round_trips_exactly(self, target: Target) -> None:
        subject = "orders\u0000admin"
        token = _signed_raw(target, None, json.dumps(claims(sub=subject, client_id=subject)))
        response = target.validate(token)  # signed by authsvc's own key: valid, exactly as signed
        assert response.valid and response.claims.subject == subject
        forged = sign(attacker_key(), header(target.active_key().kid), claims(sub=subject))
        assert target.reason(forged) == "BAD_SIGNATURE"
        assert not target.revoke(forged)

    @pytest.mark.parametrize(
        "token", ["\u0000", "a.b.\u0000", "\u0000.\u0000.\u0000", "é.é.é", "\ufeff"]
    )
    def test_nul_and_non_ascii_token_text_is_malformed(self, target: Target, token: str) -> None:
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)


class TestOtherSerialisations:
    def test_jwe_compact_is_malformed(self, target: Target) -> None:
        hdr = segment({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": target.active_key().kid})
        parts = [hdr, *(b64url(secrets.token_bytes(n)) for n in (256, 12, 64, 16))]
        token = ".".join(parts)
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)

    def test_jwe_dir_with_a_genuine_payload_in_the_ciphertext_slot_is_malformed(
        self, target: Target
    ) -> None:
        h, p, s = target.genuine().split(".")
        token = ".".join([h, "", p, s, b64url(b"\x00" * 16)])
        assert target.reason(token) == "MALFORMED"

    @pytest.mark.parametrize("flattened", [True, False])
    def test_json_serialised_jws_of_a_genuine_token_is_malformed(
        self, target: Target, flattened: bool
    ) -> None:
        h, p, s = target.genuine().split(".")
        if flattened:
            token = json.dumps({"payload": p, "protected": h, "signature": s})
        else:
            token = json.dumps({"payload": p, "signatures": [{"protected": h, "signature": s}]})
        assert target.reason(token) == "MALFORMED"
        assert not target.revoke(token)

    @pytest.mark.parametrize(
        "wrap",
        [
            "Bearer {t}",
            "{t}.",
            ".{t}",
            "{t}..",
            "{t} ",
            " {t}",
            "{t}\n",
            '"{t}"',
            "{h}.{p}",
            "{h}..{s}",
            ".{p}.{s}",
        ],
    )
    def test_wrapped_or_truncated_genuine_token_is_malformed(
        self, target: Target, wrap: str
    ) -> None:
        t = target.genuine()
        h, p, s = t.split(".")
        variant = wrap.format(t=t, h=h, p=p, s=s)
        response = target.validate(variant)
        assert not response.valid
        assert response.reason == auth_pb2.MALFORMED
