"""The services use case without a gRPC server: real SQLite storage, a fake clock.

Grants per audience (issue 12 item 6) and changing a live service (item 7): the plain flags
keep their meaning, per-audience grants stay per audience, every change is audited once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from authsvc.clock import to_datetime, to_timestamp
from authsvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from authsvc.inputs import parse_grant
from authsvc.server.app import Core, build_core, service_registry
from authsvc.storage.records import AudienceGrant, ServiceRecord
from authsvc.storage.repository import AuditEvent, Repository
from authsvc.usecases.audit import Origin
from authsvc.usecases.services import (
    MAX_CREDENTIALS_PER_KIND,
    CredentialChange,
    CredentialTaken,
    GrantChange,
    ServiceRegistry,
)
from authsvc.usecases.trusts import TrustRegistry
from authsvc.workload import key_from_jwk
from authsvc_client.assertions import PrivateKey, jwk_thumbprint
from tests.storage.helpers import live_secrets
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings
from tests.support.workload import (
    b64url,
    jwk_of,
    jwk_set,
    new_ec,
    new_ed25519,
    new_rsa,
    private_pem,
    public_pem,
)

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


# -- workload credentials (issue 14) ------------------------------------------------------------


@pytest.fixture
def trusts(core: Core) -> TrustRegistry:
    return TrustRegistry(core.repo, core.clock, core.trail)


@pytest.fixture
def k8s(tmp_path: Path, trusts: TrustRegistry) -> str:
    """A trusted Kubernetes API server (its JWK Set in a file); returns the trust's name."""
    jwks = tmp_path / "k8s-jwks.json"
    jwks.write_bytes(jwk_set(jwk_of(new_rsa(), kid="k8s-1", use="sig")))
    trusts.add("k8s", "https://kubernetes.default.svc", "authsvc", origin=OPS, jwks_file=jwks)
    return "k8s"


SPIFFE = "spiffe://example.org/ns/prod/sa/orders"
SUBJECT = "system:serviceaccount:prod:orders"


def _pem(key: PrivateKey) -> str:
    return public_pem(key).decode("ascii")


def _jwk(key: PrivateKey) -> str:
    return json.dumps(jwk_of(key))


