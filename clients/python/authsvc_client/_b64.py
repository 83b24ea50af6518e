"""base64url as JOSE uses it (RFC 7515 section 2, appendix C): strict, plus one lenient reader."""

from __future__ import annotations

import binascii

__all__ = [
    "b64url_decode",
    "b64url_decode_lenient",
    "b64url_encode",
    "b64url_encode_bytes",
    "b64url_uint",
]

# binascii and bytes.translate directly: these sit on the verifier's cold path, where the
# base64 module's conveniences cost more than the decoding itself.
_STD_TO_URL = bytes.maketrans(b"+/", b"-_")
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


def _ascii(text: str | bytes) -> bytes:
    return text.encode("ascii") if isinstance(text, str) else text


def b64url_encode_bytes(data: bytes) -> bytes:
    """base64url without padding, the only form RFC 7515 section 2 allows on the wire."""
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=")


def b64url_encode(data: bytes) -> str:
    return b64url_encode_bytes(data).decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Decode canonical base64url only.

    Canonical means exactly what b64url_encode would produce for the decoded bytes: no padding,
    no '+' or '/', no whitespace or junk, and zero trailing bits. Accepting any other spelling
    would let one signed token travel under many different strings (token malleability).

    Raises:
        ValueError: the text is not canonical base64url.
    """
    try:
        encoded = _ascii(text)
        data = binascii.a2b_base64((encoded + b"=" * (-len(encoded) % 4)).translate(_URL_TO_STD))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    # The decoder silently drops characters outside the alphabet and ignores trailing bits,
    # so the round trip is the check.
    if b64url_encode_bytes(data) != encoded:
        raise ValueError("not canonical base64url")
    return data


def b64url_decode_lenient(text: str | bytes) -> bytes:
    """Decode base64url or base64, with or without '=' padding.

    Used only to read a token's jti before anything is trusted, so that a revoked token stays
    revoked however it is re-encoded; nothing decoded this way is trusted.

    Raises:
        ValueError: the text cannot be read as base64 at all.
    """
    try:
        stripped = _ascii(text).replace(b"=", b"")
        # Non-strict a2b_base64 skips characters outside the alphabet, as b64decode does.
        return binascii.a2b_base64((stripped + b"=" * (-len(stripped) % 4)).translate(_URL_TO_STD))
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def b64url_uint(value: int) -> str:
    """RFC 7518 section 2 Base64urlUInt: the minimal big-endian octets of a non-negative int."""
    if value < 0:
        raise ValueError("Base64urlUInt is defined for non-negative integers only")
    length = max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(length, "big"))
