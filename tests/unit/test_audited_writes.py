"""A change and its audit row persist together or not at all (DESIGN: a database hiccup never
corrupts state or acknowledges a write that did not persist).

Each admin write whose audit row (or, for a disable, whose revocation) fails to insert, as a
SQLite busy past its timeout or a dropped PostgreSQL connection makes it, raises
StorageUnavailable and leaves nothing behind: the old secret still logs in, no half-made
service exists, no service is disabled without its revocation. A retry then succeeds. Real
SQLite database, real use cases; the failure is the driver's, injected at the INSERT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from authsvc.clock import to_datetime
from authsvc.crypto.kek import KeyEncryptionKey
from authsvc.errors import StorageUnavailable, Unauthenticated
from authsvc.server.app import Core, build_core, service_registry
from authsvc.storage.records import AudienceGrant
from authsvc.usecases.audit import CLI_ACTOR, Origin
from authsvc.usecases.callers import Callers
from authsvc.usecases.kek import rotate_kek_audited
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.logins import Login, SecretCredential
from authsvc.usecases.revocation import Revocations
from authsvc.usecases.secrets import Secrets
from authsvc.usecases.services import CredentialChange, GrantChange, ServiceRegistry
from authsvc.usecases.signing_keys import SigningKeys
from authsvc.usecases.trusts import TrustRegistry
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.verifier import TokenVerifier
from tests.storage.helpers import failing_insert
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings

OPS = Origin(actor="ops-admin", peer="ipv4:10.0.0.9", request_id="req-1")
SPIFFE = "spiffe://example.org/ns/prod/sa/orders"


@dataclass
class World:
    core: Core
    clock: FakeClock
    logins: LoginBatcher
    secrets: Secrets
    registry: ServiceRegistry
    orders: str

    def logs_in(self, secret: str, service_id: str = "orders") -> bool:
        credential = SecretCredential.present(self.core.hasher, service_id, secret)
        try:
            self.logins.authenticate_sync(Login(credential, OPS, "issue_token"))
        except Unauthenticated:
            return False
        return True

    def audit(self, action: str) -> list[tuple[str, str, str]]:
        rows = reversed(self.core.repo.list_audit_events(limit=1000))
        return [(r.actor, r.outcome, r.detail) for r in rows if r.action == action]

    def fails(self, table: str, marker: str) -> AbstractContextManager[list[str]]:
        return failing_insert(self.core.repo.engine, table, marker)

    def revocations(self) -> list[tuple[str | None, str]]:
        found = self.core.repo.list_revocations(0, to_datetime(self.clock.now()), 100)
        return [(r.service_id, r.kind) for r in found]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = FakeClock()
    core = build_core(in_process_settings(tmp_path), clock)
    registry = service_registry(core)
    _, orders = registry.create(OPS, "orders", ["billing", "inventory"], ["billing.read"])
    logins = LoginBatcher(core.repo, core.settings, clock)
    secrets = Secrets(
        settings=core.settings,
        repo=core.repo,
        hasher=core.hasher,
        clock=clock,
        trail=core.trail,
        logins=logins,
    )
    try:
        yield World(core, clock, logins, secrets, registry, orders)
    finally:
        logins.close()
        core.dispose()


def _audit_lines(caplog: pytest.LogCaptureFixture, action: str) -> list[str]:
    return [
        getattr(r, "outcome", "")
        for r in caplog.records
        if r.name == "authsvc.server"
        and r.getMessage() == "audit"
        and getattr(r, "action", "") == action
    ]


class TestSecretRotation:
    def test_an_admin_rotation_whose_audit_row_fails_rotates_nothing(
        self, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        admin = Origin.local(CLI_ACTOR)
        with world.fails("audit_events", "rotate_secret") as fired:
            with pytest.raises(StorageUnavailable):
                world.secrets.rotate_by_admin("orders", 0, admin)
        assert fired
        # Grace 0 would have deleted the old secret: it still works, and nothing is audited
        # or logged as done.
        assert world.logs_in(world.orders)
        assert world.audit("rotate_secret") == []
        assert _audit_lines(caplog, "rotate_secret") == []
        rotated = world.secrets.rotate_by_admin("orders", 0, admin)
        assert world.logs_in(rotated.secret)
        assert not world.logs_in(world.orders)
        assert world.audit("rotate_secret") == [("cli", "ok", "grace_seconds=0")]
        assert _audit_lines(caplog, "rotate_secret") == ["ok"]

    def test_a_retry_after_a_failed_rotation_keeps_the_original_secret_in_its_grace(
        self, world: World
    ) -> None:
        admin = Origin.local(CLI_ACTOR)
        with world.fails("audit_events", "rotate_secret"), pytest.raises(StorageUnavailable):
            world.secrets.rotate_by_admin("orders", 300, admin)
        # The retry demotes the original secret (what the fleet holds), not a lost one.
        rotated = world.secrets.rotate_by_admin("orders", 300, admin)
        assert rotated.previous_until is not None
        assert world.logs_in(world.orders)
        assert world.logs_in(rotated.secret)

    def test_a_failed_rotation_leaves_the_previous_slot_intact(self, world: World) -> None:
        admin = Origin.local(CLI_ACTOR)
        first = world.secrets.rotate_by_admin("orders", 300, admin)
        with world.fails("audit_events", "rotate_secret"), pytest.raises(StorageUnavailable):
            world.secrets.rotate_by_admin("orders", 300, admin)
        # Both secrets of the roll in progress still log in: the original in its grace, the
        # first rotation's as current.
        assert world.logs_in(world.orders)
        assert world.logs_in(first.secret)
        assert [o for _, o, _ in world.audit("rotate_secret")] == ["ok"]

    def test_a_self_rotation_whose_audit_row_fails_keeps_the_current_secret(
        self, world: World
    ) -> None:
        with world.fails("audit_events", "rotate_secret"), pytest.raises(StorageUnavailable):
            world.secrets.rotate_by_self("orders", world.orders, 0, OPS)
        # Still the current secret: it logs in and may rotate itself again.
        assert world.logs_in(world.orders)
        rotated = world.secrets.rotate_by_self("orders", world.orders, 0, OPS)
        assert world.logs_in(rotated.secret)
        assert not world.logs_in(world.orders)
        assert world.audit("rotate_secret") == [("orders", "ok", "grace_seconds=0")]


class TestCreate:
    def test_a_create_whose_audit_row_fails_leaves_no_service(self, world: World) -> None:
        with world.fails("audit_events", "create_service"), pytest.raises(StorageUnavailable):
            world.registry.create(OPS, "billing", ["orders"], ["orders.read"])
        assert world.core.repo.fetch_service("billing") is None
        assert world.core.repo.fetch_service_credentials("billing") is None
        # The retry registers it (not "already exists") and its one-time secret works.
        record, secret = world.registry.create(OPS, "billing", ["orders"], ["orders.read"])
        assert record.grants == (AudienceGrant("orders", ("orders.read",)),)
        assert world.logs_in(secret, "billing")
        assert [(a, o, d) for a, o, d in world.audit("create_service")][-1] == (
            "ops-admin",
            "ok",
            "orders=orders.read",
        )
        assert len(world.audit("create_service")) == 2  # orders (fixture), billing


class TestDisable:
    @pytest.mark.parametrize(
        ("table", "marker"),
        [("audit_events", "disable_service"), ("revocations", "service disabled")],
    )
    def test_a_disable_that_fails_leaves_the_service_enabled_and_unrevoked(
        self, world: World, table: str, marker: str
    ) -> None:
        with world.fails(table, marker) as fired, pytest.raises(StorageUnavailable):
            world.registry.disable(OPS, "orders")
        assert fired
        # Never disabled without the revocation local validators follow, nor the reverse.
        service = world.core.repo.fetch_service("orders")
        assert service is not None and not service.disabled
        assert world.core.repo.list_disabled_service_ids() == []
        assert world.core.repo.fetch_service_cutoff("orders") is None
        assert world.revocations() == []
        assert world.audit("disable_service") == []
        assert world.logs_in(world.orders)
        # The retry does all of it.
        assert world.registry.disable(OPS, "orders").disabled
        assert world.core.repo.list_disabled_service_ids() == ["orders"]
        assert world.revocations() == [("orders", "service_disabled")]
        assert world.audit("disable_service") == [("ops-admin", "ok", "")]

    def test_an_enable_whose_audit_row_fails_leaves_the_service_disabled(
        self, world: World
    ) -> None:
        world.registry.disable(OPS, "orders")
        world.clock.advance(2)
        with world.fails("audit_events", "enable_service"), pytest.raises(StorageUnavailable):
            world.registry.enable(OPS, "orders")
        assert world.core.repo.list_disabled_service_ids() == ["orders"]
        assert world.audit("enable_service") == []
        assert not world.registry.enable(OPS, "orders").disabled
        assert world.audit("enable_service") == [("ops-admin", "ok", "")]


class TestUpdate:
    def test_a_grant_change_whose_audit_row_fails_changes_nothing(self, world: World) -> None:
        change = GrantChange(remove_audiences=("inventory",))
        with world.fails("audit_events", "update_service"), pytest.raises(StorageUnavailable):
            world.registry.update(OPS, "orders", change)
        service = world.core.repo.fetch_service("orders")
        assert service is not None and service.audiences == ("billing", "inventory")
        # The retry applies it (not "audience inventory is not granted").
        assert world.registry.update(OPS, "orders", change).audiences == ("billing",)
        assert world.audit("update_service") == [("ops-admin", "ok", "billing=billing.read")]

    def test_a_credential_change_whose_audit_row_fails_changes_nothing(self, world: World) -> None:
        change = CredentialChange(add_tls_sans=(SPIFFE,))
        with world.fails("audit_events", "update_service"), pytest.raises(StorageUnavailable):
            world.registry.update(OPS, "orders", None, change)
        assert world.registry.credentials_of("orders").tls_sans == ()
        # The retry adds it (not "already registered").
        world.registry.update(OPS, "orders", None, change)
        assert world.registry.credentials_of("orders").tls_sans == (SPIFFE,)
        assert [o for _, o, _ in world.audit("update_service")] == ["ok"]

    def test_both_parts_are_undone_when_the_audit_row_fails(self, world: World) -> None:
        before = world.registry.credentials_of("orders")
        with world.fails("audit_events", "update_service"), pytest.raises(StorageUnavailable):
            world.registry.update(
                OPS,
                "orders",
                GrantChange(remove_audiences=("inventory",)),
                CredentialChange(add_tls_sans=(SPIFFE,)),
            )
        assert world.registry.credentials_of("orders") == before
        service = world.core.repo.fetch_service("orders")
        assert service is not None and service.audiences == ("billing", "inventory")
        assert world.audit("update_service") == []


# -- revocations, signing keys, trusts and the KEK: the same rule ----------------------------

Row = tuple[str, str, str, str, str, str]


def _rows(world: World, action: str) -> list[Row]:
    """Every field of the audit rows of `action` but the time, oldest first."""
    rows = reversed(world.core.repo.list_audit_events(limit=1000))
    return [
        (r.actor, r.target, r.outcome, r.detail, r.peer, r.request_id)
        for r in rows
        if r.action == action
    ]


def _ops(target: str, detail: str = "", outcome: str = "ok") -> Row:
    return ("ops-admin", target, outcome, detail, OPS.peer, OPS.request_id)


@pytest.fixture
def revocations(world: World) -> Revocations:
    settings = world.core.settings
    verifier = TokenVerifier(
        keys=lambda: KeyRing({}),
        revocations=RevocationSet(),
        issuer=settings.issuer,
        clock=world.clock.now,
    )
    return Revocations(
        settings=settings,
        repo=world.core.repo,
        verifier=verifier,
        clock=world.clock,
        trail=world.core.trail,
        callers=Callers(settings, verifier),
    )


class TestRevocation:
    def test_a_jti_revocation_whose_audit_row_fails_revokes_nothing(
        self, world: World, revocations: Revocations, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        with world.fails("audit_events", "revoke_token") as fired:
            with pytest.raises(StorageUnavailable):
                asyncio.run(revocations.revoke_jti("jti-1", "leaked", OPS))
        assert fired
        assert world.revocations() == []
        assert _rows(world, "revoke_token") == []
        assert _audit_lines(caplog, "revoke_token") == []
        assert asyncio.run(revocations.revoke_jti("jti-1", "leaked", OPS))
        assert world.revocations() == [(None, "token")]
        assert _rows(world, "revoke_token") == [_ops("jti:jti-1")]
        assert _audit_lines(caplog, "revoke_token") == ["ok"]

    def test_a_service_revocation_whose_audit_row_fails_revokes_nothing(
        self, world: World, revocations: Revocations, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        action = "revoke_service_tokens"
        with world.fails("audit_events", action) as fired, pytest.raises(StorageUnavailable):
            asyncio.run(revocations.revoke_service("orders", "", OPS))
        assert fired
        assert world.revocations() == []
        assert world.core.repo.fetch_service_cutoff("orders") is None
        assert _rows(world, action) == []
        assert _audit_lines(caplog, action) == []
        assert asyncio.run(revocations.revoke_service("orders", "", OPS))
        assert world.revocations() == [("orders", "service_tokens")]
        assert _rows(world, action) == [_ops("service:orders")]
        assert _audit_lines(caplog, action) == ["ok"]


def _key_states(world: World) -> dict[str, str]:
    return {k.kid: k.state for k in world.core.repo.list_signing_keys()}


@pytest.fixture
def keys(world: World) -> SigningKeys:
    world.core.manager.ensure_active()
    return world.core.signing_keys()


class TestSigningKeyRotation:
    @pytest.mark.parametrize("revoke_previous", [False, True])
    def test_a_rotation_whose_audit_row_fails_rotates_nothing(
        self,
        world: World,
        keys: SigningKeys,
        caplog: pytest.LogCaptureFixture,
        revoke_previous: bool,
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        before = _key_states(world)
        with world.fails("audit_events", "rotate_signing_key") as fired:
            with pytest.raises(StorageUnavailable):
                keys.rotate(OPS, revoke_previous=revoke_previous)
        assert fired
        # Nothing activated, retired or revoked: a retry rotates once, not twice.
        assert _key_states(world) == before
        assert _rows(world, "rotate_signing_key") == []
        assert _audit_lines(caplog, "rotate_signing_key") == []
        result = keys.rotate(OPS, revoke_previous=revoke_previous)
        assert result.rotated_here
        active = world.core.repo.fetch_active_signing_key()
        assert (
            active is not None
            and active.kid == result.key.kid
            and active.kid not in (kid for kid, state in before.items() if state == "active")
        )
        assert _rows(world, "rotate_signing_key") == [
            _ops(f"key:{result.key.kid}", f"revoke_previous={revoke_previous}")
        ]
        assert _audit_lines(caplog, "rotate_signing_key") == ["ok"]

    def test_a_replica_that_lost_the_race_records_already_rotated(
        self, world: World, keys: SigningKeys, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        manager = world.core.manager
        stale = manager.active_key()
        # Another replica rotates between this one's read of the active key and its write.
        won = world.core.signing_keys().rotate(OPS)
        monkeypatch.setattr(manager, "active_key", lambda: stale)
        lost = keys.rotate(OPS)
        assert not lost.rotated_here and lost.key.kid == won.key.kid
        assert _rows(world, "rotate_signing_key") == [
            _ops(f"key:{won.key.kid}", "revoke_previous=False"),
            _ops(f"key:{won.key.kid}", "revoke_previous=False", "already_rotated"),
        ]

    def test_a_scheduled_rotation_whose_audit_row_fails_rotates_nothing(
        self, world: World, keys: SigningKeys, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        world.clock.advance(world.core.settings.key_rotation_interval_seconds + 1)
        before = _key_states(world)
        with world.fails("audit_events", "rotate_signing_key") as fired:
            with pytest.raises(StorageUnavailable):
                keys.scheduled_round(world.clock.now())
        assert fired
        assert _key_states(world) == before
        assert _rows(world, "rotate_signing_key") == []
        assert _audit_lines(caplog, "rotate_signing_key") == []
        done = keys.scheduled_round(world.clock.now())
        assert done.rotated is not None
        ((actor, target, outcome, detail, peer, _),) = _rows(world, "rotate_signing_key")
        assert (actor, target, outcome, detail, peer) == (
            "scheduler",
            f"key:{done.rotated.kid}",
            "ok",
            "scheduled",
            "local",
        )
        assert _audit_lines(caplog, "rotate_signing_key") == ["ok"]
        # Not due again: no rotation, no row.
        assert keys.scheduled_round(world.clock.now()).rotated is None
        assert len(_rows(world, "rotate_signing_key")) == 1


_ISSUER = "https://token.actions.example"
_TRUST_DETAIL = f"issuer={_ISSUER} audience=authsvc jwks=url host=token.actions.example"


class TestTrusts:
    def _add(self, trusts: TrustRegistry) -> None:
        trusts.add("gh", _ISSUER, "authsvc", origin=OPS, jwks_url=f"{_ISSUER}/jwks")

    def test_a_trust_whose_audit_row_fails_is_not_added(
        self, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        trusts = TrustRegistry(world.core.repo, world.clock, world.core.trail)
        with world.fails("audit_events", "add_trust") as fired, pytest.raises(StorageUnavailable):
            self._add(trusts)
        assert fired
        assert world.core.repo.fetch_trust("gh") is None
        assert _rows(world, "add_trust") == []
        assert _audit_lines(caplog, "add_trust") == []
        # The retry adds it (not "already exists").
        self._add(trusts)
        assert world.core.repo.fetch_trust("gh") is not None
        assert _rows(world, "add_trust") == [
            _ops("trust:gh", f"{_TRUST_DETAIL} max_lifetime=86400")
        ]
        assert _audit_lines(caplog, "add_trust") == ["ok"]

    def test_a_trust_whose_removal_audit_row_fails_is_not_removed(
        self, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        trusts = TrustRegistry(world.core.repo, world.clock, world.core.trail)
        self._add(trusts)
        subject = "repo:acme/orders:ref:refs/heads/main"
        world.registry.update(
            OPS, "orders", None, CredentialChange(add_federated_subjects=(("gh", subject),))
        )
        with world.fails("audit_events", "remove_trust") as fired:
            with pytest.raises(StorageUnavailable):
                trusts.remove("gh", OPS)
        assert fired
        # Still trusted, its subject still bound: nothing was removed.
        assert world.core.repo.fetch_trust("gh") is not None
        assert world.core.repo.fetch_federated_binding("gh", subject) == "orders"
        assert _rows(world, "remove_trust") == []
        assert _audit_lines(caplog, "remove_trust") == []
        assert trusts.remove("gh", OPS) == 1
        assert world.core.repo.fetch_trust("gh") is None
        assert world.core.repo.fetch_federated_binding("gh", subject) is None
        assert _rows(world, "remove_trust") == [_ops("trust:gh", "federated_subjects_unbound=1")]
        assert _audit_lines(caplog, "remove_trust") == ["ok"]


class TestKekRotation:
    def test_a_kek_rotation_whose_audit_row_fails_switches_nothing(
        self, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="authsvc.server")
        core = world.core
        core.manager.ensure_active()
        old = core.repo.fetch_wrapping_kek_id()
        new = KeyEncryptionKey.from_base64(KeyEncryptionKey.generate_base64())

        def rotate() -> int:
            ring = core.settings.kek_ring
            return rotate_kek_audited(core.repo, ring, new, world.clock, core.trail, OPS).rewrapped

        with world.fails("audit_events", "rotate_kek") as fired, pytest.raises(StorageUnavailable):
            rotate()
        assert fired
        # Every item still under the old KEK: the one the servers are configured with.
        assert core.repo.fetch_wrapping_kek_id() == old != new.kek_id
        assert {k.kek_id for k in core.repo.list_signing_keys()} == {old}
        assert _rows(world, "rotate_kek") == []
        assert _audit_lines(caplog, "rotate_kek") == []
        rewrapped = rotate()
        assert rewrapped >= 3  # the active and next keys, the secret-hash key
        assert core.repo.fetch_wrapping_kek_id() == new.kek_id
        assert {k.kek_id for k in core.repo.list_signing_keys()} == {new.kek_id}
        assert rotate() == 0
        assert _rows(world, "rotate_kek") == [
            _ops(f"kek:{new.kek_id}", f"rewrapped={rewrapped}"),
            _ops(f"kek:{new.kek_id}", "rewrapped=0", "already_rotated"),
        ]
        assert _audit_lines(caplog, "rotate_kek") == ["ok", "already_rotated"]
