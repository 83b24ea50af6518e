"""Federated workload tokens: a JWT from a trusted issuer (a Kubernetes API server's projected
service-account token, or any OIDC issuer's), verified against that issuer's keys only.

A trust is issuer + ONE mandatory audience + keys (a file, or a JWKS URL fetched by
jwks_fetch) + a lifetime ceiling. Rules:

- RS256 and ES256 only, pinned by the key type as for assertions.
- `iss` exact: the token is checked only against the trust whose issuer it claims, so two
  issuers with the same `sub` (every cluster has `system:serviceaccount:default:default`) are
  never confused, and the result names the trust that matched. Two trusts may not share an
  issuer.
- the trust's audience must be present (Kubernetes sends `aud` as a list: exact element
  match; a string must equal it).
- `exp` required; `nbf` and `iat` respected with leeway; lifetime (`exp - iat`, or
  `exp - now` when there is no `iat`) at most the ceiling (default 24 h). Kubernetes tokens
  are reused until they expire and carry no `jti` to demand, so none is demanded: what
  bounds a stolen one is its lifetime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from authsvc.errors import InvalidArgument
from authsvc.inputs import check_name
from authsvc.workload import jws
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.public_keys import RegisteredKey, parse_jwk_set
from authsvc_client.claims import JWT_TOKEN_TYPE

__all__ = [
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "FEDERATION_ALGORITHMS",
    "JWT_TOKEN_TYPE",
    "MAX_FEDERATED_TOKEN_BYTES",
    "FederatedIdentity",
    "FederationVerifier",
    "KeySource",
    "StaticKeys",
    "TrustedIssuer",
    "load_jwks_file",
    "parse_jwks_document",
    "usable_for_federation",
]

FEDERATION_ALGORITHMS = frozenset({"RS256", "ES256"})
DEFAULT_MAX_LIFETIME = 24 * 3600
DEFAULT_LEEWAY = 60
MAX_FEDERATED_TOKEN_BYTES = 16 * 1024
_MAX_SUBJECT = 256
_MAX_ISSUER = 1024
_MAX_JWKS_FILE = 1024 * 1024


class KeySource(Protocol):
    """Where a trust's keys come from: a file loaded once, or a JwksCache."""

    def ensure_loaded(self) -> tuple[RegisteredKey, ...]:
        """The keys now; may fetch once, bounded, if none was ever loaded."""
        ...

    def on_unknown_kid(self) -> bool:
        """A token named a kid the keys lack; True if the keys changed since."""
        ...


@dataclass(frozen=True)
class StaticKeys:
    """Keys from a `--jwks-file`, fixed until the trust is changed."""

    keys: tuple[RegisteredKey, ...]

    def ensure_loaded(self) -> tuple[RegisteredKey, ...]:
        return self.keys

    def on_unknown_kid(self) -> bool:
        return False


def usable_for_federation(key: RegisteredKey) -> bool:
    """Whether a key can verify a federated token: it allows RS256 or ES256 (an Ed25519 key,
    or an RSA key whose JWK pins `alg` to PS256, cannot). The one statement of it, for
    `--jwks-file` keys and for the keys a JwksCache keeps."""
    return not FEDERATION_ALGORITHMS.isdisjoint(key.algorithms)


def load_jwks_file(path: str | Path) -> StaticKeys:
    """The usable keys of a JWK Set file (RS256/ES256 keys; others skipped).

    Raises:
        InvalidArgument: unreadable, not a JWK Set, or no RS256/ES256 key in it.
    """
    try:
        with Path(path).open("rb") as file:
            data = file.read(_MAX_JWKS_FILE + 1)
    except OSError:
        raise InvalidArgument("jwks_file: cannot read the file") from None
    return parse_jwks_document(data)


def parse_jwks_document(data: str | bytes, field_name: str = "jwks_file") -> StaticKeys:
    """The usable keys of a JWK Set document (as a `--jwks-file` holds it, and as storage
    keeps it so that every replica has the same keys).

    Raises:
        InvalidArgument: over 1 MiB, not a JWK Set, or no RS256/ES256 key in it.
    """
    if len(data) > _MAX_JWKS_FILE:
        raise InvalidArgument(f"{field_name}: at most 1 MiB")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{field_name}: not JSON") from None
    try:
        parsed = parse_jwk_set(document)
    except ValueError as exc:
        raise InvalidArgument(f"{field_name}: {exc}") from None
    usable = tuple(k for k in parsed.keys if usable_for_federation(k))
    if not usable:
        raise InvalidArgument(f"{field_name}: no RSA (>= 2048 bits) or EC P-256 signing key")
    return StaticKeys(usable)


