"""RFC 7523 `private_key_jwt` client assertions: sign them with a service's own private key.

A service that holds a private key (`AUTHSVC_SERVICE_KEY_FILE`, PEM or JWK) proves itself to
authsvc with a short JWT it signs for each login, instead of a shared secret. The key id is
the RFC 7638 thumbprint of the public key, the same id authsvc gives the registered key
(`authsvc.workload.public_keys` computes it with `jwk_thumbprint` below: one rule, one place).

A private JWK's `alg` member chooses the algorithm as it does on the server: an RSA JWK with
`"alg": "PS256"` signs PS256 (authsvc pins a public JWK registered so to PS256), `"RS256"` or
no `alg` signs RS256; an `alg` its key cannot sign with is refused, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authsvc_client._b64 import b64url_decode, b64url_encode, b64url_uint
from authsvc_client.errors import CredentialsError

__all__ = [
    "ALGORITHMS_BY_KTY",
    "ASSERTION_LIFETIME",
    "ASSERTION_TYP",
    "CLIENT_ASSERTION_TYPE",
    "ENV_SERVICE_KEY_FILE",
    "AssertionSigner",
    "PrivateKey",
    "PublicKey",
    "algorithm_for",
    "jwk_thumbprint",
    "load_private_key",
    "public_jwk",
    "read_private_file",
]

ENV_SERVICE_KEY_FILE = "AUTHSVC_SERVICE_KEY_FILE"
# RFC 7523 section 2.2: the value of client_assertion_type beside client_assertion.
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# rfc7523bis section 4 explicit typing (media type application/client-authentication+jwt): an
# assertion cannot be mistaken for any other JWT the same key might sign.
ASSERTION_TYP = "client-authentication+jwt"
# Seconds an assertion is valid: enough for one login across a slow network, far below the
# server's five-minute ceiling, so a leaked assertion is worth little (and its jti is single-use).
ASSERTION_LIFETIME = 60

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_P256_SIZE = 32
_MIN_RSA_BITS = 2048
# The algorithms authsvc accepts for each JWK `kty`: what a private JWK's `alg` may say here,
# and what the server pins a registered public key to (authsvc.workload.public_keys). One table.
ALGORITHMS_BY_KTY: Mapping[str, tuple[str, ...]] = {
    "RSA": ("RS256", "PS256"),
    "EC": ("ES256",),
    "OKP": ("EdDSA",),
}
# JOSE algorithm names (RFC 7518, RFC 8037) a refusal may repeat: anything else in `alg` is
# not echoed (it could be a pasted secret).
_JOSE_NAMES = frozenset(
    {"none", "EdDSA", "ES256K"}
    | {f"{family}{bits}" for family in ("HS", "RS", "ES", "PS") for bits in (256, 384, 512)}
)


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """The RFC 7638 section 3.2 required members of a public key, canonically encoded.

    RSA: e, kty, n as Base64urlUInt (minimal octets). EC P-256: crv, kty, x, y as the full
    32 octets each (RFC 7518 section 6.2.1.2). Ed25519: crv, kty, x (RFC 8037 section 2).

    Raises:
        ValueError: the key is of a type or curve authsvc does not accept.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)}
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise ValueError("only EC keys on P-256 are accepted")
        point = public_key.public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url_encode(point.x.to_bytes(_P256_SIZE, "big")),
            "y": b64url_encode(point.y.to_bytes(_P256_SIZE, "big")),
        }
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
    raise ValueError("only RSA, EC P-256 and Ed25519 keys are accepted")


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url): the key id both sides derive from the key.

    Section 3: the required members only, in lexicographic order, no whitespace, UTF-8.
    """
    canonical = json.dumps(public_jwk(public_key), separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def algorithm_for(key: PrivateKey | PublicKey) -> str:
    """The one algorithm a key signs with: pinned by its type, as the server pins it."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES256"
    return "EdDSA"


def read_private_file(path_text: str, variable: str) -> bytes:
    """The bytes of a file holding a private credential, refused unless only its owner can
    read it (the same rule as the secret file: a key others can read is already shared).

    Raises:
        CredentialsError: the file is missing, unreadable, empty or open to group/others. The
            message names the variable, never the path's contents.
    """
    path = Path(path_text)
    try:
        info = path.stat()
    except OSError:
        raise CredentialsError(f"{variable}: cannot read the file") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"{variable}: the file is accessible by group or others; "
            "make it readable by its owner only (chmod 600)"
        )
    try:
        data = path.read_bytes()
    except OSError:
        raise CredentialsError(f"{variable}: cannot read the file") from None
    if not data.strip():
        raise CredentialsError(f"{variable}: the file is empty")
    return data


