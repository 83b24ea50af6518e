"""Services: register, list, change, disable and enable; one rule for the admin RPCs and the CLI.

A service is granted audiences, each with its own scopes (Hydra's audience allow-list plus
scopes, Keycloak's per-client scope mapping): a token for one audience carries only what was
granted for that audience. The plain flags keep the meaning they had when scopes were not tied
to an audience:

- `create --audience A --scope S` grants every `--scope` for every `--audience` named;
- `update --add-audience A` grants A every scope the service has for any audience (the union);
- `update --add-scope S` grants S for each of its audiences, `--remove-scope S` takes it from
  each, `--remove-audience A` takes A with its scopes;
- `--grant A=S` (create, update) grants S for A only (adding A if it is new; `A=` adds A with
  no scope), `--revoke-grant A=S` takes S from A only (A stays, perhaps with no scope).

An update applies its removals first and then its additions, each kind in that order: so
`--remove-scope S --grant A=S` leaves S on A alone, and an added audience gets the union of
what is left. Naming one value both to add and to remove is refused, as is removing what the
service does not have (a typo must not pass as done). A service keeps at least one audience:
disable it instead. Every change writes one audit row.

Nothing here knows gRPC: errors are `authsvc.errors` types, mapped to status by the servicer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.errors import FailedPrecondition, InvalidArgument, NotFound
from authsvc.inputs import (
    MAX_AUDIENCES,
    MAX_SCOPES,
    check_audiences,
    check_name,
    check_new_service_id,
    check_scopes,
)
from authsvc.storage.records import AudienceGrant, ServiceRecord
from authsvc.storage.repository import Repository
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.revocation import revoke_service_tokens
from authsvc_client.claims import ADMIN_SCOPE

__all__ = ["GrantChange", "ServiceRegistry", "grants_detail", "merge_grants"]


def merge_grants(grants: Iterable[AudienceGrant]) -> tuple[AudienceGrant, ...]:
    """One grant per audience, in first-named order, each scope once."""
    merged: dict[str, dict[str, None]] = {}
    for g in grants:
        merged.setdefault(g.audience, {}).update(dict.fromkeys(g.scopes))
    return tuple(AudienceGrant(a, tuple(scopes)) for a, scopes in merged.items())


def grants_detail(grants: Sequence[AudienceGrant]) -> str:
    """A service's grants as its audit row shows them: `billing=billing.read,billing.write
    inventory=` (an audience with no scope ends in `=`)."""
    return " ".join(f"{g.audience}={','.join(g.scopes)}" for g in grants)


def _check_grants(grants: Sequence[AudienceGrant], field: str) -> None:
    check_audiences([g.audience for g in grants], field)
    for g in grants:
        check_scopes(g.scopes, field)


def _check_bounds(grants: Sequence[AudienceGrant]) -> None:
    if len(grants) > MAX_AUDIENCES:
        raise InvalidArgument(f"a service has at most {MAX_AUDIENCES} audiences")
    if any(len(g.scopes) > MAX_SCOPES for g in grants):
        raise InvalidArgument(f"an audience carries at most {MAX_SCOPES} scopes")


@dataclass(frozen=True)
class GrantChange:
    """What one `services update` (UpdateService) asks for; see the module docstring."""

    add_audiences: tuple[str, ...] = ()
    remove_audiences: tuple[str, ...] = ()
    add_scopes: tuple[str, ...] = ()
    remove_scopes: tuple[str, ...] = ()
    # Scopes for one audience only; an empty tuple grants the audience with no scope.
    grants: tuple[AudienceGrant, ...] = ()
    revoke_grants: tuple[AudienceGrant, ...] = ()

    def check(self) -> None:
        """The input rules, before anything is read: grammar, bounds, no contradiction.

        Raises:
            InvalidArgument: nothing to change, a malformed value, or one value named both to
                add and to remove.
        """
        if not any(
            (
                self.add_audiences,
                self.remove_audiences,
                self.add_scopes,
                self.remove_scopes,
                self.grants,
                self.revoke_grants,
            )
        ):
            raise InvalidArgument("nothing to change: name an audience, scope or grant")
        check_audiences(self.add_audiences, "add_audiences")
        check_audiences(self.remove_audiences, "remove_audiences")
        check_scopes(self.add_scopes, "add_scopes")
        check_scopes(self.remove_scopes, "remove_scopes")
        _check_grants(self.grants, "grants")
        _check_grants(self.revoke_grants, "revoke_grants")
        if any(not g.scopes for g in self.revoke_grants):
            raise InvalidArgument("revoke_grants: each names a scope (remove_audiences takes one)")
        both = set(self.add_audiences) & set(self.remove_audiences)
        both |= set(self.add_scopes) & set(self.remove_scopes)
        granted = {f"{g.audience}={s}" for g in self.grants for s in g.scopes}
        both |= granted & {f"{g.audience}={s}" for g in self.revoke_grants for s in g.scopes}
        if both:
            raise InvalidArgument("named both to add and to remove: " + " ".join(sorted(both)))

    def apply(self, grants: Sequence[AudienceGrant]) -> tuple[AudienceGrant, ...]:
        """The grants after this change (removals, then additions).

        Raises:
            FailedPrecondition: it removes what the service does not have, or its last audience.
            InvalidArgument: the result is over a bound.
        """
        held: dict[str, dict[str, None]] = {g.audience: dict.fromkeys(g.scopes) for g in grants}
        for audience in self.remove_audiences:
            if held.pop(audience, None) is None:
                raise FailedPrecondition(f"audience {audience} is not granted to this service")
        for scope in self.remove_scopes:
            holders = [scopes for scopes in held.values() if scope in scopes]
            if not holders:
                raise FailedPrecondition(f"scope {scope} is not granted to this service")
            for scopes in holders:
                del scopes[scope]
        for g in self.revoke_grants:
            own = held.get(g.audience, {})
            for scope in g.scopes:
                if scope not in own:
                    raise FailedPrecondition(
                        f"scope {scope} is not granted for audience {g.audience}"
                    )
                del own[scope]
        union = dict.fromkeys(s for scopes in held.values() for s in scopes)
        for audience in self.add_audiences:
            held.setdefault(audience, dict(union))
        for scopes in held.values():
            scopes.update(dict.fromkeys(self.add_scopes))
        for g in self.grants:
            held.setdefault(g.audience, {}).update(dict.fromkeys(g.scopes))
        if not held:
            raise FailedPrecondition("a service keeps at least one audience (disable it instead)")
        result = tuple(AudienceGrant(a, tuple(scopes)) for a, scopes in held.items())
        _check_bounds(result)
        return result


class ServiceRegistry:
    """The services use cases. Each call is its own transaction(s) and writes one audit row."""

    def __init__(
        self,
        repo: Repository,
        hasher: SecretHasher,
        clock: Clock,
        settings: Settings,
        trail: AuditTrail,
    ) -> None:
        self._repo = repo
        self._hasher = hasher
        self._clock = clock
        self._s = settings
        self._trail = trail

    def initial_grants(
        self,
        audiences: Sequence[str],
        scopes: Sequence[str],
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
    ) -> tuple[AudienceGrant, ...]:
        """What `create` grants: every scope for every audience named, the per-audience grants,
        and with `admin` scope authsvc.admin for the server's own audience (and no other)."""
        every = tuple(scopes)
        wanted = [AudienceGrant(a, every) for a in audiences]
        wanted += grants
        if admin:
            wanted.append(AudienceGrant(self._s.admin_audience, (ADMIN_SCOPE,)))
        return merge_grants(wanted)

    def create(
        self,
        origin: Origin,
        service_id: str,
        audiences: Sequence[str] = (),
        scopes: Sequence[str] = (),
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
    ) -> tuple[ServiceRecord, str]:
        """Register a service; returns it with its secret, shown once and stored only hashed.

        The input rules run here, so no caller (RPC, CLI, a script) can store a name that a
        later login or token would choke on.

        Raises:
            InvalidArgument: a malformed id, audience or scope, or no audience at all.
            AlreadyExists: the id is taken.
        """
        check_new_service_id(service_id)
        check_audiences(audiences)
        check_scopes(scopes, "scopes")
        _check_grants(grants, "grants")
        wanted = self.initial_grants(audiences, scopes, grants, admin=admin)
        if not wanted:
            raise InvalidArgument("at least one audience is required")
        _check_bounds(wanted)
        secret = mint_secret()
        record = self._repo.create_service(
            service_id, wanted, self._hasher.hash(secret), to_datetime(self._clock.now())
        )
        self._trail.record(
            origin,
            action="create_service",
            target=f"service:{record.service_id}",
            detail=grants_detail(record.grants),
        )
        return record, secret

    def list(self) -> list[ServiceRecord]:
        return self._repo.list_services()

    def update(self, origin: Origin, service_id: str, change: GrantChange) -> ServiceRecord:
        """Change a live service's grants; the next login on any replica gets the new ones
        (logins read the service inside their own transaction, never from a replica's memory).

        Raises:
            InvalidArgument: see GrantChange.check.
            FailedPrecondition: see GrantChange.apply.
            NotFound: no such service.
        """
        check_name(service_id, "service_id")
        change.check()
        before, after = self._repo.update_service_grants(
            service_id, lambda s: change.apply(s.grants), to_datetime(self._clock.now())
        )
        self._trail.record(
            origin,
            action="update_service",
            target=f"service:{service_id}",
            outcome="ok" if after.grants != before.grants else "unchanged",
            detail=grants_detail(after.grants),
        )
        return after

    def disable(self, origin: Origin, service_id: str) -> ServiceRecord:
        """Disable a service and revoke every token it holds.

        The revocation is what reaches local validators (they follow WatchRevocations, not the
        services table); replicas also refuse the subject through their disabled set. The
        cutoff is the next whole second: a disabled service cannot get new tokens, so nothing
        legitimate is caught by rounding up (`enable` waits for that second to begin).

        Raises:
            NotFound: no such service.
        """
        check_name(service_id, "service_id")
        now = self._clock.now()
        record = self._repo.update_service_disabled(service_id, True, to_datetime(now))
        revoke_service_tokens(
            self._repo,
            service_id,
            now=now,
            token_lifetime_seconds=self._s.max_ttl_seconds + self._s.leeway_seconds,
            reason="service disabled",
            kind="service_disabled",
        )
        self._trail.record(origin, action="disable_service", target=f"service:{service_id}")
        return record

    def enable(self, origin: Origin, service_id: str) -> ServiceRecord:
        """Undo a disable: the service may log in again. What the disable revoked stays
        revoked (its revocation is kept until those tokens expire, here and on every local
        validator): only tokens issued from now on are valid.

        `iat` has whole seconds and the disable's cutoff is the next whole second, so a token
        issued within that second would fall before it: the enable waits for the second to
        begin (at most one second) before it lets the service log in.

        Raises:
            NotFound: no such service.
        """
        check_name(service_id, "service_id")
        current = self._repo.fetch_service(service_id)
        if current is None:
            raise NotFound(f"service {service_id!r} not found")
        if not current.disabled:
            self._trail.record(
                origin,
                action="enable_service",
                target=f"service:{service_id}",
                outcome="already_enabled",
            )
            return current
        cutoff = self._repo.fetch_service_cutoff(service_id)
        if cutoff is not None:
            # At most a second ahead as its writer saw it; the bound keeps a clock that
            # stepped back from holding the call.
            wait = min(to_timestamp(cutoff) - self._clock.now(), 1.0)
            if wait > 0:
                self._clock.sleep(wait)
        record = self._repo.update_service_disabled(
            service_id, False, to_datetime(self._clock.now())
        )
        self._trail.record(origin, action="enable_service", target=f"service:{service_id}")
        return record
