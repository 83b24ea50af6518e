"""Public keys a service registers to sign its assertions (and those of trusted issuers).

Accepted: RSA of at least 2048 bits, EC on P-256, Ed25519, given as a JWK (RFC 7517) or a PEM
public key. Each key gets a stable id, its RFC 7638 thumbprint (the same function the client
uses for its `kid`), and the algorithms its type allows: RSA RS256/PS256, EC P-256 ES256,
Ed25519 EdDSA. Verifiers take the algorithm from this list, never from a token's header.

Refused, with a message that says why and never echoes the key: private keys given by mistake
(they must stay with the workload), symmetric `oct` keys, other curves, short RSA keys, and
JWKs whose `use`, `key_ops` or `alg` say the key is not for verifying these algorithms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authsvc.errors import InvalidArgument
from authsvc_client._b64 import b64url_decode
from authsvc_client.assertions import ALGORITHMS_BY_KTY, PublicKey, jwk_thumbprint, public_jwk

__all__ = [
    "ALGORITHMS_BY_KTY",
    "MAX_JWK_BYTES",
    "MAX_KEYS_IN_SET",
    "MIN_RSA_BITS",
    "JwkSetParse",
    "RegisteredKey",
    "key_from_jwk",
    "key_from_pem",
    "key_from_public_key",
    "parse_jwk_set",
    "parse_public_key",
]

MIN_RSA_BITS = 2048
# An RSA modulus above this is no stronger in practice and costs every verification.
_MAX_RSA_BITS = 8192
MAX_JWK_BYTES = 16 * 1024
MAX_KEYS_IN_SET = 64
# RFC 7517 sections 6.2.2 / 6.3.2 / RFC 8037 section 2: members only a private JWK has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_P256_SIZE = 32
_ED25519_SIZE = 32


@dataclass(frozen=True)
class RegisteredKey:
    """A public key that may verify signatures, with the algorithms its type allows.

    `key_id` is the RFC 7638 thumbprint. `jwk_kid` is the `kid` the JWK carried, if any: a
    trusted issuer names its keys so (a Kubernetes API server's JWKS), and a service's own JWK
    may too; a token header's `kid` may match either.
    """

    key_id: str
    kty: str
    algorithms: tuple[str, ...]
    public_key: PublicKey = field(repr=False, compare=False)
    jwk_kid: str | None = None

    def selected_by(self, kid: str) -> bool:
        return kid == self.key_id or (self.jwk_kid is not None and kid == self.jwk_kid)

    def to_jwk(self) -> dict[str, str]:
        """The public JWK to store: the thumbprint members, `kid` = key_id, `alg` if narrowed."""
        jwk = public_jwk(self.public_key)
        jwk["kid"] = self.jwk_kid or self.key_id
        if self.algorithms != ALGORITHMS_BY_KTY[self.kty]:
            jwk["alg"] = self.algorithms[0]
        return jwk

    def to_json(self) -> str:
        return json.dumps(self.to_jwk(), separators=(",", ":"), sort_keys=True)


def key_from_public_key(
    public_key: object, *, algorithms: Sequence[str] | None = None, jwk_kid: str | None = None
) -> RegisteredKey:
    """Check a public key's type and size and give it its id and pinned algorithms.

    Raises:
        InvalidArgument: a type, curve or size authsvc does not accept.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(f"public key: RSA keys must have at least {MIN_RSA_BITS} bits")
        if public_key.key_size > _MAX_RSA_BITS:
            raise InvalidArgument(f"public key: RSA keys must have at most {_MAX_RSA_BITS} bits")
        kty = "RSA"
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise InvalidArgument("public key: EC keys must be on the P-256 curve")
        kty = "EC"
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        kty = "OKP"
    else:
        raise InvalidArgument("public key: must be RSA (>= 2048 bits), EC P-256 or Ed25519")
    allowed = ALGORITHMS_BY_KTY[kty]
    pinned = allowed if algorithms is None else tuple(a for a in allowed if a in algorithms)
    if not pinned:
        raise InvalidArgument(f"public key: a {kty} key verifies only {', '.join(allowed)}")
    return RegisteredKey(jwk_thumbprint(public_key), kty, pinned, public_key, jwk_kid)


def _member(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"public key: JWK member '{name}' is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError:
        raise InvalidArgument(f"public key: JWK member '{name}' is not base64url") from None


def key_from_jwk(jwk: Mapping[str, Any]) -> RegisteredKey:
    """A RegisteredKey from a public JWK (RFC 7517; RFC 7518 section 6; RFC 8037).

    Raises:
        InvalidArgument: a private or symmetric key, another curve or type, a short RSA key,
            or `use`/`key_ops`/`alg` that do not allow verifying with this key's algorithms.
    """
    kty = jwk.get("kty")
    if kty == "oct":
        raise InvalidArgument(
            "public key: symmetric ('oct') keys are refused; register an asymmetric public key"
        )
    if _PRIVATE_MEMBERS & jwk.keys():
        raise InvalidArgument(
            "public key: this JWK contains a private key; register only its public part "
            "(and keep the private key with the service)"
        )
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise InvalidArgument("public key: the JWK's 'use' must be 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise InvalidArgument("public key: the JWK's 'key_ops' must include 'verify'")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise InvalidArgument("public key: the JWK's 'alg' must be a string")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > 256):
        raise InvalidArgument("public key: the JWK's 'kid' must be a string of 1-256 characters")
    public_key: object
    if kty == "RSA":
        n = int.from_bytes(_member(jwk, "n"), "big")
        e = int.from_bytes(_member(jwk, "e"), "big")
        if n.bit_length() < MIN_RSA_BITS:
            raise InvalidArgument(f"public key: RSA keys must have at least {MIN_RSA_BITS} bits")
        if e < 3 or e % 2 == 0:
            raise InvalidArgument("public key: the RSA public exponent must be odd and >= 3")
        try:
            public_key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise InvalidArgument("public key: not a valid RSA public key") from None
    elif kty == "EC":
        if jwk.get("crv") != "P-256":
            raise InvalidArgument("public key: EC keys must be on the P-256 curve")
        x, y = _member(jwk, "x"), _member(jwk, "y")
        if len(x) != _P256_SIZE or len(y) != _P256_SIZE:
            raise InvalidArgument("public key: P-256 coordinates are 32 octets each")
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError:  # not a point on the curve
            raise InvalidArgument("public key: not a valid P-256 public key") from None
    elif kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise InvalidArgument("public key: OKP keys must be Ed25519")
        x = _member(jwk, "x")
        if len(x) != _ED25519_SIZE:
            raise InvalidArgument("public key: an Ed25519 key is 32 octets")
        public_key = ed25519.Ed25519PublicKey.from_public_bytes(x)
    else:
        raise InvalidArgument("public key: 'kty' must be RSA, EC or OKP")
    return key_from_public_key(public_key, algorithms=None if alg is None else (alg,), jwk_kid=kid)


def key_from_pem(pem: bytes) -> RegisteredKey:
    """A RegisteredKey from a PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA).

    Raises:
        InvalidArgument: a private key, a certificate or anything that is not a public key.
    """
    if b"PRIVATE KEY-----" in pem:
        raise InvalidArgument(
            "public key: this PEM is a private key; register only its public part "
            "(openssl pkey -pubout) and keep the private key with the service"
        )
    if b"-----BEGIN CERTIFICATE-----" in pem:
        raise InvalidArgument("public key: a certificate, not a public key; use --tls-san")
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument("public key: not a PEM public key") from None
    return key_from_public_key(public_key)


def parse_public_key(data: str | bytes) -> RegisteredKey:
    """A registered key from the text of a `--jwk-file`: one JWK (JSON object) or PEM.

    Raises:
        InvalidArgument: see key_from_jwk and key_from_pem.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_JWK_BYTES:
        raise InvalidArgument(f"public key: at most {MAX_JWK_BYTES} bytes")
    text = raw.strip()
    if text.startswith(b"{"):
        try:
            jwk = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidArgument("public key: the JWK is not valid JSON") from None
        if not isinstance(jwk, dict):
            raise InvalidArgument("public key: a JWK is a JSON object")
        if "keys" in jwk:
            raise InvalidArgument("public key: give one JWK, not a JWK Set")
        return key_from_jwk(jwk)
    if text.startswith(b"-----BEGIN"):
        return key_from_pem(text)
    raise InvalidArgument("public key: expected a JWK (JSON object) or a PEM public key")


@dataclass(frozen=True)
class JwkSetParse:
    """The usable keys of a JWK Set and how many were skipped (wrong type, `use: enc`…)."""

    keys: tuple[RegisteredKey, ...]
    skipped: int


def parse_jwk_set(document: object) -> JwkSetParse:
    """The keys of an RFC 7517 section 5 JWK Set that can verify signatures.

    A trusted issuer may publish keys authsvc cannot use (an encryption key, another curve):
    those are skipped, not fatal, so one odd key does not stop federation.

    Raises:
        ValueError: not a JSON object with a `keys` array, or more than MAX_KEYS_IN_SET keys.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWK Set is a JSON object with a 'keys' array")
    entries = document["keys"]
    if len(entries) > MAX_KEYS_IN_SET:
        raise ValueError(f"a JWK Set holds at most {MAX_KEYS_IN_SET} keys")
    keys: list[RegisteredKey] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("each member of 'keys' is a JSON object")
        try:
            keys.append(key_from_jwk(entry))
        except InvalidArgument:
            continue
    return JwkSetParse(tuple(keys), len(entries) - len(keys))
