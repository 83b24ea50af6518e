"""Trusted external issuers for federated workload tokens: add, list and remove (`authsvc trust`).

A trust is issuer + one mandatory audience + keys + a lifetime ceiling (see
`authsvc.workload.federation`). Its keys come from exactly one source, fixed when it is added:

- `--jwks-file`: read and checked here (`load_jwks_file`); the JWK Set stored is made of the
  keys that check kept (each as its public JWK, its own `kid` kept), so every replica verifies
  with exactly what was checked, and a later edit of the file changes nothing;
- `--jwks-url`: checked for shape only (`check_jwks_url`: https, no user info); replicas fetch
  and refresh it. The URL comes only from here, never from a token.

Removing a trust also removes every federated subject bound to it (a trust added later under
the same name must not inherit them). Each change writes one audit row, in the change's own
transaction; none holds key material (a file trust is described by its key ids, a URL trust
by its host).

Nothing here knows gRPC or the CLI: errors are `authsvc.errors` types.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from authsvc.clock import Clock, to_datetime
from authsvc.errors import InvalidArgument
from authsvc.inputs import MAX_ID_LENGTH, SERVICE_ID_GRAMMAR, check_name
from authsvc.storage.records import TrustRecord
from authsvc.storage.repository import Repository
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.workload import StaticKeys, TrustedIssuer, check_jwks_url, load_jwks_file
from authsvc.workload.federation import DEFAULT_MAX_LIFETIME
from authsvc.workload.public_keys import parse_jwk_set

__all__ = ["TrustRegistry", "trust_key_ids"]


def trust_key_ids(record: TrustRecord) -> tuple[str, ...] | None:
    """The key ids of a file trust's stored JWK Set (the `kid` each key carries, else its
    thumbprint), for `trust list`; None for a URL trust (its keys are fetched)."""
    if record.jwks_json is None:
        return None
    parsed = parse_jwk_set(json.loads(record.jwks_json))
    return tuple(k.jwk_kid or k.key_id for k in parsed.keys)


class TrustRegistry:
    """The trust use cases. Each call is one transaction and writes one audit row."""

    def __init__(self, repo: Repository, clock: Clock, audit: AuditTrail) -> None:
        self._repo = repo
        self._clock = clock
        self._trail = audit

    def add(
        self,
        name: str,
        issuer: str,
        audience: str,
        *,
        origin: Origin,
        jwks_file: str | Path | None = None,
        jwks_url: str | None = None,
        max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME,
    ) -> TrustRecord:
        """Trust an external issuer for federated tokens.

        Raises:
            InvalidArgument: not exactly one of `jwks_file` / `jwks_url`; a malformed name,
                issuer, audience or URL; a file that is not a JWK Set with an RS256/ES256
                key; a lifetime outside 1 second to 7 days.
            AlreadyExists: the name, or the issuer, is taken by another trust.
        """
        if not SERVICE_ID_GRAMMAR.fullmatch(name):
            # The service-id grammar: no `=` (the CLI's TRUST=SUBJECT), no look-alikes.
            raise InvalidArgument(
                f"trust name must be 1-{MAX_ID_LENGTH} characters of a-z, 0-9, '-', '.' and "
                "'_', starting with a letter or digit"
            )
        if (jwks_file is None) == (jwks_url is None):
            raise InvalidArgument("give exactly one of --jwks-file and --jwks-url")
        # The rules a serving replica applies when it loads the trust, before any file is read.
        TrustedIssuer(name, issuer, audience, StaticKeys(()), max_lifetime_seconds)
        if jwks_file is not None:
            keys = load_jwks_file(jwks_file)
            jwks_json: str | None = json.dumps(
                {"keys": [k.to_jwk() for k in keys.keys]}, separators=(",", ":"), sort_keys=True
            )
            source = f"jwks=file keys={','.join(k.jwk_kid or k.key_id for k in keys.keys)}"
        else:
            assert jwks_url is not None  # exactly one of the two, checked above
            check_jwks_url(jwks_url)
            jwks_json = None
            # The host only: a query could carry something an audit row should not.
            source = f"jwks=url host={urlsplit(jwks_url).hostname}"
        now = to_datetime(self._clock.now())
        # Written with the trust, in its transaction: should the audit row fail, no trust
        # exists, so the caller told so may add it again (instead of "already exists").
        event = self._trail.event(
            origin,
            action="add_trust",
            target=f"trust:{name}",
            detail=(
                f"issuer={issuer} audience={audience} {source} max_lifetime={max_lifetime_seconds}"
            ),
        )
        record = self._repo.create_trust(
            TrustRecord(
                name=name,
                issuer=issuer,
                audience=audience,
                jwks_json=jwks_json,
                jwks_url=jwks_url,
                max_lifetime_seconds=max_lifetime_seconds,
                created_at=now,
            ),
            now,
            audit=event,
        )
        self._trail.log(event)
        return record

    def list(self) -> list[TrustRecord]:
        return self._repo.list_trusts()

    def remove(self, name: str, origin: Origin) -> int:
        """Stop trusting an issuer; returns how many federated subjects were unbound with it.

        A secretless service whose only credential was such a subject can no longer log in:
        removing a trust is what an admin does when that issuer is compromised, so it is not
        held back for it (the CLI names those services).

        Raises:
            InvalidArgument: a malformed name.
            NotFound: no such trust.
        """
        check_name(name, "trust name")
        # The row, built in the removal's transaction from what it unbound, and written there:
        # should it fail, the trust and its bindings stay, as the caller is told.
        audit = self._trail.counted(
            lambda unbound: self._trail.event(
                origin,
                action="remove_trust",
                target=f"trust:{name}",
                detail=f"federated_subjects_unbound={unbound}",
            )
        )
        unbound = self._repo.delete_trust(name, to_datetime(self._clock.now()), audit=audit)
        audit.log()
        return unbound
