"""The JWS layer shared by assertions and federated tokens: bounded parsing, pinned algorithms.

Nothing from a token picks how it is checked: the algorithm must be one the candidate key's type
allows (RegisteredKey.algorithms) and the verifier allows, and the key comes from registration
or admin configuration, never from the token (`jwk`, `jku`, `x5u`, `x5c` are ignored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jwt

from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.public_keys import RegisteredKey
from authsvc_client._b64 import b64url_decode

__all__ = [
    "MAX_KEYS_TRIED",
    "numeric_claim",
    "read_header",
    "required_time",
    "unverified_claims",
    "verify",
]

# A token without a usable `kid` is tried against at most this many keys: enough for a roll
# (old and new key, a spare), few enough that a flood of such tokens costs bounded CPU.
MAX_KEYS_TRIED = 4
_JWS = jwt.PyJWS()


def _segments(token: str, max_bytes: int) -> list[str]:
    if not isinstance(token, str) or not token:
        raise WorkloadAuthError(Reason.MALFORMED)
    if len(token) > max_bytes:
        raise WorkloadAuthError(Reason.TOO_LARGE)
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise WorkloadAuthError(Reason.MALFORMED)
    return parts


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise WorkloadAuthError(Reason.MALFORMED) from None
    if not isinstance(value, dict):
        raise WorkloadAuthError(Reason.MALFORMED)
    return value


def read_header(token: str, max_bytes: int) -> dict[str, Any]:
    """The protected header, read before anything is trusted.

    Raises:
        WorkloadAuthError: too long, not three canonical base64url segments, not JSON, `alg`
            missing, or `crit`/`b64` present (RFC 7515 section 4.1.11: an extension authsvc
            does not implement must be refused, and it implements none).
    """
    header = _json_object(_segments(token, max_bytes)[0])
    if not isinstance(header.get("alg"), str):
        raise WorkloadAuthError(Reason.MALFORMED)
    if "crit" in header or "b64" in header:
        raise WorkloadAuthError(Reason.UNSUPPORTED_HEADER)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise WorkloadAuthError(Reason.MALFORMED)
    return header


def unverified_claims(token: str, max_bytes: int) -> dict[str, Any]:
    """The claims before the signature is checked: only to route a token (which trust, which
    service), never to decide anything."""
    return _json_object(_segments(token, max_bytes)[1])


def verify(
    token: str,
    header: Mapping[str, Any],
    keys: Sequence[RegisteredKey],
    allowed: Collection[str],
) -> tuple[RegisteredKey, dict[str, Any]]:
    """Check the signature with the key the header's `kid` names, else each key (bounded).

    The header's `alg` must be allowed both by the verifier (`allowed`) and by the key's type;
    `none`, HMAC and an algorithm of another key type never reach a key.

    Returns:
        The key that verified and the claims as a JSON object.

    Raises:
        WorkloadAuthError: ALGORITHM_NOT_ALLOWED, NO_KEY, BAD_SIGNATURE or MALFORMED.
    """
    alg = header["alg"]
    if alg not in allowed:
        raise WorkloadAuthError(Reason.ALGORITHM_NOT_ALLOWED)
    if not keys:
        raise WorkloadAuthError(Reason.NO_KEY)
    kid = header.get("kid")
    named = [k for k in keys if kid is not None and k.selected_by(kid)]
    candidates = [k for k in (named or keys) if alg in k.algorithms][:MAX_KEYS_TRIED]
    if not candidates:
        raise WorkloadAuthError(Reason.ALGORITHM_NOT_ALLOWED)
    for key in candidates:
        try:
            decoded = _JWS.decode_complete(token, key=key.public_key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            raise WorkloadAuthError(Reason.MALFORMED) from None
        try:
            claims = json.loads(decoded["payload"])
        except (ValueError, RecursionError, UnicodeDecodeError):
            raise WorkloadAuthError(Reason.MALFORMED) from None
        if not isinstance(claims, dict):
            raise WorkloadAuthError(Reason.MALFORMED)
        return key, claims
    raise WorkloadAuthError(Reason.BAD_SIGNATURE)


def numeric_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    """A NumericDate (RFC 7519 section 2): a finite JSON number, never a boolean or a string.

    Raises:
        WorkloadAuthError: MISSING_CLAIM if required and absent, MALFORMED if not a number.
    """
    if name not in claims:
        if required:
            raise WorkloadAuthError(Reason.MISSING_CLAIM)
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WorkloadAuthError(Reason.MALFORMED)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise WorkloadAuthError(Reason.MALFORMED) from None
    if not math.isfinite(number):
        raise WorkloadAuthError(Reason.MALFORMED)
    return number


def required_time(claims: Mapping[str, Any], name: str) -> float:
    """A NumericDate that must be present (`exp`, and `iat` for assertions)."""
    value = numeric_claim(claims, name, required=True)
    if value is None:  # numeric_claim raised already; this keeps the type exact
        raise WorkloadAuthError(Reason.MISSING_CLAIM)
    return value
