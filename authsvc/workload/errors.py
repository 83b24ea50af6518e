"""Why a workload credential was refused: one generic error outside, a typed reason inside.

Every refusal of a signed assertion, a client certificate or a federated token reaches the
caller as the same UNAUTHENTICATED with the same message as a wrong secret (telling an
attacker which check failed helps only the attacker). The `reason` is for metrics, the audit
row and logs; it never holds any part of the credential.
"""

from __future__ import annotations

from enum import StrEnum

from authsvc.errors import Unauthenticated

__all__ = ["GENERIC_MESSAGE", "Reason", "WorkloadAuthError"]

# The same words as a wrong secret (authsvc.server.ledger.BAD_CREDENTIALS).
GENERIC_MESSAGE = "invalid service credentials"


class Reason(StrEnum):
    """One value per check; stable names, fit for a metric label."""

    MALFORMED = "malformed"  # not a compact JWS / JSON object / readable certificate
    TOO_LARGE = "too_large"
    WRONG_TYPE = "wrong_type"  # a `typ` header naming another kind of JWT
    UNSUPPORTED_HEADER = "unsupported_header"  # `crit`, `b64`, embedded keys (jwk/jku/x5u/x5c)
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"  # none, HMAC, or not the key type's
    NO_KEY = "no_key"  # the service has no registered key / the issuer's keys are not loaded
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_SUBJECT = "wrong_subject"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    ISSUED_IN_FUTURE = "issued_in_future"
    BAD_JTI = "bad_jti"
    # Raised by the caller, not here: the jti was already used (settled in the database).
    REPLAYED = "replayed"
    UNKNOWN_ISSUER = "unknown_issuer"
    NO_CERTIFICATE = "no_certificate"
    IDENTITY_MISMATCH = "identity_mismatch"


class WorkloadAuthError(Unauthenticated):
    """A workload credential was refused; `str()` is the generic message, `reason` says why.

    A subclass of Unauthenticated, so the servicer's one status table already answers
    UNAUTHENTICATED for it.
    """

    def __init__(self, reason: Reason) -> None:
        super().__init__(GENERIC_MESSAGE)
        self.reason = reason

    def __repr__(self) -> str:
        return f"WorkloadAuthError({self.reason.value})"
