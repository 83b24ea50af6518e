"""base64url as JOSE uses it (RFC 7515 section 2, appendix C): strict, plus one lenient reader."""

from __future__ import annotations

import binascii

__all__ = [
    "b64url_decode",
    "b64url_decode_canonical",
    "b64url_decode_lenient",
    "b64url_encode",
    "b64url_encode_bytes",
    "b64url_uint",
]

# binascii and bytes.translate directly: these sit on the verifier's cold path, where the
# base64 module's conveniences cost more than the decoding itself.
_STD_TO_URL = bytes.maketrans(b"+/", b"-_")
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_STD_ALPHABET = _URL_ALPHABET.translate(_URL_TO_STD)
# One pass both converts base64url to the alphabet binascii reads and marks every byte a
# canonical segment cannot hold ('+', '/', '=', whitespace, junk) as '*', in neither alphabet.
_URL_TO_STD_OR_STAR = bytes.maketrans(
    _URL_ALPHABET + bytes(sorted(set(range(256)) - set(_URL_ALPHABET))),
    _STD_ALPHABET + b"*" * (256 - len(_URL_ALPHABET)),
)
_STAR = ord("*")
# Padding binascii needs, by len % 4 (1 cannot occur in any encoding).
_PADDING = (b"", b"", b"==", b"=")
# RFC 4648 section 3.5: canonical encoders set the pad bits to zero. A segment with len % 4 == 2
# ends in a character carrying 4 pad bits, one with len % 4 == 3 in one carrying 2, so only
# characters whose value is a multiple of 16 or of 4 may end it.
_LAST_CHARACTERS = (b"", b"", _URL_ALPHABET[::16], _URL_ALPHABET[::4])


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
    except UnicodeEncodeError:
        raise ValueError("not base64url") from None
    data = b64url_decode_canonical(encoded)
    if data is None:
        raise ValueError("not canonical base64url")
    return data


def b64url_decode_canonical(encoded: bytes) -> bytes | None:
    """The bytes of a canonical base64url text, or None for any other text.

    The verifier must both decode a segment and know whether it is canonical, and must not
    raise for a non-canonical one (it still reads it leniently, for revocation). Checking the
    form directly instead of re-encoding the result and comparing costs one pass, not two.
    """
    rest = len(encoded) % 4
    if rest == 1:  # 6 bits cannot end a whole byte
        return None
    standard = encoded.translate(_URL_TO_STD_OR_STAR)
    if _STAR in standard:  # an int: bytes.__contains__ is several times faster than with b"*"
        return None
    if rest and encoded[-1] not in _LAST_CHARACTERS[rest]:
        return None
    # Only alphabet characters with exact padding: non-strict decoding skips nothing here.
    return binascii.a2b_base64(standard + _PADDING[rest])


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
