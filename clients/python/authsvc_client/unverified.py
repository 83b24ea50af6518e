"""Reading a token's claims without verifying it: the one place that does.

Only for choosing what to do with a token before, or instead of, trusting it: which audience
to verify a presented token against (RevokeToken), when a source should drop the token it just
got (jti, iat). Nothing read here is ever trusted; the verifier decides validity.
"""

from __future__ import annotations

from typing import Any

from authsvc_client.errors import Malformed
from authsvc_client.verifier import _parse_segment

__all__ = ["unverified_audience", "unverified_payload"]


def unverified_payload(token: str) -> dict[str, Any] | None:
    """The payload object of a compact JWS, read as the verifier reads it (duplicate names,
    NaN and invalid UTF-8 refused), or None when it cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload, _ = _parse_segment(parts[1].encode("ascii", "replace"))
    except Malformed:
        return None
    return payload


def unverified_audience(token: str) -> str | None:
    """The `aud` of a token, if it is one non-empty string."""
    payload = unverified_payload(token)
    aud = payload.get("aud") if payload is not None else None
    return aud if isinstance(aud, str) and aud else None
