"""The services use case without a gRPC server: real SQLite storage, a fake clock.

Grants per audience (issue 12 item 6) and changing a live service (item 7): the plain flags
keep their meaning, per-audience grants stay per audience, every change is audited once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from authsvc.clock import to_datetime, to_timestamp
from authsvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from authsvc.inputs import parse_grant
from authsvc.server.app import Core, build_core, service_registry
from authsvc.storage.records import AudienceGrant, ServiceRecord
from authsvc.usecases.audit import Origin
from authsvc.usecases.services import GrantChange, ServiceRegistry
from tests.storage.helpers import live_secrets
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings

OPS = Origin(actor="ops-admin", peer="ipv4:10.0.0.9", request_id="req-1")
G = AudienceGrant


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(tmp_path: Path, clock: FakeClock) -> Iterator[Core]:
    core = build_core(in_process_settings(tmp_path), clock)
    try:
        yield core
    finally:
        core.dispose()


@pytest.fixture
def registry(core: Core) -> ServiceRegistry:
    return service_registry(core)


def _update(registry: ServiceRegistry, **change: tuple[object, ...]) -> ServiceRecord:
    return registry.update(OPS, "orders", GrantChange(**change))  # type: ignore[arg-type]


def _audit(core: Core, action: str) -> list[tuple[str, str, str, str]]:
    events = reversed(core.repo.list_audit_events(limit=1000))
    return [(e.actor, e.target, e.outcome, e.detail) for e in events if e.action == action]


class TestCreate:
    def test_plain_flags_grant_every_scope_for_every_audience_named(
        self, registry: ServiceRegistry
    ) -> None:
        record, _ = registry.create(OPS, "orders", ["billing", "inventory"], ["b.read", "i.admin"])
        assert record.grants == (
            G("billing", ("b.read", "i.admin")),
            G("inventory", ("b.read", "i.admin")),
        )
        assert record.audiences == ("billing", "inventory")
        assert record.scopes == ("b.read", "i.admin")

    def test_a_grant_is_for_its_audience_only(self, registry: ServiceRegistry) -> None:
        record, _ = registry.create(
            OPS,
            "orders",
            ["billing"],
            ["billing.read"],
            [G("inventory", ("inventory.admin",)), G("search", ())],
        )
        assert record.grants == (
            G("billing", ("billing.read",)),
            G("inventory", ("inventory.admin",)),
            G("search", ()),
        )
        assert record.scopes_for("billing") == ("billing.read",)
        assert record.scopes_for("search") == ()
        assert record.scopes_for("payments") is None

    def test_admin_grants_the_admin_scope_for_the_server_audience_only(
        self, registry: ServiceRegistry
    ) -> None:
        record, _ = registry.create(OPS, "ops", ["billing"], ["billing.read"], admin=True)
        assert record.grants == (
            G("billing", ("billing.read",)),
            G("authsvc", ("authsvc.admin",)),
        )

    def test_create_is_audited_with_its_grants_and_the_secret_is_stored_hashed(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        _, secret = registry.create(OPS, "orders", ["billing"], [], [G("inventory", ("i.r",))])
        assert _audit(core, "create_service") == [
            ("ops-admin", "service:orders", "ok", "billing= inventory=i.r")
        ]
        hashes = [h for _, h in live_secrets(core.repo, "orders", datetime.now(UTC))]
        assert hashes == [core.hasher.hash(secret)]

    @pytest.mark.parametrize(
        ("audiences", "grants"),
        [([], []), (["bill ing"], []), ([], [G("café", ())]), (["billing"], [G("b", ("a b",))])],
    )
    def test_bad_or_missing_audiences_and_scopes_are_refused(
        self,
        core: Core,
        registry: ServiceRegistry,
        audiences: list[str],
        grants: list[AudienceGrant],
    ) -> None:
        with pytest.raises(InvalidArgument):
            registry.create(OPS, "orders", audiences, [], grants)
        assert core.repo.fetch_service("orders") is None
        assert _audit(core, "create_service") == []

    def test_a_taken_id_is_refused(self, registry: ServiceRegistry) -> None:
        registry.create(OPS, "orders", ["billing"])
        with pytest.raises(AlreadyExists):
            registry.create(OPS, "orders", ["inventory"])


class TestUpdate:
    @pytest.fixture(autouse=True)
    def orders(self, registry: ServiceRegistry) -> None:
        registry.create(
            OPS, "orders", ["billing"], ["billing.read"], [G("inventory", ("inventory.admin",))]
        )

    def test_an_added_audience_gets_every_scope_of_the_service(
        self, registry: ServiceRegistry
    ) -> None:
        record = _update(registry, add_audiences=("search",))
        assert record.scopes_for("search") == ("billing.read", "inventory.admin")
        assert record.scopes_for("billing") == ("billing.read",)

    def test_an_added_scope_applies_to_each_audience_and_a_removed_one_leaves_each(
        self, registry: ServiceRegistry
    ) -> None:
        record = _update(registry, add_scopes=("audit.read",))
        assert record.grants == (
            G("billing", ("billing.read", "audit.read")),
            G("inventory", ("inventory.admin", "audit.read")),
        )
        record = _update(registry, remove_scopes=("audit.read",))
        assert record.grants == (
            G("billing", ("billing.read",)),
            G("inventory", ("inventory.admin",)),
        )

    def test_grant_and_revoke_grant_touch_one_audience_and_it_may_keep_no_scope(
        self, registry: ServiceRegistry
    ) -> None:
        record = _update(registry, grants=(G("billing", ("billing.write",)),))
        assert record.scopes_for("billing") == ("billing.read", "billing.write")
        assert record.scopes_for("inventory") == ("inventory.admin",)
        record = _update(registry, revoke_grants=(G("inventory", ("inventory.admin",)),))
        assert record.scopes_for("inventory") == ()
        assert record.audiences == ("billing", "inventory")

    def test_removals_apply_before_additions(self, registry: ServiceRegistry) -> None:
        # Take billing.read from every audience, then give it back to inventory only.
        record = _update(
            registry, remove_scopes=("billing.read",), grants=(G("inventory", ("billing.read",)),)
        )
        assert record.grants == (
            G("billing", ()),
            G("inventory", ("inventory.admin", "billing.read")),
        )
        # An audience added beside a removal gets the union of what is left.
        record = _update(registry, remove_audiences=("inventory",), add_audiences=("search",))
        assert record.grants == (G("billing", ()), G("search", ()))

    def test_every_change_writes_one_audit_row_with_the_grants_after_it(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        _update(registry, add_scopes=("x",))
        _update(registry, add_audiences=("billing",))  # already granted: nothing changes
        assert _audit(core, "update_service") == [
            (
                "ops-admin",
                "service:orders",
                "ok",
                "billing=billing.read,x inventory=inventory.admin,x",
            ),
            (
                "ops-admin",
                "service:orders",
                "unchanged",
                "billing=billing.read,x inventory=inventory.admin,x",
            ),
        ]

    @pytest.mark.parametrize(
        "change",
        [
            {},
            {"add_scopes": ("a",), "remove_scopes": ("a",)},
            {"add_audiences": ("b",), "remove_audiences": ("b",)},
            {"grants": (G("b", ("s",)),), "revoke_grants": (G("b", ("s",)),)},
            {"revoke_grants": (G("billing", ()),)},
            {"add_audiences": ("bill ing",)},
            {"add_scopes": ('a"b',)},
        ],
    )
    def test_malformed_or_contradictory_changes_are_invalid(
        self, core: Core, registry: ServiceRegistry, change: dict[str, tuple[object, ...]]
    ) -> None:
        before = core.repo.fetch_service("orders")
        with pytest.raises(InvalidArgument):
            _update(registry, **change)
        assert core.repo.fetch_service("orders") == before
        assert _audit(core, "update_service") == []

    @pytest.mark.parametrize(
        ("change", "named"),
        [
            ({"remove_audiences": ("payments",)}, "payments"),
            ({"remove_scopes": ("billing.write",)}, "billing.write"),
            ({"revoke_grants": (G("billing", ("inventory.admin",)),)}, "inventory.admin"),
            ({"remove_audiences": ("billing", "inventory")}, "at least one audience"),
        ],
    )
    def test_removing_what_the_service_lacks_changes_nothing(
        self,
        core: Core,
        registry: ServiceRegistry,
        change: dict[str, tuple[object, ...]],
        named: str,
    ) -> None:
        before = core.repo.fetch_service("orders")
        # Also asks for an addition: the refusal rolls the whole change back.
        with pytest.raises(FailedPrecondition, match=named):
            _update(registry, add_scopes=("extra",), **change)
        assert core.repo.fetch_service("orders") == before

    def test_an_unknown_service_is_not_found(self, registry: ServiceRegistry) -> None:
        with pytest.raises(NotFound):
            registry.update(OPS, "ghost", GrantChange(add_scopes=("a",)))


class TestDisableAndEnable:
    def test_enable_undoes_a_disable_but_keeps_what_it_revoked(
        self, core: Core, registry: ServiceRegistry, clock: FakeClock
    ) -> None:
        registry.create(OPS, "orders", ["billing"])
        clock.advance(0.25)
        disabled = registry.disable(OPS, "orders")
        assert disabled.disabled
        cutoff = core.repo.fetch_service_cutoff("orders")
        assert cutoff is not None and to_timestamp(cutoff) > clock.now()
        enabled = registry.enable(OPS, "orders")
        assert not enabled.disabled
        # It waited for the cutoff second: a token issued now has iat >= the cutoff, so it
        # is not caught by the disable's revocation, and every earlier one still is.
        assert clock.now() >= to_timestamp(cutoff)
        revocations = core.repo.list_revocations(0, to_datetime(clock.now()), 100)
        assert [(r.service_id, r.kind, r.revoked_before) for r in revocations] == [
            ("orders", "service_disabled", cutoff)
        ]
        assert [o for _, _, o, _ in _audit(core, "enable_service")] == ["ok"]
        assert [o for _, _, o, _ in _audit(core, "disable_service")] == ["ok"]

    def test_enabling_an_enabled_service_is_audited_and_changes_nothing(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        created, _ = registry.create(OPS, "orders", ["billing"])
        assert registry.enable(OPS, "orders") == created
        assert [o for _, _, o, _ in _audit(core, "enable_service")] == ["already_enabled"]

    def test_unknown_services_are_not_found(self, registry: ServiceRegistry) -> None:
        with pytest.raises(NotFound):
            registry.enable(OPS, "ghost")
        with pytest.raises(NotFound):
            registry.disable(OPS, "ghost")


class TestParseGrant:
    def test_audience_ends_at_the_first_equals_sign(self) -> None:
        assert parse_grant("billing=billing.read", "--grant") == ("billing", "billing.read")
        assert parse_grant("billing=a=b", "--grant") == ("billing", "a=b")
        assert parse_grant("billing=", "--grant") == ("billing", "")

    @pytest.mark.parametrize("text", ["billing", "=scope", "bill ing=s", "billing=a b"])
    def test_malformed_grants_name_the_flag(self, text: str) -> None:
        with pytest.raises(InvalidArgument, match="--grant"):
            parse_grant(text, "--grant")
