"""RFC 8705 section 3: certificate-bound access tokens, the thumbprint rule and its comparison.

A token issued on a call that presented a verified client certificate carries
`cnf: {"x5t#S256": <thumbprint>}`; a validator accepts it only from a caller presenting that
same certificate. The rule lives here, in the client package, because both sides need it:
validators compute the thumbprint of the certificate an incoming call arrived with, and the
server (authsvc.workload.certificates) computes the one it binds tokens to.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authsvc_client._b64 import b64url_decode_canonical, b64url_encode

__all__ = [
    "CONFIRMATION_CLAIM",
    "MAX_CERTIFICATE_PEM_BYTES",
    "THUMBPRINT_MEMBER",
    "certificate_thumbprint",
    "der_thumbprint",
    "is_thumbprint",
    "peer_certificate_pem",
    "thumbprint_matches",
]

# RFC 7800 section 3.1 confirmation claim, RFC 8705 section 3.1 member.
CONFIRMATION_CLAIM = "cnf"
THUMBPRINT_MEMBER = "x5t#S256"
# A SHA-256 digest is 32 bytes: 43 base64url characters without padding.
_DIGEST_BYTES = 32
_THUMBPRINT_CHARS = 43
# A leaf certificate is a few kilobytes at most; anything larger is not worth parsing.
MAX_CERTIFICATE_PEM_BYTES = 64 * 1024
# gRPC's auth context key for the verified peer leaf (PEM), present only over mTLS.
_PEER_CERT_KEY = "x509_pem_cert"


def der_thumbprint(der: bytes) -> str:
    """RFC 8705 section 3.1 `x5t#S256`: base64url (no padding) of SHA-256 over the DER bytes."""
    return b64url_encode(hashlib.sha256(der).digest())


def certificate_thumbprint(cert_pem: str | bytes) -> str:
    """The `x5t#S256` of a PEM certificate (the leaf, as gRPC's auth context holds it).

    The DER hashed is the certificate's own encoding (cryptography re-encodes nothing it
    parsed), so the result equals the thumbprint of the certificate the TLS layer verified.

    Raises:
        ValueError: empty, over MAX_CERTIFICATE_PEM_BYTES, or not a PEM certificate.
    """
    raw = cert_pem.encode("ascii", "replace") if isinstance(cert_pem, str) else cert_pem
    if not raw.strip():
        raise ValueError("no certificate")
    if len(raw) > MAX_CERTIFICATE_PEM_BYTES:
        raise ValueError("certificate PEM too large")
    try:
        cert = x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    return der_thumbprint(cert.public_bytes(serialization.Encoding.DER))


def is_thumbprint(value: object) -> bool:
    """True for a well-formed `x5t#S256` value: canonical base64url of exactly 32 bytes."""
    if type(value) is not str or len(value) != _THUMBPRINT_CHARS or not value.isascii():
        return False
    digest = b64url_decode_canonical(value.encode("ascii"))
    return digest is not None and len(digest) == _DIGEST_BYTES


def thumbprint_matches(bound: str, presented: str | None) -> bool:
    """Whether a token bound to `bound` may be used by a caller presenting `presented`.

    Constant time in the thumbprints' contents (they are not secret, but the comparison
    should not be the one place that teaches an attacker which byte differs). A missing or
    empty `presented`, or a non-ASCII one, never matches.
    """
    if not presented or not presented.isascii():
        return False
    return hmac.compare_digest(bound, presented)


def peer_certificate_pem(auth_context: Mapping[str, Sequence[Any]] | None) -> bytes | None:
    """The verified peer leaf from a gRPC auth context (`x509_pem_cert`), None without mTLS."""
    if not auth_context:
        return None
    values = auth_context.get(_PEER_CERT_KEY) or ()
    if len(values) != 1:
        return None  # gRPC sets exactly one leaf; anything else is not a certificate we read
    value = values[0]
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    return value if isinstance(value, bytes) and value.strip() else None