def _checked(key: object, variable: str) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CredentialsError(f"{variable}: RSA keys must have at least 2048 bits")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CredentialsError(f"{variable}: EC keys must be on the P-256 curve")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise CredentialsError(f"{variable}: the key must be RSA, EC P-256 or Ed25519")


def _jwk_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(name)
    return int.from_bytes(b64url_decode(value), "big")


def _jwk_bytes(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(name)
    return b64url_decode(value)


def _private_from_jwk(jwk: Mapping[str, Any]) -> object:
    kty = jwk.get("kty")
    if kty == "RSA":
        n, e, d = (_jwk_int(jwk, m) for m in ("n", "e", "d"))
        public = rsa.RSAPublicNumbers(e, n)
        if all(isinstance(jwk.get(m), str) for m in ("p", "q", "dp", "dq", "qi")):
            p, q, dp, dq, qi = (_jwk_int(jwk, m) for m in ("p", "q", "dp", "dq", "qi"))
        else:  # RFC 7518 section 6.3.2: the CRT members are optional together
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            dp, dq, qi = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
        return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key()
    if kty == "EC":
        if jwk.get("crv") != "P-256":
            raise ValueError("crv")
        xb, yb, db = (_jwk_bytes(jwk, m) for m in ("x", "y", "d"))
        if len(xb) != _P256_SIZE or len(yb) != _P256_SIZE or len(db) != _P256_SIZE:
            raise ValueError("size")
        point = ec.EllipticCurvePublicNumbers(
            int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), ec.SECP256R1()
        )
        return ec.EllipticCurvePrivateNumbers(int.from_bytes(db, "big"), point).private_key()
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise ValueError("crv")
        private_ed = ed25519.Ed25519PrivateKey.from_private_bytes(_jwk_bytes(jwk, "d"))
        given = _jwk_bytes(jwk, "x")
        derived = private_ed.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if given != derived:
            raise ValueError("x")
        return private_ed
    raise ValueError("kty")


def _jwk_algorithm(jwk: Mapping[str, Any], variable: str) -> str | None:
    """The JWK's `alg` if its key type signs with it, None if it has none.

    Raises:
        CredentialsError: an `alg` this key cannot sign with (another type's, HMAC, `none`, an
            unknown name, not a string). Only a JOSE algorithm name is repeated in the message.
    """
    alg = jwk.get("alg")
    if alg is None:
        return None
    kty = str(jwk.get("kty"))
    allowed = ALGORITHMS_BY_KTY[kty]
    if isinstance(alg, str) and alg in allowed:
        return alg
    named = f" ({alg})" if isinstance(alg, str) and alg in _JOSE_NAMES else ""
    raise CredentialsError(
        f"{variable}: the JWK's 'alg'{named} is not an algorithm its {kty} key signs with; "
        f"use {' or '.join(allowed)}, or leave 'alg' out"
    )


def _load_key(data: bytes, variable: str) -> tuple[PrivateKey, str | None]:
    """The key and, for a JWK, the algorithm its `alg` chose (None: a PEM or no `alg`)."""
    text = data.strip()
    if text.startswith(b"{"):
        try:
            jwk = json.loads(text)
        except ValueError:
            raise CredentialsError(f"{variable}: the file is neither PEM nor a JWK") from None
        if not isinstance(jwk, dict) or "d" not in jwk:
            raise CredentialsError(f"{variable}: the JWK holds no private key (no 'd' member)")
        try:
            key = _private_from_jwk(jwk)
        except (ValueError, TypeError):
            raise CredentialsError(
                f"{variable}: the JWK is not an RSA, EC P-256 or Ed25519 private key"
            ) from None
        checked = _checked(key, variable)
        return checked, _jwk_algorithm(jwk, variable)
    if b"PRIVATE KEY-----" not in text:
        raise CredentialsError(f"{variable}: the file holds no private key (PEM or JWK)")
    try:
        pem_key = serialization.load_pem_private_key(text, password=None)
    except TypeError:
        raise CredentialsError(f"{variable}: encrypted private keys are not supported") from None
    except ValueError:
        raise CredentialsError(f"{variable}: the PEM private key cannot be read") from None
    return _checked(pem_key, variable), None


