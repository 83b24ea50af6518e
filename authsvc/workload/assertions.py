"""RFC 7523 `private_key_jwt`: verify a client assertion against a service's registered keys.

The rules (DESIGN.md, "Signed assertion"), each checked here and nowhere else:

- `iss` = `sub` = the service id (RFC 7523 section 3, items 1 and 2).
- `aud` = the server's issuer as ONE string. A list, the token endpoint's URL or any other
  value is refused: rfc7523bis (after the 2025 audience-injection attacks, where an assertion
  written for one server was accepted by another that found itself *among* the audiences).
- `exp` required, in the future and at most 5 minutes ahead (plus leeway); `iat` required and
  not in the future beyond the leeway; `nbf` respected if present.
- `jti` required, 1-256 printable characters. This module does not remember it: the caller
  settles single use in the database until `exp` (across replicas) with what it returns.
- The algorithm is pinned by the key type (jws.verify); `none`, HMAC, or RS256 on an EC key
  never reach a key.
- `typ`: rfc7523bis section 4 registers `client-authentication+jwt` and recommends it, but
  RFC 7523 clients (most libraries) send none or `JWT`. Accepted: absent, `JWT`, and
  `client-authentication+jwt` (case-insensitive, optional `application/` prefix, RFC 7515
  section 4.1.9). Any other type (`at+jwt` is an access token, `secevent+jwt` an event…) is
  refused: a JWT made for another purpose is never a login, even when it verifies. authsvc's
  own client always sends `client-authentication+jwt`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from authsvc.workload import jws
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.public_keys import RegisteredKey
from authsvc_client.assertions import CLIENT_ASSERTION_TYPE

__all__ = [
    "ACCEPTED_TYPES",
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_LEEWAY",
    "MAX_ASSERTION_BYTES",
    "MAX_ASSERTION_LIFETIME",
    "MAX_JTI_LENGTH",
    "VerifiedAssertion",
    "claimed_service_id",
    "verify_assertion",
]

MAX_ASSERTION_BYTES = 8 * 1024
MAX_ASSERTION_LIFETIME = 300  # DESIGN.md: `exp` at most 5 min ahead
MAX_JTI_LENGTH = 256
DEFAULT_LEEWAY = 30
ACCEPTED_TYPES = frozenset({"jwt", "client-authentication+jwt"})
_ALGORITHMS = frozenset({"RS256", "PS256", "ES256", "EdDSA"})


@dataclass(frozen=True)
class VerifiedAssertion:
    """What the caller needs to settle the assertion's single use and audit the login."""

    service_id: str
    jti: str
    exp: int
    key_id: str
    # Until when the jti must be refused: the assertion verifies until `exp` + leeway.
    remember_jti_until: int


def _typ_accepted(header: dict[str, Any]) -> bool:
    typ = header.get("typ")
    if typ is None:
        return True
    if not isinstance(typ, str):
        return False
    lowered = typ.lower()
    return lowered.removeprefix("application/") in ACCEPTED_TYPES


def claimed_service_id(assertion: str) -> str | None:
    """The `sub` an assertion claims, unverified: to look up whose keys to verify it with when
    the request names no service. Never a decision: verify_assertion decides."""
    try:
        sub = jws.unverified_claims(assertion, MAX_ASSERTION_BYTES).get("sub")
    except WorkloadAuthError:
        return None
    return sub if isinstance(sub, str) and sub else None


def verify_assertion(
    assertion: str,
    *,
    service_id: str,
    keys: Sequence[RegisteredKey],
    issuer: str,
    now: float,
    leeway: int = DEFAULT_LEEWAY,
) -> VerifiedAssertion:
    """Verify that `service_id` signed `assertion` for this server, just now.

    Args:
        assertion: the compact JWS from IssueTokenRequest.client_assertion.
        service_id: the service the login is for; its registered `keys` only.
        issuer: the server's issuer (AUTHSVC_ISSUER), the only accepted `aud`.
        now: the server's clock reading (seconds since the epoch).
        leeway: clock skew allowed on `exp`, `iat` and `nbf`, in seconds.

    Returns:
        The verified service id, `jti`, `exp` and the id of the key that verified. The
        caller must still refuse a `jti` already used (until `exp`).

    Raises:
        WorkloadAuthError: with the reason; the caller answers the generic UNAUTHENTICATED.
    """
    header = jws.read_header(assertion, MAX_ASSERTION_BYTES)
    if not _typ_accepted(header):
        raise WorkloadAuthError(Reason.WRONG_TYPE)
    key, claims = jws.verify(assertion, header, keys, _ALGORITHMS)
    if claims.get("iss") != service_id:
        raise WorkloadAuthError(Reason.WRONG_ISSUER)
    if claims.get("sub") != service_id:
        raise WorkloadAuthError(Reason.WRONG_SUBJECT)
    aud = claims.get("aud")
    # Exactly one string, equal to the issuer: a list is refused even if it holds the issuer.
    if not isinstance(aud, str) or aud != issuer:
        raise WorkloadAuthError(Reason.WRONG_AUDIENCE)
    exp = jws.required_time(claims, "exp")
    iat = jws.required_time(claims, "iat")
    nbf = jws.numeric_claim(claims, "nbf", required=False)
    if exp + leeway <= now:
        raise WorkloadAuthError(Reason.EXPIRED)
    if exp > now + MAX_ASSERTION_LIFETIME + leeway:
        raise WorkloadAuthError(Reason.LIFETIME_TOO_LONG)
    if iat > now + leeway:
        raise WorkloadAuthError(Reason.ISSUED_IN_FUTURE)
    if nbf is not None and nbf > now + leeway:
        raise WorkloadAuthError(Reason.NOT_YET_VALID)
    jti = claims.get("jti")
    if jti is None:
        raise WorkloadAuthError(Reason.MISSING_CLAIM)
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH or not jti.isprintable():
        raise WorkloadAuthError(Reason.BAD_JTI)
    # Rounded up: the jti stays refused at least as long as the assertion verifies.
    return VerifiedAssertion(service_id, jti, math.ceil(exp), key.key_id, math.ceil(exp + leeway))
