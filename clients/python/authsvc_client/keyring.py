"""An immutable set of RSA verification keys by kid, read from an RFC 7517 JWK Set."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

from authsvc_client._b64 import b64url_decode
from authsvc_client.claims import ALGORITHM

__all__ = ["MAX_RSA_KEY_BITS", "MIN_RSA_KEY_BITS", "KeyRing"]

# RFC 7518 section 3.3: a key of size 2048 bits or larger MUST be used with RS256.
MIN_RSA_KEY_BITS = 2048
# OpenSSL's own ceiling for RSA public operations (OPENSSL_RSA_MAX_MODULUS_BITS); larger moduli
# would only make verification slow.
MAX_RSA_KEY_BITS = 16384


class KeyRing:
    """Verification keys by kid; a new ring replaces the old one instead of changing it.

    Readers take the ring once per verification, so a concurrent swap never shows them a
    half-updated set.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, RSAPublicKey]) -> None:
        """Copy the mapping; key lengths are checked here (pyca style).

        Raises:
            TypeError: a value is not an RSA public key.
            ValueError: a key is shorter than MIN_RSA_KEY_BITS.
        """
        copied: dict[str, RSAPublicKey] = {}
        for kid, key in keys.items():
            if not isinstance(key, RSAPublicKey):
                raise TypeError(f"key {kid!r} is not an RSA public key")
            if key.key_size < MIN_RSA_KEY_BITS:
                raise ValueError(f"key {kid!r} is shorter than {MIN_RSA_KEY_BITS} bits")
            copied[kid] = key
        self._keys: Mapping[str, RSAPublicKey] = MappingProxyType(copied)

    def get(self, kid: str) -> RSAPublicKey | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing(kids={sorted(self._keys)!r})"

    @classmethod
    def from_jwks_json(cls, text: str) -> KeyRing:
        """Keep the keys of a JWK Set that can verify RS256 tokens; skip the rest.

        Kept: kty "RSA" with a string kid, `use` absent or "sig", `alg` absent or "RS256", and a
        modulus of 2048 to 16384 bits. A kid that names two different keys is dropped
        altogether rather than guessing which one is meant.

        Raises:
            ValueError: the text is not a JWK Set (RFC 7517 section 5). The message never
                contains key material.
        """
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("not a JWK Set: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWK Set: no 'keys' array")
        keys: dict[str, RSAPublicKey] = {}
        ambiguous: set[str] = set()
        for jwk in doc["keys"]:
            parsed = _rsa_verification_key(jwk)
            if parsed is None:
                continue
            kid, key = parsed
            if kid in keys and keys[kid].public_numbers() != key.public_numbers():
                ambiguous.add(kid)
            keys.setdefault(kid, key)
        for kid in ambiguous:
            del keys[kid]
        return cls(keys)


def _rsa_verification_key(jwk: Any) -> tuple[str, RSAPublicKey] | None:
    if not isinstance(jwk, dict):
        return None
    kid = jwk.get("kid")
    if jwk.get("kty") != "RSA" or not isinstance(kid, str) or not kid:
        return None
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", ALGORITHM) != ALGORITHM:
        return None
    n_text, e_text = jwk.get("n"), jwk.get("e")
    if not isinstance(n_text, str) or not isinstance(e_text, str):
        return None
    try:
        n = int.from_bytes(b64url_decode(n_text), "big")
        e = int.from_bytes(b64url_decode(e_text), "big")
        if not MIN_RSA_KEY_BITS <= n.bit_length() <= MAX_RSA_KEY_BITS:
            return None
        key = RSAPublicNumbers(e, n).public_key()
    except ValueError:
        return None
    return kid, key
