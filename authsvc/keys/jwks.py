"""RFC 7517 JWK Set rendering and RFC 7638 thumbprints for RSA signing keys; pure functions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from authsvc_client._b64 import b64url_encode, b64url_uint
from authsvc_client.claims import ALGORITHM

__all__ = ["jwk_thumbprint", "public_jwk", "render_jwks"]


def public_jwk(public_key: RSAPublicKey, kid: str) -> dict[str, str]:
    """The public JWK of an RS256 signing key (RFC 7517 section 4, RFC 7518 section 6.3.1).

    n and e are Base64urlUInt: minimal big-endian octets, base64url without padding.
    """
    numbers = public_key.public_numbers()
    return {
        "kty": "RSA",
        "use": "sig",
        "alg": ALGORITHM,
        "kid": kid,
        "n": b64url_uint(numbers.n),
        "e": b64url_uint(numbers.e),
    }


def jwk_thumbprint(public_key: RSAPublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: a kid that names the key material itself.

    Section 3.2: only the required members (e, kty, n for RSA), in lexicographic order, with no
    whitespace, hashed as UTF-8.
    """
    numbers = public_key.public_numbers()
    canonical = json.dumps(
        {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def render_jwks(jwks: Iterable[Mapping[str, str]]) -> str:
    """A compact RFC 7517 section 5 JWK Set: {"keys":[...]} in the order given."""
    return json.dumps({"keys": [dict(jwk) for jwk in jwks]}, separators=(",", ":"))