def _check_long_name(value: str, field_name: str) -> None:
    if not value:
        raise InvalidArgument(f"{field_name} is required")
    if len(value) > _MAX_ISSUER or not value.isprintable() or value != value.strip():
        raise InvalidArgument(f"{field_name}: at most {_MAX_ISSUER} printable characters")


@dataclass(frozen=True)
class TrustedIssuer:
    """An external issuer an admin trusts (`authsvc trust add`)."""

    name: str
    issuer: str
    audience: str
    keys: KeySource = field(repr=False, compare=False)
    max_lifetime: int = DEFAULT_MAX_LIFETIME

    def __post_init__(self) -> None:
        check_name(self.name, "trust name")
        # Issuer URLs and audiences run longer than service names (a GKE cluster's issuer
        # names project, location and cluster), so they get their own bound.
        _check_long_name(self.issuer, "issuer")
        # One mandatory audience: without it, any token the issuer mints for anyone (another
        # service's audience) would log in here.
        _check_long_name(self.audience, "audience")
        if not 0 < self.max_lifetime <= 7 * 24 * 3600:
            raise InvalidArgument("max_lifetime: 1 second to 7 days")


@dataclass(frozen=True)
class FederatedIdentity:
    """A verified federated token: which trust, which subject, until when."""

    trust_name: str
    subject: str
    exp: int


class FederationVerifier:
    """Verifies federated tokens against the trusts configured now (one verifier per config)."""

    def __init__(self, trusts: Iterable[TrustedIssuer], *, leeway: int = DEFAULT_LEEWAY) -> None:
        self._by_issuer: dict[str, TrustedIssuer] = {}
        names: set[str] = set()
        for trust in trusts:
            if trust.issuer in self._by_issuer:
                raise InvalidArgument(f"trust {trust.name!r}: another trust has the same issuer")
            if trust.name in names:
                raise InvalidArgument(f"trust {trust.name!r}: the name is taken")
            names.add(trust.name)
            self._by_issuer[trust.issuer] = trust
        self._leeway = leeway

    @property
    def trusts(self) -> Sequence[TrustedIssuer]:
        return tuple(self._by_issuer.values())

    def verify(self, token: str, *, now: float) -> FederatedIdentity:
        """Verify a federated workload token.

        Returns:
            The trust it matched, its `sub` and `exp`. The caller finds the service bound to
            exactly (trust_name, subject).

        Raises:
            WorkloadAuthError: UNKNOWN_ISSUER when no trust has the claimed `iss`, else the
                reason of the first failed check.
        """
        header = jws.read_header(token, MAX_FEDERATED_TOKEN_BYTES)
        claimed = jws.unverified_claims(token, MAX_FEDERATED_TOKEN_BYTES).get("iss")
        trust = self._by_issuer.get(claimed) if isinstance(claimed, str) else None
        if trust is None:
            raise WorkloadAuthError(Reason.UNKNOWN_ISSUER)
        keys = trust.keys.ensure_loaded()
        kid = header.get("kid")
        if (
            isinstance(kid, str)
            and not any(k.selected_by(kid) for k in keys)
            and trust.keys.on_unknown_kid()
        ):
            keys = trust.keys.ensure_loaded()  # the issuer rolled its key: use the new set
        _, claims = jws.verify(token, header, keys, FEDERATION_ALGORITHMS)
        # Verified now; `iss` again from the signed claims (the same bytes, but say it).
        if claims.get("iss") != trust.issuer:
            raise WorkloadAuthError(Reason.WRONG_ISSUER)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or trust.audience not in [
            a for a in audiences if isinstance(a, str)
        ]:
            raise WorkloadAuthError(Reason.WRONG_AUDIENCE)
        exp = jws.required_time(claims, "exp")
        iat = jws.numeric_claim(claims, "iat", required=False)
        nbf = jws.numeric_claim(claims, "nbf", required=False)
        if exp + self._leeway <= now:
            raise WorkloadAuthError(Reason.EXPIRED)
        if nbf is not None and nbf > now + self._leeway:
            raise WorkloadAuthError(Reason.NOT_YET_VALID)
        if iat is not None and iat > now + self._leeway:
            raise WorkloadAuthError(Reason.ISSUED_IN_FUTURE)
        lifetime = exp - (iat if iat is not None else now)
        if lifetime > trust.max_lifetime:
            raise WorkloadAuthError(Reason.LIFETIME_TOO_LONG)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise WorkloadAuthError(Reason.MISSING_CLAIM)
        if len(sub) > _MAX_SUBJECT or not sub.isprintable():
            raise WorkloadAuthError(Reason.WRONG_SUBJECT)
        return FederatedIdentity(trust.name, sub, int(exp))