class TestCreateWithCredentials:
    def test_a_secretless_service_holds_only_its_credentials(
        self, core: Core, registry: ServiceRegistry, k8s: str
    ) -> None:
        ec_key, ed_key = new_ec(), new_ed25519()
        record, secret = registry.create(
            OPS,
            "orders",
            ["billing"],
            secret=False,
            public_keys=[_pem(ec_key), _jwk(ed_key)],
            tls_sans=[SPIFFE, "Orders.Prod.Example.COM"],
            federated_subjects=[(k8s, SUBJECT)],
        )
        assert secret is None
        assert live_secrets(core.repo, "orders", datetime.now(UTC)) == []
        held = registry.credentials_of("orders")
        assert held.has_secret is False
        assert held.kinds == ("assertion", "certificate", "federated")
        # Keys by their RFC 7638 thumbprint (the client's kid), stored as public JWKs.
        assert [kid for kid, _ in held.public_keys] == [
            jwk_thumbprint(ec_key.public_key()),
            jwk_thumbprint(ed_key.public_key()),
        ]
        for (kid, stored), key in zip(held.public_keys, (ec_key, ed_key), strict=True):
            assert key_from_jwk(json.loads(stored)).key_id == kid
            assert "d" not in json.loads(stored)
        # A DNS SAN is compared case-insensitively, so it is stored lower-cased.
        assert held.tls_sans == (SPIFFE, "orders.prod.example.com")
        assert held.federated == ((k8s, SUBJECT),)
        assert record.grants == (G("billing", ()),)

    def test_a_service_may_keep_its_secret_beside_a_key(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        _, secret = registry.create(OPS, "orders", ["billing"], public_keys=[_pem(new_ec())])
        assert secret is not None
        hashes = [h for _, h in live_secrets(core.repo, "orders", datetime.now(UTC))]
        assert hashes == [core.hasher.hash(secret)]
        assert registry.credentials_of("orders").kinds == ("secret", "assertion")

    def test_the_audit_row_names_kinds_ids_sans_and_subjects_never_key_material(
        self, core: Core, registry: ServiceRegistry, k8s: str
    ) -> None:
        key = new_rsa()
        registry.create(
            OPS,
            "orders",
            ["billing"],
            secret=False,
            public_keys=[_pem(key)],
            tls_sans=[SPIFFE],
            federated_subjects=[(k8s, SUBJECT)],
        )
        registry.create(OPS, "plain", ["billing"])
        kid = jwk_thumbprint(key.public_key())
        [(_, _, outcome, detail)] = _audit(core, "create_service")[:1]
        assert outcome == "ok"
        assert detail == (
            f"billing=; credentials=assertion,certificate,federated; public_key:{kid} "
            f"tls_san:{SPIFFE} federated:{k8s}={SUBJECT}"
        )
        modulus = jwk_of(key)["n"]
        assert modulus[:40] not in detail
        # A service with a secret only: the row reads as before issue 14.
        assert _audit(core, "create_service")[1][3] == "billing="

    def test_secretless_without_another_credential_is_refused_naming_the_flags(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        with pytest.raises(InvalidArgument, match="--jwk-file, --tls-san or --federated-subject"):
            registry.create(OPS, "orders", ["billing"], secret=False)
        assert core.repo.fetch_service("orders") is None

    @pytest.mark.parametrize(
        ("kwargs", "named"),
        [
            ({"public_keys": ["{not json"]}, "public_keys: public key: the JWK is not valid JSON"),
            ({"tls_sans": ["*.example.org"]}, "tls_sans: DNS SAN: wildcards are refused"),
            ({"tls_sans": ["https://orders.example.org"]}, "tls_sans"),
            ({"federated_subjects": [("k8s", "")]}, "a subject is 1-256 characters"),
            ({"federated_subjects": [("k8s", " padded")]}, "without surrounding blanks"),
            ({"federated_subjects": [("k8s", "x" * 257)]}, "1-256"),
            ({"tls_sans": [SPIFFE, SPIFFE]}, "named twice"),
        ],
    )
    def test_malformed_credentials_are_refused_before_anything_is_written(
        self,
        core: Core,
        registry: ServiceRegistry,
        k8s: str,
        kwargs: dict[str, list[Any]],
        named: str,
    ) -> None:
        with pytest.raises(InvalidArgument, match=re.escape(named)):
            registry.create(OPS, "orders", ["billing"], **kwargs)
        assert core.repo.fetch_service("orders") is None
        assert _audit(core, "create_service") == []

    def test_a_private_key_is_refused_and_never_echoed(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        key = new_ec()
        pem = private_pem(key).decode("ascii")
        private_jwk = json.dumps(
            {**jwk_of(key), "d": b64url(key.private_numbers().private_value.to_bytes(32, "big"))}
        )
        for text in (pem, private_jwk):
            with pytest.raises(InvalidArgument, match="private key") as exc:
                registry.create(OPS, "orders", ["billing"], secret=False, public_keys=[text])
            body = pem.splitlines()[1]
            assert body not in str(exc.value)
            assert json.loads(private_jwk)["d"] not in str(exc.value)
        assert core.repo.fetch_service("orders") is None

    def test_a_federated_subject_needs_an_existing_trust(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        with pytest.raises(FailedPrecondition, match="no trust named 'ghost'"):
            registry.create(OPS, "orders", ["billing"], federated_subjects=[("ghost", SUBJECT)])
        assert core.repo.fetch_service("orders") is None

    def test_a_federated_subject_is_bound_to_one_service_fleet_wide(
        self, core: Core, registry: ServiceRegistry, k8s: str
    ) -> None:
        registry.create(OPS, "orders", ["billing"], federated_subjects=[(k8s, SUBJECT)])
        with pytest.raises(CredentialTaken, match="bound to service 'orders'") as exc:
            registry.create(OPS, "orders2", ["billing"], federated_subjects=[(k8s, SUBJECT)])
        assert isinstance(exc.value, AlreadyExists)
        assert core.repo.fetch_service("orders2") is None
        # The same subject of another trust is another identity.
        TrustRegistry(core.repo, core.clock, core.trail).add(
            "gke", "https://container.googleapis.com/x", "authsvc", origin=OPS,
            jwks_url="https://gke.example.org/jwks",
        )  # fmt: skip
        registry.create(OPS, "orders2", ["billing"], federated_subjects=[("gke", SUBJECT)])

    def test_too_many_credentials_of_one_kind(self, registry: ServiceRegistry) -> None:
        sans = [f"spiffe://example.org/w/{i}" for i in range(MAX_CREDENTIALS_PER_KIND + 1)]
        with pytest.raises(InvalidArgument, match=f"at most {MAX_CREDENTIALS_PER_KIND}"):
            registry.create(OPS, "orders", ["billing"], tls_sans=sans)
        registry.create(OPS, "orders", ["billing"], tls_sans=sans[:-1])


class TestUpdateCredentials:
    @pytest.fixture
    def old_key(self) -> PrivateKey:
        return new_ec()

    @pytest.fixture(autouse=True)
    def orders(self, registry: ServiceRegistry, old_key: PrivateKey) -> None:
        registry.create(OPS, "orders", ["billing"], secret=False, public_keys=[_pem(old_key)])

    def _credentials(self, registry: ServiceRegistry, **change: Any) -> ServiceRecord:
        return registry.update(OPS, "orders", None, CredentialChange(**change))

    def test_a_credentials_only_update_rolls_a_key(
        self, core: Core, registry: ServiceRegistry, old_key: PrivateKey
    ) -> None:
        before = core.repo.fetch_service("orders")
        new_key = new_rsa()
        old_kid, new_kid = (jwk_thumbprint(k.public_key()) for k in (old_key, new_key))
        record = self._credentials(
            registry, add_public_keys=(_jwk(new_key),), remove_public_key_ids=(old_kid,)
        )
        assert record == before  # the grants did not move
        assert [kid for kid, _ in registry.credentials_of("orders").public_keys] == [new_kid]
        assert _audit(core, "update_service") == [
            (
                "ops-admin",
                "service:orders",
                "ok",
                f"billing=; credentials=assertion; -public_key:{old_kid} +public_key:{new_kid}",
            )
        ]

    def test_grants_and_credentials_in_one_update(
        self, core: Core, registry: ServiceRegistry, k8s: str
    ) -> None:
        record = registry.update(
            OPS,
            "orders",
            GrantChange(add_scopes=("billing.read",)),
            CredentialChange(add_tls_sans=(SPIFFE,), add_federated_subjects=((k8s, SUBJECT),)),
        )
        assert record.grants == (G("billing", ("billing.read",)),)
        held = registry.credentials_of("orders")
        assert held.kinds == ("assertion", "certificate", "federated")
        [(_, _, _, detail)] = _audit(core, "update_service")
        assert detail == (
            "billing=billing.read; credentials=assertion,certificate,federated; "
            f"+tls_san:{SPIFFE} +federated:{k8s}={SUBJECT}"
        )

    def test_sans_are_removed_by_their_canonical_form(self, registry: ServiceRegistry) -> None:
        self._credentials(registry, add_tls_sans=("orders.example.org",))
        self._credentials(registry, remove_tls_sans=("ORDERS.example.org",))
        assert registry.credentials_of("orders").tls_sans == ()

    def test_nothing_to_change_names_credentials_too(self, registry: ServiceRegistry) -> None:
        with pytest.raises(InvalidArgument, match="grant or credential"):
            registry.update(OPS, "orders", GrantChange(), CredentialChange())
        # A GrantChange with nothing in it passes its own check (credentials may change).
        GrantChange().check()

    @pytest.mark.parametrize(
        ("change", "error", "named"),
        [
            ({"remove_public_key_ids": ("nope",)}, FailedPrecondition, "public key nope is not"),
            ({"remove_tls_sans": (SPIFFE,)}, FailedPrecondition, f"TLS SAN {SPIFFE} is not"),
            (
                {"remove_federated_subjects": (("k8s", SUBJECT),)},
                FailedPrecondition,
                "federated subject k8s=system",
            ),
            ({"add_tls_sans": (SPIFFE,), "remove_tls_sans": (SPIFFE,)}, InvalidArgument, "both"),
            ({"add_federated_subjects": (("ghost", SUBJECT),)}, FailedPrecondition, "ghost"),
        ],
    )
    def test_refused_credential_changes_change_nothing(
        self,
        core: Core,
        registry: ServiceRegistry,
        k8s: str,
        change: dict[str, Any],
        error: type[Exception],
        named: str,
    ) -> None:
        before = (core.repo.fetch_service("orders"), registry.credentials_of("orders"))
        # Asks for grants too: neither part is written.
        with pytest.raises(error, match=re.escape(named)):
            registry.update(
                OPS, "orders", GrantChange(add_scopes=("x",)), CredentialChange(**change)
            )
        assert (core.repo.fetch_service("orders"), registry.credentials_of("orders")) == before
        assert _audit(core, "update_service") == []

    def test_a_refused_grant_change_leaves_the_credentials(
        self, core: Core, registry: ServiceRegistry
    ) -> None:
        before = registry.credentials_of("orders")
        with pytest.raises(FailedPrecondition, match="payments"):
            registry.update(
                OPS,
                "orders",
                GrantChange(remove_audiences=("payments",)),
                CredentialChange(add_tls_sans=(SPIFFE,)),
            )
        assert registry.credentials_of("orders") == before

    def test_adding_a_key_it_holds_is_refused(
        self, registry: ServiceRegistry, old_key: PrivateKey
    ) -> None:
        with pytest.raises(CredentialTaken, match="already registered"):
            self._credentials(registry, add_public_keys=(_jwk(old_key),))

    def test_the_last_credential_of_a_secretless_service_stays(
        self, registry: ServiceRegistry, old_key: PrivateKey
    ) -> None:
        kid = jwk_thumbprint(old_key.public_key())
        with pytest.raises(FailedPrecondition, match="no way to log in"):
            self._credentials(registry, remove_public_key_ids=(kid,))
        assert [k for k, _ in registry.credentials_of("orders").public_keys] == [kid]
        # A service with a secret may drop its every other credential.
        registry.create(OPS, "billing", ["orders"], tls_sans=[SPIFFE])
        registry.update(OPS, "billing", None, CredentialChange(remove_tls_sans=(SPIFFE,)))
        assert registry.credentials_of("billing").kinds == ("secret",)

    def test_a_subject_bound_to_another_service(self, registry: ServiceRegistry, k8s: str) -> None:
        registry.create(OPS, "billing", ["orders"], federated_subjects=[(k8s, SUBJECT)])
        with pytest.raises(CredentialTaken, match="bound to service 'billing'"):
            self._credentials(registry, add_federated_subjects=((k8s, SUBJECT),))

    def test_an_unknown_service(self, registry: ServiceRegistry) -> None:
        with pytest.raises(NotFound):
            registry.update(OPS, "ghost", None, CredentialChange(add_tls_sans=(SPIFFE,)))
        with pytest.raises(NotFound):
            registry.credentials_of("ghost")

    def test_listing_gives_every_service_its_credentials(self, registry: ServiceRegistry) -> None:
        registry.create(OPS, "billing", ["orders"])
        listed = {s.service_id: c.kinds for s, c in registry.list_with_credentials()}
        assert listed == {"billing": ("secret",), "orders": ("assertion",)}


class _RacedRepository(Repository):
    """The real repository, where another admin's grant change commits (a real write) just
    before this one's, as a replica racing it would: once."""

    raced = False

    def update_service_grants(
        self,
        service_id: str,
        change: Callable[[ServiceRecord], Sequence[AudienceGrant]],
        now: datetime,
        *,
        audit: Callable[[ServiceRecord, ServiceRecord], AuditEvent] | None = None,
    ) -> tuple[ServiceRecord, ServiceRecord]:
        if not self.raced:
            self.raced = True
            super().update_service_grants(service_id, lambda s: (G("billing", ()),), now)
        return super().update_service_grants(service_id, change, now, audit=audit)


def test_a_grant_change_lost_to_a_race_undoes_the_credential_change(core: Core) -> None:
    repo = _RacedRepository(core.repo.engine)
    registry = ServiceRegistry(repo, core.hasher, core.clock, core.settings, core.trail)
    old = new_ec()
    registry.create(OPS, "orders", ["billing", "inventory"], secret=False, public_keys=[_pem(old)])
    before = registry.credentials_of("orders")
    # Both parts pass their checks; then the other change takes inventory first.
    with pytest.raises(FailedPrecondition, match="audience inventory is not granted"):
        registry.update(
            OPS,
            "orders",
            GrantChange(remove_audiences=("inventory",)),
            CredentialChange(
                add_tls_sans=(SPIFFE,), remove_public_key_ids=(jwk_thumbprint(old.public_key()),)
            ),
        )
    assert repo.raced
    assert registry.credentials_of("orders") == before
    assert _audit(core, "update_service") == []