def load_private_key(data: bytes, variable: str = ENV_SERVICE_KEY_FILE) -> PrivateKey:
    """A signing key from PEM (PKCS#8, PKCS#1 or SEC1, unencrypted) or a private JWK.

    Raises:
        CredentialsError: not a private key of an accepted type (RSA >= 2048, EC P-256,
            Ed25519), or a JWK whose `alg` its key cannot sign with. The message names the
            variable, never any key material.
    """
    return _load_key(data, variable)[0]


@dataclass(frozen=True)
class AssertionSigner:
    """Signs one fresh assertion per login: `iss` = `sub` = the service id, `aud` = authsvc's
    issuer as one string (rfc7523bis), a 128-bit random `jti`, `exp` 60 s after `iat`.

    The key type fixes the algorithm (RS256, ES256, EdDSA; `rsa_pss` picks PS256 for an RSA
    key registered with `"alg": "PS256"`) and `kid` is its RFC 7638 thumbprint, so authsvc
    picks the registered key without trying the others. `from_file` sets `rsa_pss` from a
    private JWK's `alg`.
    """

    service_id: str
    issuer: str
    private_key: PrivateKey = field(repr=False)
    lifetime: int = ASSERTION_LIFETIME
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    rsa_pss: bool = False

    def __post_init__(self) -> None:
        if not self.service_id or not self.issuer:
            raise CredentialsError("an assertion needs a service id and authsvc's issuer")
        if not 0 < self.lifetime <= 300:
            raise CredentialsError("an assertion lifetime is 1 to 300 seconds")
        if self.rsa_pss and not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise CredentialsError("PS256 needs an RSA key")

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        service_id: str,
        issuer: str,
        variable: str = ENV_SERVICE_KEY_FILE,
        rsa_pss: bool | None = None,
    ) -> AssertionSigner:
        """A signer over the key in `path`, refused if the file is open to group or others.

        The algorithm: a private JWK's `alg` decides (an RSA JWK with `"alg": "PS256"` signs
        PS256; `"RS256"` or no `alg` signs RS256; EC ES256, Ed25519 EdDSA), so the file can be
        the registered public JWK plus its private members. An `alg` the key cannot sign with
        is refused (CredentialsError), never replaced by the default.

        A PEM key carries no algorithm: an RSA PEM signs RS256. To sign PS256 with it (its
        public key registered with `"alg": "PS256"`), pass `rsa_pss=True` here, or, through
        `AUTHSVC_SERVICE_KEY_FILE` (which has no setting of its own for this), give the key
        as a private JWK with `"alg": "PS256"`. An RSA key registered without `alg` (or as
        PEM) accepts both, so RS256 needs nothing. `rsa_pss` True/False forces PS256/RS256;
        it must agree with a JWK's `alg` when there is one.

        Raises:
            CredentialsError: the file is unreadable, open to group or others, not an accepted
                private key, its `alg` does not fit the key, or `rsa_pss` contradicts it.
        """
        key, alg = _load_key(read_private_file(path, variable), variable)
        if rsa_pss is None:
            rsa_pss = alg == "PS256"
        elif alg is not None and (alg == "PS256") != rsa_pss:
            asked = "PS256" if rsa_pss else "RS256"
            raise CredentialsError(f"{variable}: the JWK's 'alg' is {alg}, not {asked}")
        elif rsa_pss and not isinstance(key, rsa.RSAPrivateKey):
            raise CredentialsError(f"{variable}: PS256 needs an RSA key")
        return cls(service_id, issuer, key, rsa_pss=rsa_pss)

    @cached_property
    def key_id(self) -> str:
        return jwk_thumbprint(self.private_key.public_key())

    @property
    def algorithm(self) -> str:
        if self.rsa_pss and isinstance(self.private_key, rsa.RSAPrivateKey):
            return "PS256"
        return algorithm_for(self.private_key)

    def sign(self) -> str:
        return self.sign_at(self.clock())

    def sign_at(self, now: float) -> str:
        """An assertion issued at `now` (the clock twin, so tests can sign in the past)."""
        issued = int(now)
        claims = {
            "iss": self.service_id,
            "sub": self.service_id,
            "aud": self.issuer,
            "iat": issued,
            "exp": issued + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(
            claims,
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": self.key_id, "typ": ASSERTION_TYP},
        )
