"""Registering and disabling services: one implementation for the admin RPCs and the CLI.

Secret rotation lives in `authsvc.usecases.secrets`."""

from __future__ import annotations

from collections.abc import Sequence

from authsvc.clock import Clock, to_datetime
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.inputs import check_audiences, check_new_service_id, check_scopes
from authsvc.storage.records import ServiceRecord
from authsvc.storage.repository import Repository
from authsvc.usecases.revocation import revoke_service_tokens


def register_service(
    repo: Repository,
    hasher: SecretHasher,
    clock: Clock,
    service_id: str,
    audiences: Sequence[str],
    scopes: Sequence[str],
) -> tuple[ServiceRecord, str]:
    """Create a service; returns it with its secret, which is shown once and stored only hashed.

    The input rules run here too, so no caller (RPC, CLI, a script) can store a name that a
    later login or token would choke on.
    """
    check_new_service_id(service_id)
    check_audiences(audiences)
    check_scopes(scopes, "scopes")
    secret = mint_secret()
    record = repo.create_service(
        service_id,
        list(dict.fromkeys(audiences)),
        list(dict.fromkeys(scopes)),
        hasher.hash(secret),
        to_datetime(clock.now()),
    )
    return record, secret


def disable_service(
    repo: Repository, clock: Clock, service_id: str, *, token_lifetime_seconds: int
) -> ServiceRecord:
    """Disable a service and revoke every token it holds.

    The revocation is what reaches local validators (they follow WatchRevocations, not the
    services table); replicas also refuse the subject through their disabled set. The cutoff is
    the next whole second: a disabled service cannot get new tokens, so nothing legitimate is
    caught by rounding up.
    """
    now = clock.now()
    record = repo.update_service_disabled(service_id, True, to_datetime(now))
    revoke_service_tokens(
        repo,
        service_id,
        now=now,
        token_lifetime_seconds=token_lifetime_seconds,
        reason="service disabled",
        kind="service_disabled",
    )
    return record
