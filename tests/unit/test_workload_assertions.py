"""authsvc.workload.assertions with authsvc_client.assertions: a real signer, a real verifier."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.workload.assertions import (
    MAX_ASSERTION_LIFETIME,
    claimed_service_id,
    verify_assertion,
)
from authsvc.workload.errors import GENERIC_MESSAGE, Reason, WorkloadAuthError
from authsvc.workload.public_keys import RegisteredKey, key_from_jwk, parse_public_key
from authsvc_client.assertions import (
    ASSERTION_TYP,
    AssertionSigner,
    load_private_key,
)
from authsvc_client.errors import CredentialsError
from tests.support.workload import (
    b64url,
    jwk_of,
    new_ec,
    new_ed25519,
    new_rsa,
    private_pem,
    public_pem,
    sign,
)

ISSUER = "https://authsvc.test"
NOW = 1_900_000_000.0


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return new_rsa()


def registered(*keys: Any) -> list[RegisteredKey]:
    return [parse_public_key(public_pem(k)) for k in keys]


def private_jwk(key: Any, **extra: Any) -> dict[str, Any]:
    """The private JWK of an RSA or P-256 key (the public JWK plus `d`, and RSA's CRT members),
    with extra members (alg...)."""
    numbers = key.private_numbers()
    if isinstance(key, rsa.RSAPrivateKey):
        private = {
            m: b64url(v.to_bytes((v.bit_length() + 7) // 8, "big"))
            for m, v in (
                ("d", numbers.d),
                ("p", numbers.p),
                ("q", numbers.q),
                ("dp", numbers.dmp1),
                ("dq", numbers.dmq1),
                ("qi", numbers.iqmp),
            )
        }
    else:
        private = {"d": b64url(numbers.private_value.to_bytes(32, "big"))}
    return {**jwk_of(key), **private, **extra}


def key_file(folder: Path, content: dict[str, Any] | bytes, name: str = "key") -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    path.chmod(0o600)
    return str(path)


def header_of(token: str) -> dict[str, Any]:
    return dict(json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[0] + "==")))


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "orders",
        "sub": "orders",
        "aud": ISSUER,
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": "j-1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def verify(token: str, keys: list[RegisteredKey], **kw: Any) -> Any:
    return verify_assertion(
        token,
        service_id=kw.pop("service_id", "orders"),
        keys=keys,
        issuer=ISSUER,
        now=kw.pop("now", NOW),
        **kw,
    )


def reason(token: str, keys: list[RegisteredKey], **kw: Any) -> Reason:
    with pytest.raises(WorkloadAuthError) as caught:
        verify(token, keys, **kw)
    assert str(caught.value) == GENERIC_MESSAGE  # the same words whatever failed
    return caught.value.reason


class TestSignerAndVerifier:
    def test_each_key_type_round_trips(self, rsa_key: rsa.RSAPrivateKey) -> None:
        for key, alg in ((rsa_key, "RS256"), (new_ec(), "ES256"), (new_ed25519(), "EdDSA")):
            signer = AssertionSigner("orders", ISSUER, key)
            token = signer.sign_at(NOW)
            header = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[0] + "=="))
            assert header == {"alg": alg, "kid": signer.key_id, "typ": ASSERTION_TYP}
            verified = verify(token, registered(key))
            assert verified.service_id == "orders"
            assert verified.key_id == signer.key_id
            assert verified.exp == int(NOW) + 60
            assert verified.remember_jti_until == int(NOW) + 60 + 30

    def test_jti_is_fresh_128_bit(self, rsa_key: rsa.RSAPrivateKey) -> None:
        signer = AssertionSigner("orders", ISSUER, rsa_key)
        keys = registered(rsa_key)
        jtis = {verify(signer.sign_at(NOW), keys).jti for _ in range(20)}
        assert len(jtis) == 20
        assert all(len(j) >= 22 for j in jtis)  # 16 random bytes, base64url

    def test_kid_picks_the_key_among_several(self, rsa_key: rsa.RSAPrivateKey) -> None:
        ec_key = new_ec()
        keys = registered(new_ec(), rsa_key, ec_key)
        token = AssertionSigner("orders", ISSUER, ec_key).sign_at(NOW)
        assert verify(token, keys).key_id == keys[2].key_id

    def test_without_kid_each_key_is_tried(self, rsa_key: rsa.RSAPrivateKey) -> None:
        """A client library that sends no kid (or its own) still logs in during a key roll."""
        old, new = new_ec(), new_ec()
        keys = registered(old, new)
        for header in ({}, {"kid": "my-own-name"}):
            token = sign(claims(), new, "ES256", **header)
            assert verify(token, keys).key_id == keys[1].key_id

    def test_keys_tried_without_kid_are_bounded(self) -> None:
        """Without a kid at most MAX_KEYS_TRIED keys are tried (CPU per bad token is bounded);
        with its kid, any registered key is found."""
        from authsvc.workload.jws import MAX_KEYS_TRIED

        private = [new_ec() for _ in range(MAX_KEYS_TRIED + 2)]
        keys = registered(*private)
        last = private[-1]
        assert reason(sign(claims(), last, "ES256"), keys) == Reason.BAD_SIGNATURE
        assert verify(sign(claims(), last, "ES256", kid=keys[-1].key_id), keys)
        assert verify(sign(claims(), private[MAX_KEYS_TRIED - 1], "ES256"), keys)

    def test_ps256_on_an_rsa_key(self, rsa_key: rsa.RSAPrivateKey) -> None:
        assert verify(sign(claims(), rsa_key, "PS256"), registered(rsa_key)).jti == "j-1"
        pss_only = [key_from_jwk({**jwk_of(rsa_key), "alg": "PS256"})]
        signer = AssertionSigner("orders", ISSUER, rsa_key, rsa_pss=True)
        assert verify(signer.sign_at(NOW), pss_only).key_id == signer.key_id
        plain = AssertionSigner("orders", ISSUER, rsa_key).sign_at(NOW)
        assert reason(plain, pss_only) == Reason.ALGORITHM_NOT_ALLOWED
        with pytest.raises(CredentialsError, match="PS256"):
            AssertionSigner("orders", ISSUER, new_ec(), rsa_pss=True)

    def test_typ_values(self, rsa_key: rsa.RSAPrivateKey) -> None:
        keys = registered(rsa_key)
        for typ in (
            "JWT",
            "jwt",
            "client-authentication+jwt",
            "application/client-authentication+JWT",
        ):
            assert verify(sign(claims(), rsa_key, "RS256", typ=typ), keys)
        wrong: tuple[object, ...] = ("at+jwt", "application/at+jwt", "secevent+jwt", "JWS", 1)
        for bad in wrong:
            assert reason(sign(claims(), rsa_key, "RS256", typ=bad), keys) == Reason.WRONG_TYPE

    def test_claimed_service_id(self, rsa_key: rsa.RSAPrivateKey) -> None:
        assert claimed_service_id(AssertionSigner("orders", ISSUER, rsa_key).sign()) == "orders"
        assert claimed_service_id("not.a.jwt") is None
        assert claimed_service_id(sign(claims(sub=7), rsa_key, "RS256")) is None


class TestClaims:
    def test_time_window(self, rsa_key: rsa.RSAPrivateKey) -> None:
        keys = registered(rsa_key)
        token = sign(claims(), rsa_key, "RS256")
        assert verify(token, keys, now=NOW + 60 + 29)  # within the leeway
        assert reason(token, keys, now=NOW + 60 + 30) == Reason.EXPIRED
        assert reason(token, keys, now=NOW - 31) == Reason.ISSUED_IN_FUTURE
        edge = sign(claims(exp=int(NOW) + MAX_ASSERTION_LIFETIME + 30), rsa_key, "RS256")
        assert verify(edge, keys)
        far = sign(claims(exp=int(NOW) + MAX_ASSERTION_LIFETIME + 31), rsa_key, "RS256")
        assert reason(far, keys) == Reason.LIFETIME_TOO_LONG
        later = sign(claims(nbf=int(NOW) + 31), rsa_key, "RS256")
        assert reason(later, keys) == Reason.NOT_YET_VALID

    def test_required_and_typed(self, rsa_key: rsa.RSAPrivateKey) -> None:
        keys = registered(rsa_key)
        cases = {
            Reason.MISSING_CLAIM: [claims(exp=None), claims(iat=None), claims(jti=None)],
            Reason.MALFORMED: [claims(exp="1900000060"), claims(iat=True), claims(exp=10**400)],
            Reason.BAD_JTI: [
                claims(jti=""),
                claims(jti="x" * 257),
                claims(jti=5),
                claims(jti="a\nb"),
            ],
            Reason.WRONG_ISSUER: [claims(iss="billing"), claims(iss=None)],
            Reason.WRONG_SUBJECT: [claims(sub="billing"), claims(sub=None)],
        }
        for expected, payloads in cases.items():
            for payload in payloads:
                assert reason(sign(payload, rsa_key, "RS256"), keys) == expected, payload
        assert verify(sign(claims(jti="x" * 256), rsa_key, "RS256"), keys)

    def test_malformed_tokens(self, rsa_key: rsa.RSAPrivateKey) -> None:
        keys = registered(rsa_key)
        good = sign(claims(), rsa_key, "RS256")
        h, p, s = good.split(".")
        for token in (
            "",
            "a.b",
            f"{h}.{p}",
            f"{h}.{p}.{s}.x",
            f"{h}=.{p}.{s}",
            f"{b64url(b'[]')}.{p}.{s}",
        ):
            assert reason(token, keys) == Reason.MALFORMED, token
        assert reason("a" * 9000, keys) == Reason.TOO_LARGE
        crit = sign(claims(), rsa_key, "RS256", crit=["exp"], exp=1)
        assert reason(crit, keys) == Reason.UNSUPPORTED_HEADER

    def test_no_registered_key(self, rsa_key: rsa.RSAPrivateKey) -> None:
        assert reason(sign(claims(), rsa_key, "RS256"), []) == Reason.NO_KEY


class TestKeyFile:
    def test_pem_and_jwk_files(self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
        ec_key = new_ec()
        numbers = ec_key.private_numbers()
        private_jwk = {**jwk_of(ec_key), "d": b64url(numbers.private_value.to_bytes(32, "big"))}
        for name, content, key in (
            ("rsa.pem", private_pem(rsa_key), rsa_key),
            ("ec.jwk", json.dumps(private_jwk).encode(), ec_key),
        ):
            path = tmp_path / name
            path.write_bytes(content)
            path.chmod(0o600)
            signer = AssertionSigner.from_file(str(path), service_id="orders", issuer=ISSUER)
            assert verify(signer.sign_at(NOW), registered(key))

    def test_rsa_jwk_without_crt_members(self, rsa_key: rsa.RSAPrivateKey) -> None:
        d = rsa_key.private_numbers().d
        jwk = {**jwk_of(rsa_key), "d": b64url(d.to_bytes((d.bit_length() + 7) // 8, "big"))}
        key = load_private_key(json.dumps(jwk).encode())
        token = AssertionSigner("orders", ISSUER, key).sign_at(NOW)
        assert verify(token, registered(rsa_key))

    def test_ed25519_jwk_whose_x_does_not_match_d(self) -> None:
        key, other = new_ed25519(), new_ed25519()
        from cryptography.hazmat.primitives import serialization

        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        jwk = {**jwk_of(other), "d": b64url(raw)}
        with pytest.raises(CredentialsError, match="not an RSA"):
            load_private_key(json.dumps(jwk).encode())

    def test_file_readable_by_others_is_refused(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        path = tmp_path / "key.pem"
        path.write_bytes(private_pem(rsa_key))
        for mode in (0o640, 0o604, 0o660):
            os.chmod(path, mode)
            with pytest.raises(CredentialsError, match="group or others") as caught:
                AssertionSigner.from_file(str(path), service_id="orders", issuer=ISSUER)
            assert "AUTHSVC_SERVICE_KEY_FILE" in str(caught.value)

    def test_wrong_content_is_refused_without_echo(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        path = tmp_path / "key"
        small = new_rsa(1024)
        cases = {
            public_pem(rsa_key): "no private key",
            b"": "empty",
            b"{}": "no private key",
            private_pem(small): "2048",
            private_pem(
                new_ec(
                    __import__(
                        "cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ec"]
                    ).SECP384R1()
                )
            ): "P-256",
            b"{ nope": "neither PEM nor a JWK",
        }
        for content, message in cases.items():
            path.write_bytes(content)
            path.chmod(0o600)
            with pytest.raises(CredentialsError, match=message) as caught:
                AssertionSigner.from_file(str(path), service_id="orders", issuer=ISSUER)
            assert "MII" not in str(caught.value)
        with pytest.raises(CredentialsError, match="cannot read"):
            AssertionSigner.from_file(str(tmp_path / "missing"), service_id="o", issuer=ISSUER)

    def test_encrypted_pem_is_refused(self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization

        path = tmp_path / "enc.pem"
        path.write_bytes(
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        path.chmod(0o600)
        with pytest.raises(CredentialsError, match="encrypted"):
            AssertionSigner.from_file(str(path), service_id="orders", issuer=ISSUER)

    def test_an_rsa_jwk_with_alg_ps256_signs_ps256(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        """The key authsvc pinned to PS256 (its public JWK registered with alg PS256) logs in:
        from_file used to ignore the JWK's alg and sign RS256, refused by that pin."""
        path = key_file(tmp_path, private_jwk(rsa_key, alg="PS256"))
        signer = AssertionSigner.from_file(path, service_id="orders", issuer=ISSUER)
        assert signer.rsa_pss and signer.algorithm == "PS256"
        token = signer.sign_at(NOW)
        assert header_of(token) == {"alg": "PS256", "kid": signer.key_id, "typ": ASSERTION_TYP}
        decoded = jwt.decode(
            token,
            rsa_key.public_key(),
            algorithms=["PS256"],
            audience=ISSUER,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert decoded["sub"] == "orders"
        pss_only = [key_from_jwk({**jwk_of(rsa_key), "alg": "PS256"})]
        assert verify(token, pss_only).key_id == signer.key_id

    @pytest.mark.parametrize("alg", ["RS256", None])
    def test_an_rsa_jwk_with_alg_rs256_or_none_signs_rs256(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, alg: str | None
    ) -> None:
        jwk = private_jwk(rsa_key) if alg is None else private_jwk(rsa_key, alg=alg)
        signer = AssertionSigner.from_file(
            key_file(tmp_path, jwk), service_id="orders", issuer=ISSUER
        )
        assert not signer.rsa_pss
        token = signer.sign_at(NOW)
        assert header_of(token)["alg"] == "RS256"
        assert verify(token, [key_from_jwk(jwk_of(rsa_key, alg="RS256"))])

    def test_an_ec_jwk_with_its_own_alg(self, tmp_path: Path) -> None:
        ec_key = new_ec()
        path = key_file(tmp_path, private_jwk(ec_key, alg="ES256"))
        signer = AssertionSigner.from_file(path, service_id="orders", issuer=ISSUER)
        assert header_of(signer.sign_at(NOW))["alg"] == "ES256"

    @pytest.mark.parametrize(
        ("kind", "alg", "shown"),
        [
            ("rsa", "ES256", "ES256"),
            ("rsa", "HS256", "HS256"),
            ("rsa", "none", "none"),
            ("rsa", "RS512", "RS512"),
            ("rsa", "EdDSA", "EdDSA"),
            ("rsa", "ps256", None),
            ("rsa", "something-unknown", None),
            ("rsa", "", None),
            ("rsa", 256, None),
            ("rsa", ["PS256"], None),
            ("ec", "RS256", "RS256"),
            ("ec", "PS256", "PS256"),
            ("ec", "HS256", "HS256"),
        ],
    )
    def test_an_alg_that_does_not_fit_the_key_is_refused(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, kind: str, alg: Any, shown: str | None
    ) -> None:
        key = rsa_key if kind == "rsa" else new_ec()
        jwk = private_jwk(key, alg=alg)
        path = key_file(tmp_path, jwk)
        with pytest.raises(CredentialsError) as caught:
            AssertionSigner.from_file(path, service_id="orders", issuer=ISSUER)
        message = str(caught.value)
        assert message.startswith("AUTHSVC_SERVICE_KEY_FILE: the JWK's 'alg'")
        expected = "RS256 or PS256" if kind == "rsa" else "ES256"
        assert f"use {expected}, or leave 'alg' out" in message
        if shown is not None:
            assert f"({shown})" in message
        else:
            assert "(" not in message  # an unknown value is not repeated
        members = [str(v) for m, v in jwk.items() if m not in ("kty", "alg")]
        echoed = any(len(v) > 8 and v in message for v in members)
        assert not echoed, "the refusal repeats key material"
        # load_private_key applies the same rule: one loader, one verdict.
        with pytest.raises(CredentialsError, match="'alg'"):
            load_private_key(json.dumps(jwk).encode())

    def test_a_pem_has_no_alg_rsa_pss_chooses_ps256(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        path = key_file(tmp_path, private_pem(rsa_key), "rsa.pem")
        default = AssertionSigner.from_file(path, service_id="orders", issuer=ISSUER)
        assert header_of(default.sign_at(NOW))["alg"] == "RS256"
        pss = AssertionSigner.from_file(path, service_id="orders", issuer=ISSUER, rsa_pss=True)
        token = pss.sign_at(NOW)
        assert header_of(token)["alg"] == "PS256"
        assert verify(token, [key_from_jwk({**jwk_of(rsa_key), "alg": "PS256"})])
        ec_path = key_file(tmp_path, private_pem(new_ec()), "ec.pem")
        with pytest.raises(CredentialsError, match="AUTHSVC_SERVICE_KEY_FILE: PS256 needs an RSA"):
            AssertionSigner.from_file(ec_path, service_id="orders", issuer=ISSUER, rsa_pss=True)
        ec_signer = AssertionSigner.from_file(
            ec_path, service_id="orders", issuer=ISSUER, rsa_pss=False
        )
        assert ec_signer.algorithm == "ES256"

    def test_rsa_pss_must_agree_with_the_jwks_alg(
        self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        for alg, rsa_pss in (("RS256", True), ("PS256", False)):
            path = key_file(tmp_path, private_jwk(rsa_key, alg=alg))
            with pytest.raises(CredentialsError, match=f"'alg' is {alg}, not "):
                AssertionSigner.from_file(path, service_id="o", issuer=ISSUER, rsa_pss=rsa_pss)
        path = key_file(tmp_path, private_jwk(rsa_key, alg="PS256"))
        agreed = AssertionSigner.from_file(path, service_id="o", issuer=ISSUER, rsa_pss=True)
        assert agreed.algorithm == "PS256"
        unpinned = key_file(tmp_path, private_jwk(rsa_key), "unpinned")
        forced = AssertionSigner.from_file(unpinned, service_id="o", issuer=ISSUER, rsa_pss=True)
        assert forced.algorithm == "PS256"

    def test_signer_repr_hides_the_key(self, rsa_key: rsa.RSAPrivateKey) -> None:
        text = repr(AssertionSigner("orders", ISSUER, rsa_key))
        assert "orders" in text and "private_key" not in text and "RSAPrivateKey" not in text
