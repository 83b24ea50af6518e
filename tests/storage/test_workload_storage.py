"""Workload identity storage (issue 14): service credentials, trusts and used assertions, on
SQLite and PostgreSQL alike; replicas racing on one jti on both."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, Engine, text

from authsvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from authsvc.storage.engine import make_engine
from authsvc.storage.records import (
    AudienceGrant,
    CredentialRecord,
    ServiceCredentials,
    TrustRecord,
)
from authsvc.storage.repository import Repository
from tests.storage.helpers import T0, at, live_secrets

_GRANTS = [AudienceGrant("billing", ("billing.read",))]
_TIMEOUT_S = 30
# Two public JWKs under one key id (storage keeps a JWK as the text it is given).
_JWK_1 = json.dumps(
    {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
)
_JWK_2 = json.dumps(
    {"kty": "OKP", "crv": "Ed25519", "x": "9Tz3eCd4nKk5m6eC7jOUMKl0Qw0MHTCz1sXb3PpUXkE"}
)


def _key(kid: str = "kid-1", jwk: str = _JWK_1) -> CredentialRecord:
    return CredentialRecord("public_key", kid, jwk)


def _san(san: str = "spiffe://prod.example/orders") -> CredentialRecord:
    return CredentialRecord("tls_san", san, san)


def _fed(
    subject: str = "repo:acme/orders:ref:refs/heads/main", trust: str = "gh"
) -> CredentialRecord:
    return CredentialRecord("federated", trust, subject)


def _trust(
    name: str = "gh", issuer: str = "https://token.actions.example", **kw: object
) -> TrustRecord:
    fields: dict[str, object] = {
        "name": name,
        "issuer": issuer,
        "audience": "authsvc",
        "jwks_json": None,
        "jwks_url": f"{issuer}/.well-known/jwks",
        "max_lifetime_seconds": 3600,
        "created_at": T0,
    }
    fields.update(kw)
    return TrustRecord(**fields)  # type: ignore[arg-type]


def _raw_credential(conn: Connection, service_id: str, kind: str, ref: str, value: str) -> None:
    """A credential row written past the repository, as a replica that lost a race would."""
    conn.execute(
        text(
            "INSERT INTO service_credentials (service_id, kind, ref, value, created_at) "
            "VALUES (:sid, :kind, :ref, :value, :t)"
        ),
        {"sid": service_id, "kind": kind, "ref": ref, "value": value, "t": T0},
    )


def _changes(repo: Repository, after: int = 0) -> list[tuple[str, str]]:
    return [(c.kind, c.ref) for c in repo.list_changes(after)]


class TestCreate:
    def test_secretless_service_has_no_secret_row_and_its_credentials(
        self, repo: Repository
    ) -> None:
        record = repo.create_service("orders", _GRANTS, None, T0, [_key()])
        assert record.service_id == "orders" and record.grants == tuple(_GRANTS)
        assert live_secrets(repo, "orders", T0) == []
        creds = repo.fetch_service_credentials("orders")
        assert creds == ServiceCredentials("orders", False, (("kid-1", _JWK_1),))
        assert creds.kinds == ("assertion",)
        assert _changes(repo) == [("service", "orders")]

    def test_secret_and_every_kind_kept_in_registration_order(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        credentials = [
            _fed("sub-b"),
            _key("kid-2", _JWK_2),
            _san("orders.prod.example"),
            _key(),
            _fed("sub-a"),
            _san(),
        ]
        repo.create_service("orders", _GRANTS, b"h" * 32, T0, credentials)
        assert [h for _, h in live_secrets(repo, "orders", T0)] == [b"h" * 32]
        creds = repo.fetch_service_credentials("orders")
        assert creds == ServiceCredentials(
            "orders",
            True,
            (("kid-2", _JWK_2), ("kid-1", _JWK_1)),
            ("orders.prod.example", "spiffe://prod.example/orders"),
            (("gh", "sub-b"), ("gh", "sub-a")),
        )
        assert creds.kinds == ("secret", "assertion", "certificate", "federated")

    def test_the_existing_positional_call_still_makes_a_service_with_a_secret(
        self, repo: Repository
    ) -> None:
        repo.create_service("legacy", _GRANTS, b"h1", T0)
        assert repo.fetch_service_credentials("legacy") == ServiceCredentials("legacy", True)

    def test_a_credential_given_twice_is_refused_and_nothing_is_stored(
        self, repo: Repository
    ) -> None:
        # A key id twice, whatever JWK each carries.
        with pytest.raises(InvalidArgument, match="public key 'kid-1' is given twice"):
            repo.create_service("orders", _GRANTS, None, T0, [_key(), _key(jwk=_JWK_2)])
        with pytest.raises(InvalidArgument, match="TLS SAN"):
            repo.create_service("orders", _GRANTS, None, T0, [_san(), _san()])
        assert repo.fetch_service("orders") is None
        assert repo.list_changes(0) == []

    def test_an_unknown_kind_is_a_caller_bug(self, repo: Repository) -> None:
        bogus = CredentialRecord("password", "x", "y")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unknown credential kind"):
            repo.create_service("orders", _GRANTS, None, T0, [bogus])
        assert repo.fetch_service("orders") is None

    def test_a_subject_of_a_missing_trust_is_refused(self, repo: Repository) -> None:
        with pytest.raises(FailedPrecondition, match="no trust named 'gh'"):
            repo.create_service("orders", _GRANTS, b"h", T0, [_fed()])
        assert repo.fetch_service("orders") is None

    def test_a_federated_subject_is_bound_to_one_service_only(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_fed("repo:acme/x")])
        with pytest.raises(AlreadyExists) as refused:
            repo.create_service("billing", _GRANTS, b"secret-hash", at(1), [_fed("repo:acme/x")])
        message = str(refused.value)
        assert "'repo:acme/x'" in message and "'gh'" in message and "'orders'" in message
        assert "secret-hash" not in message
        assert repo.fetch_service("billing") is None
        assert repo.fetch_federated_binding("gh", "repo:acme/x") == "orders"
        assert _changes(repo) == [("trust", "gh"), ("service", "orders")]

    def test_the_database_refuses_a_second_binding_whoever_writes_it(
        self, repo: Repository, engine: Engine
    ) -> None:
        # The partial unique index, not only the repository's check, settles replicas.
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_fed("s")])
        repo.create_service("billing", _GRANTS, b"h", T0)
        with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as conn:
            _raw_credential(conn, "billing", "federated", "gh", "s")
        with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as conn:
            _raw_credential(conn, "orders", "federated", "gh", "s")
        # A key id once per service, but two services may register one key (or one SAN).
        repo.update_service_credentials("orders", [_key()], [], at(1))
        with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as conn:
            _raw_credential(conn, "orders", "public_key", "kid-1", _JWK_2)
        repo.update_service_credentials("billing", [_key(), _san()], [], at(1))
        with pytest.raises(Exception, match=r"(?i)check"), engine.begin() as conn:
            _raw_credential(conn, "orders", "password", "r", "v")
        assert repo.fetch_service_credentials("billing") == ServiceCredentials(
            "billing", True, (("kid-1", _JWK_1),), ("spiffe://prod.example/orders",)
        )


class TestFetchAndList:
    def test_unknown_service_has_no_credentials(self, repo: Repository) -> None:
        assert repo.fetch_service_credentials("ghost") is None
        assert repo.list_service_credentials() == {}

    def test_list_has_every_service_with_or_without_credentials(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("zeta", _GRANTS, b"h", T0)
        repo.create_service("alpha", _GRANTS, None, T0, [_san(), _fed()])
        repo.create_service("mid", _GRANTS, b"h", T0, [_key()])
        listed = repo.list_service_credentials()
        assert list(listed) == ["alpha", "mid", "zeta"]
        assert listed == {
            "alpha": ServiceCredentials(
                "alpha",
                False,
                (),
                ("spiffe://prod.example/orders",),
                (("gh", "repo:acme/orders:ref:refs/heads/main"),),
            ),
            "mid": ServiceCredentials("mid", True, (("kid-1", _JWK_1),)),
            "zeta": ServiceCredentials("zeta", True),
        }
        for service_id, creds in listed.items():
            assert repo.fetch_service_credentials(service_id) == creds

    def test_a_rotated_secret_is_still_a_secret(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, b"h1", T0, [_key()])
        repo.update_service_secret("orders", b"h2", at(1), at(100))
        creds = repo.fetch_service_credentials("orders")
        assert creds is not None and creds.has_secret
        assert repo.list_service_credentials()["orders"].has_secret


class TestUpdate:
    def test_add_and_remove_each_kind(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, b"h", T0)
        after = repo.update_service_credentials("orders", [_key(), _san(), _fed()], [], at(1))
        assert after == repo.fetch_service_credentials("orders")
        assert after.kinds == ("secret", "assertion", "certificate", "federated")
        # A public key is removed by its id alone.
        removed = repo.update_service_credentials(
            "orders", [], [CredentialRecord("public_key", "kid-1", ""), _san(), _fed()], at(2)
        )
        assert removed == ServiceCredentials("orders", True)
        assert repo.fetch_federated_binding("gh", _fed().value) is None
        service = repo.fetch_service("orders")
        assert service is not None and service.updated_at == at(2) and service.created_at == T0
        assert _changes(repo) == [("trust", "gh")] + [("service", "orders")] * 3

    def test_removing_and_adding_one_key_id_replaces_its_key(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, None, T0, [_key(), _san()])
        after = repo.update_service_credentials("orders", [_key(jwk=_JWK_2)], [_key()], at(1))
        assert after.public_keys == (("kid-1", _JWK_2),)
        assert after.tls_sans == ("spiffe://prod.example/orders",)

    def test_removing_the_last_way_in_is_allowed_here(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, None, T0, [_key()])
        after = repo.update_service_credentials("orders", [], [_key()], at(1))
        assert after == ServiceCredentials("orders", False)
        assert after.kinds == ()

    def test_an_empty_update_changes_nothing(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, None, T0, [_key()])
        cursor = repo.fetch_latest_change_cursor()
        assert repo.update_service_credentials("orders", [], [], at(1)) == (
            repo.fetch_service_credentials("orders")
        )
        assert repo.list_changes(cursor) == []
        assert repo.fetch_service("orders").updated_at == T0  # type: ignore[union-attr]

    def test_unknown_service_is_not_found(self, repo: Repository) -> None:
        with pytest.raises(NotFound, match="'ghost'"):
            repo.update_service_credentials("ghost", [_key()], [], T0)
        assert repo.list_service_credentials() == {}

    @pytest.mark.parametrize(
        "missing",
        [
            _key("kid-9"),
            _san("other.prod.example"),
            _fed("repo:acme/other"),
            # A federated subject is removed by trust and subject both.
            _fed("repo:acme/orders:ref:refs/heads/main", trust="gl"),
        ],
        ids=["key", "san", "subject", "subject-of-other-trust"],
    )
    def test_removing_what_it_does_not_have_changes_nothing(
        self, repo: Repository, missing: CredentialRecord
    ) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_trust(_trust("gl", "https://gitlab.example"), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_key(), _san(), _fed()])
        before = repo.fetch_service_credentials("orders")
        cursor = repo.fetch_latest_change_cursor()
        with pytest.raises(FailedPrecondition, match="service 'orders' has no"):
            # The add of the same call is rolled back with it.
            repo.update_service_credentials(
                "orders", [_key("kid-2", _JWK_2)], [_key(), missing], at(1)
            )
        assert repo.fetch_service_credentials("orders") == before
        assert repo.list_changes(cursor) == []

    @pytest.mark.parametrize(
        "held",
        [_key(jwk=_JWK_2), _san(), _fed()],
        ids=["key-id-with-another-jwk", "san", "subject"],
    )
    def test_adding_what_it_has_is_already_exists(
        self, repo: Repository, held: CredentialRecord
    ) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_key(), _san(), _fed()])
        before = repo.fetch_service_credentials("orders")
        with pytest.raises(AlreadyExists, match="service 'orders' already has") as refused:
            repo.update_service_credentials("orders", [held], [], at(1))
        assert _JWK_1 not in str(refused.value) and _JWK_2 not in str(refused.value)
        assert repo.fetch_service_credentials("orders") == before

    def test_a_subject_bound_elsewhere_is_already_exists(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_fed("s1")])
        repo.create_service("billing", _GRANTS, b"h", T0)
        with pytest.raises(
            AlreadyExists, match="'s1' of trust 'gh' is already bound to service 'orders'"
        ):
            repo.update_service_credentials("billing", [_key(), _fed("s1")], [], at(1))
        assert repo.fetch_service_credentials("billing") == ServiceCredentials("billing", True)
        # Once orders lets go of it, billing may have it.
        repo.update_service_credentials("orders", [], [_fed("s1")], at(2))
        repo.update_service_credentials("billing", [_fed("s1")], [], at(3))
        assert repo.fetch_federated_binding("gh", "s1") == "billing"

    def test_one_service_may_have_several_subjects_of_one_trust(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_fed("s1")])
        after = repo.update_service_credentials("orders", [_fed("s2")], [], at(1))
        assert after.federated == (("gh", "s1"), ("gh", "s2"))

    def test_a_subject_of_a_missing_trust_is_refused(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, b"h", T0)
        with pytest.raises(FailedPrecondition, match="no trust named 'gh'"):
            repo.update_service_credentials("orders", [_fed()], [], at(1))
        assert repo.fetch_service_credentials("orders") == ServiceCredentials("orders", True)

    def test_a_credential_given_twice_in_one_list_is_invalid(self, repo: Repository) -> None:
        repo.create_service("orders", _GRANTS, None, T0, [_key()])
        with pytest.raises(InvalidArgument):
            repo.update_service_credentials("orders", [_san(), _san()], [], at(1))
        with pytest.raises(InvalidArgument):
            repo.update_service_credentials("orders", [], [_key(), _key()], at(1))
        assert repo.fetch_service_credentials("orders") == ServiceCredentials(
            "orders", False, (("kid-1", _JWK_1),)
        )


class TestTrusts:
    def test_create_fetch_and_list_round_trip(self, repo: Repository) -> None:
        jwks = json.dumps({"keys": [json.loads(_JWK_1)]})
        url_trust = repo.create_trust(_trust("gl", "https://gitlab.example", created_at=T0), at(5))
        # created_at is when it was stored.
        assert url_trust == _trust("gl", "https://gitlab.example", created_at=at(5))
        file_trust = repo.create_trust(
            _trust("gh", jwks_json=jwks, jwks_url=None, max_lifetime_seconds=600), at(6)
        )
        assert file_trust.jwks_json == jwks and file_trust.jwks_url is None
        assert repo.fetch_trust("gh") == file_trust
        assert repo.fetch_trust("gl") == url_trust
        assert repo.fetch_trust("nobody") is None
        assert repo.list_trusts() == [file_trust, url_trust]
        assert file_trust.created_at.utcoffset() is not None
        assert _changes(repo) == [("trust", "gl"), ("trust", "gh")]

    def test_a_name_or_issuer_taken_is_already_exists(self, repo: Repository) -> None:
        first = repo.create_trust(_trust(), T0)
        with pytest.raises(AlreadyExists, match="trust 'gh' already exists"):
            repo.create_trust(_trust(issuer="https://other.example"), at(1))
        with pytest.raises(AlreadyExists, match="is already trusted as 'gh'"):
            repo.create_trust(_trust("gh2"), at(1))
        assert repo.list_trusts() == [first]
        assert _changes(repo) == [("trust", "gh")]

    @pytest.mark.parametrize(
        "sources", [(None, None), ('{"keys":[]}', "https://x.example/jwks")], ids=["none", "both"]
    )
    def test_exactly_one_key_source(
        self, repo: Repository, sources: tuple[str | None, str | None]
    ) -> None:
        with pytest.raises(ValueError, match="exactly one of jwks_json and jwks_url"):
            repo.create_trust(_trust(jwks_json=sources[0], jwks_url=sources[1]), T0)
        assert repo.list_trusts() == []

    def test_the_database_also_wants_exactly_one_key_source(self, engine: Engine) -> None:
        with pytest.raises(Exception, match=r"(?i)check"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO trusted_issuers (name, issuer, audience, jwks_json, jwks_url, "
                    "max_lifetime_seconds, created_at, updated_at) "
                    "VALUES ('t', 'https://i', 'a', '{}', 'https://i/jwks', 60, :t, :t)"
                ),
                {"t": T0},
            )

    def test_delete_unknown_is_not_found(self, repo: Repository) -> None:
        with pytest.raises(NotFound, match="trust 'gh' not found"):
            repo.delete_trust("gh", T0)
        assert repo.list_changes(0) == []

    def test_delete_removes_the_trust_and_every_binding_naming_it(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_trust(_trust("gl", "https://gitlab.example"), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_key(), _fed("s1"), _fed("s2")])
        repo.create_service("billing", _GRANTS, b"h", T0, [_fed("s3"), _fed("s1", trust="gl")])
        repo.create_service("ops", _GRANTS, b"h", T0, [_fed("s4", trust="gl")])
        cursor = repo.fetch_latest_change_cursor()
        assert repo.delete_trust("gh", at(10)) == 3
        assert repo.fetch_trust("gh") is None
        assert [t.name for t in repo.list_trusts()] == ["gl"]
        listed = repo.list_service_credentials()
        assert listed["orders"] == ServiceCredentials("orders", False, (("kid-1", _JWK_1),))
        assert listed["billing"].federated == (("gl", "s1"),)
        assert listed["ops"].federated == (("gl", "s4"),)
        assert _changes(repo, cursor) == [
            ("trust", "gh"),
            ("service", "billing"),
            ("service", "orders"),
        ]
        assert repo.fetch_service("orders").updated_at == at(10)  # type: ignore[union-attr]
        assert repo.fetch_service("ops").updated_at == T0  # type: ignore[union-attr]
        # A later trust of the same name inherits nothing, and the subjects are free again.
        repo.create_trust(_trust(issuer="https://someone-else.example"), at(11))
        assert repo.fetch_federated_binding("gh", "s1") is None
        repo.create_service("newcomer", _GRANTS, None, at(12), [_fed("s1")])
        assert repo.fetch_federated_binding("gh", "s1") == "newcomer"

    def test_deleting_a_trust_nobody_is_bound_to_writes_only_the_trust_change(
        self, repo: Repository
    ) -> None:
        repo.create_trust(_trust(), T0)
        assert repo.delete_trust("gh", at(1)) == 0
        assert _changes(repo) == [("trust", "gh"), ("trust", "gh")]


class TestLoginBatch:
    def test_workload_credentials_as_a_login_reads_them(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_san(), _key()])
        repo.create_service("billing", _GRANTS, b"h", T0, [_fed()])
        with repo.login_batch(at(1), 60) as batch:
            orders = batch.workload_credentials("orders")
            assert orders == repo.fetch_service_credentials("orders")
            assert orders is not None and not orders.has_secret
            assert batch.workload_credentials("orders") is orders  # read once per batch
            assert batch.workload_credentials("billing") == ServiceCredentials(
                "billing", True, federated=(("gh", "repo:acme/orders:ref:refs/heads/main"),)
            )
            assert batch.workload_credentials("ghost") is None
            assert batch.service("orders") is not None
            assert batch.secrets("orders") == ()

    def test_federated_binding(self, repo: Repository) -> None:
        repo.create_trust(_trust(), T0)
        repo.create_service("orders", _GRANTS, None, T0, [_fed("s1")])
        with repo.login_batch(at(1), 60) as batch:
            assert batch.federated_binding("gh", "s1") == "orders"
            assert batch.federated_binding("gh", "s2") is None
            assert batch.federated_binding("gl", "s1") is None

    def test_a_jti_is_used_once_until_it_expires(self, repo: Repository) -> None:
        with repo.login_batch(T0, 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(60)) is True
            assert batch.use_assertion("orders", "jti-1", at(60)) is False  # same batch
            # Per service: another service's jti of the same value is its own.
            assert batch.use_assertion("billing", "jti-1", at(60)) is True
        with repo.login_batch(at(59), 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(120)) is False
        with repo.login_batch(at(60), 60) as batch:
            # Its assertion has expired: the jti may be used again, and is remembered anew.
            assert batch.use_assertion("orders", "jti-1", at(120)) is True
        with repo.login_batch(at(119), 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(180)) is False

    def test_a_rolled_back_batch_uses_no_jti(self, repo: Repository) -> None:
        with pytest.raises(RuntimeError), repo.login_batch(T0, 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(60)) is True
            raise RuntimeError("the batch fails")
        with repo.login_batch(T0, 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(60)) is True

    def test_prune_forgets_expired_jtis_only(self, repo: Repository, engine: Engine) -> None:
        with repo.login_batch(T0, 60) as batch:
            for i, expires in enumerate([10, 20, 30]):
                assert batch.use_assertion("orders", f"j{i}", at(expires))
        assert repo.prune_used_assertions(at(5)) == 0
        assert repo.prune_used_assertions(at(20)) == 2
        with engine.connect() as conn:
            left = conn.execute(text("SELECT jti FROM used_assertions")).scalars().all()
        assert left == ["j2"]
        with repo.login_batch(at(21), 60) as batch:
            assert batch.use_assertion("orders", "j2", at(90)) is False


def _run_threads(bodies: list[Callable[[], object]]) -> list[object]:
    """Run each body on a thread of its own, released together; what each returned or raised."""
    barrier = threading.Barrier(len(bodies))
    results: list[object] = [None] * len(bodies)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=_TIMEOUT_S)
            results[i] = bodies[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=_TIMEOUT_S)
    return results


class TestBindingRaces:
    """Replicas (a Repository on an engine of its own each) binding one subject at once."""

    def test_services_created_at_once_with_one_subject_get_one_binding(
        self, repo: Repository, migrated_url: str
    ) -> None:
        repo.create_trust(_trust(), T0)
        engines = [make_engine(migrated_url) for _ in range(4)]
        try:
            replicas = [Repository(e) for e in engines]
            for r in replicas:
                r.ping()
            results = _run_threads(
                [
                    lambda i=i: replicas[i].create_service(  # type: ignore[misc]
                        f"svc-{i}", _GRANTS, None, at(1), [_fed("s1")]
                    )
                    for i in range(len(replicas))
                ]
            )
        finally:
            for e in engines:
                e.dispose()
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(refused) == 3, results
        for exc in refused:
            assert isinstance(exc, AlreadyExists)
            assert "federated subject 's1' of trust 'gh' is already bound" in str(exc)
        winner = repo.fetch_federated_binding("gh", "s1")
        assert [s.service_id for s in repo.list_services()] == [winner]

    def test_a_binding_racing_a_trust_removal_is_never_left_behind(
        self, repo: Repository, migrated_url: str
    ) -> None:
        binder_engine, remover_engine = make_engine(migrated_url), make_engine(migrated_url)
        binder, remover = Repository(binder_engine), Repository(remover_engine)
        try:
            for round_ in range(5):
                repo.create_trust(_trust(), at(round_))
                service_id = f"svc-{round_}"
                repo.create_service(service_id, _GRANTS, b"h", at(round_))
                bound, removed = _run_threads(
                    [
                        lambda: binder.update_service_credentials(
                            service_id,
                            [_fed("s1")],
                            [],
                            at(round_),
                        ),
                        lambda: remover.delete_trust("gh", at(round_)),
                    ]
                )
                # Either the binding came first and went with the trust, or it found no trust.
                assert isinstance(removed, int), removed
                if isinstance(bound, BaseException):
                    assert isinstance(bound, FailedPrecondition), bound
                    assert removed == 0
                else:
                    assert removed == 1
                assert repo.fetch_trust("gh") is None
                assert repo.fetch_federated_binding("gh", "s1") is None
                assert repo.fetch_service_credentials(service_id) == ServiceCredentials(
                    service_id, True
                )
        finally:
            binder_engine.dispose()
            remover_engine.dispose()


class TestJtiRace:
    """Replicas (a Repository on an engine of its own each) using one jti at once."""

    @staticmethod
    def _race(url: str, contenders: int, jti: str) -> list[bool]:
        engines = [make_engine(url) for _ in range(contenders)]
        barrier = threading.Barrier(contenders)
        results: list[bool | None] = [None] * contenders
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                repo = Repository(engines[i])
                repo.ping()  # connected before the barrier, so the inserts really collide
                barrier.wait(timeout=_TIMEOUT_S)
                with repo.login_batch(T0, 60) as batch:
                    results[i] = batch.use_assertion("orders", jti, at(60))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(contenders)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=_TIMEOUT_S)
        finally:
            for e in engines:
                e.dispose()
        if errors:
            raise errors[0]
        assert all(r is not None for r in results)
        return [bool(r) for r in results]

    def test_replicas_racing_on_one_jti_exactly_one_wins(self, migrated_url: str) -> None:
        for round_ in range(3):
            won = self._race(migrated_url, 4, f"jti-{round_}")
            assert sorted(won) == [False, False, False, True]

    @pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)])
    def test_the_second_replica_waits_for_the_first_to_commit(
        self, migrated_url: str, dialect: str
    ) -> None:
        """PostgreSQL: the second insert blocks on the first's uncommitted row and, once that
        commits, sees the conflict. Shown with the first batch held open until the second is
        seen waiting on a lock."""
        first_engine, second_engine, observer = (make_engine(migrated_url) for _ in range(3))
        first, second = Repository(first_engine), Repository(second_engine)
        second.ping()
        outcome: dict[str, object] = {}

        def second_replica() -> None:
            try:
                with second.login_batch(T0, 60) as batch:
                    outcome["second"] = batch.use_assertion("orders", "jti-1", at(60))
                    outcome["second_at"] = time.monotonic()
            except BaseException as exc:
                outcome["error"] = exc

        try:
            with first.login_batch(T0, 60) as batch:
                assert batch.use_assertion("orders", "jti-1", at(60)) is True
                thread = threading.Thread(target=second_replica)
                thread.start()
                deadline = time.monotonic() + _TIMEOUT_S
                waiting = 0
                while waiting == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                    with observer.connect() as conn:
                        waiting = conn.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND wait_event_type = 'Lock'"
                            )
                        ).scalar_one()
                assert waiting == 1, "the second replica never waited on the first's row"
                assert "second" not in outcome
                committed_at = time.monotonic()
            thread.join(timeout=_TIMEOUT_S)
        finally:
            for e in (first_engine, second_engine, observer):
                e.dispose()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["second"] is False
        assert float(outcome["second_at"]) >= committed_at  # type: ignore[arg-type]
