"""A write that takes its audit row (`audit=AuditEvent`) commits both or neither, on SQLite and
PostgreSQL: the driver failing the audit INSERT rolls back the change it came with."""

from __future__ import annotations

from dataclasses import replace

import pytest

from authsvc.errors import StorageUnavailable
from authsvc.storage.records import SECRET_HASH_KEY, AudienceGrant, CredentialRecord, TrustRecord
from authsvc.storage.repository import AuditEvent, Repository
from tests.storage.helpers import T0, at, failing_insert, key_record, live_secrets

_GRANTS = [AudienceGrant("billing", ("billing.read",))]


def _event(action: str, seconds: float = 1) -> AuditEvent:
    return AuditEvent(
        at=at(seconds),
        actor="ops",
        action=action,
        target="service:svc",
        outcome="ok",
        peer="local",
        request_id="r1",
        detail="grace_seconds=60",
    )


def _actions(repo: Repository) -> list[str]:
    return [e.action for e in reversed(repo.list_audit_events(limit=100))]


def test_a_rotation_and_its_audit_row_commit_together(repo: Repository) -> None:
    repo.create_service("svc", _GRANTS, b"hash-1", T0)
    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        repo.update_service_secret("svc", b"hash-2", at(1), at(61), audit=_event("rotate_secret"))
    assert fired
    assert live_secrets(repo, "svc", at(2)) == [("current", b"hash-1")]
    assert _actions(repo) == []
    repo.update_service_secret("svc", b"hash-2", at(1), at(61), audit=_event("rotate_secret"))
    assert live_secrets(repo, "svc", at(2)) == [("current", b"hash-2"), ("previous", b"hash-1")]
    (row,) = repo.list_audit_events()
    assert (row.action, row.actor, row.detail, row.at) == (
        "rotate_secret",
        "ops",
        "grace_seconds=60",
        at(1),
    )


def test_a_create_and_its_audit_row_commit_together(repo: Repository) -> None:
    latest = repo.fetch_latest_change_cursor()
    with failing_insert(repo.engine, "audit_events"), pytest.raises(StorageUnavailable):
        repo.create_service("svc", _GRANTS, b"h", T0, audit=_event("create_service"))
    assert repo.fetch_service("svc") is None
    assert repo.fetch_latest_change_cursor() == latest
    repo.create_service("svc", _GRANTS, b"h", T0, audit=_event("create_service"))
    assert repo.fetch_service("svc") is not None
    assert _actions(repo) == ["create_service"]


@pytest.mark.parametrize("table", ["audit_events", "revocations"])
def test_a_disable_its_revocation_and_its_audit_row_commit_together(
    repo: Repository, table: str
) -> None:
    repo.create_service("svc", _GRANTS, b"h", T0)
    latest = repo.fetch_latest_change_cursor()

    def disable() -> None:
        repo.disable_service(
            "svc",
            at(1),
            revoked_before=at(2),
            revocation_expires_at=at(3600),
            reason="service disabled",
            audit=_event("disable_service"),
        )

    with failing_insert(repo.engine, table) as fired, pytest.raises(StorageUnavailable):
        disable()
    assert fired
    assert repo.list_disabled_service_ids() == []
    assert repo.list_revocations(0, at(1)) == []
    assert repo.fetch_latest_change_cursor() == latest
    assert _actions(repo) == []
    disable()
    assert repo.list_disabled_service_ids() == ["svc"]
    (revocation,) = repo.list_revocations(0, at(1))
    assert (revocation.service_id, revocation.kind, revocation.revoked_before) == (
        "svc",
        "service_disabled",
        at(2),
    )
    assert [c.kind for c in repo.list_changes(latest)] == ["service"]
    assert _actions(repo) == ["disable_service"]


def _row(action: str, target: str, detail: str = "", seconds: float = 1) -> AuditEvent:
    return AuditEvent(
        at=at(seconds),
        actor="ops",
        action=action,
        target=target,
        outcome="ok",
        peer="local",
        request_id="r1",
        detail=detail,
    )


def _rows(repo: Repository) -> list[tuple[str, str, str, str]]:
    return [(e.action, e.target, e.outcome, e.detail) for e in reversed(repo.list_audit_events())]


def test_a_revocation_and_its_audit_row_commit_together(repo: Repository) -> None:
    def revoke() -> None:
        repo.create_revocation(
            jti="j1",
            service_id=None,
            revoked_before=None,
            expires_at=at(3600),
            reason="",
            now=at(1),
            audit=_row("revoke_token", "jti:j1"),
        )

    latest = repo.fetch_latest_revocation_cursor()
    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        revoke()
    assert fired
    assert repo.list_revocations(0, at(1)) == []
    assert repo.fetch_latest_revocation_cursor() == latest
    assert _rows(repo) == []
    revoke()
    assert [r.jti for r in repo.list_revocations(0, at(1))] == ["j1"]
    assert _rows(repo) == [("revoke_token", "jti:j1", "ok", "")]


def test_a_revocation_of_a_service_and_its_audit_row_commit_together(repo: Repository) -> None:
    repo.create_service("svc", _GRANTS, b"h", T0)

    def revoke() -> None:
        repo.create_revocation(
            jti=None,
            service_id="svc",
            revoked_before=at(2),
            expires_at=at(3600),
            reason="",
            now=at(1),
            audit=_row("revoke_service_tokens", "service:svc"),
        )

    with failing_insert(repo.engine, "audit_events"), pytest.raises(StorageUnavailable):
        revoke()
    assert repo.fetch_service_cutoff("svc") is None
    assert _rows(repo) == []
    revoke()
    assert repo.fetch_service_cutoff("svc") == at(2)
    assert _rows(repo) == [("revoke_service_tokens", "service:svc", "ok", "")]


@pytest.mark.parametrize("revoke_others", [False, True])
def test_a_fresh_key_and_its_audit_row_commit_together(
    repo: Repository, revoke_others: bool
) -> None:
    repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
    repo.create_next_signing_key(key_record("n1"), at(1))
    before = {k.kid: k.state for k in repo.list_signing_keys()}
    latest = repo.fetch_latest_change_cursor()

    def rotate(kid: str) -> bool:
        return repo.create_signing_key(
            key_record(kid, at(2)),
            at(2),
            expected_active_kid="k1",
            publish_until=at(3600),
            revoke_others=revoke_others,
            audit=_row("rotate_signing_key", f"key:{kid}"),
        )

    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        rotate("k2")
    assert fired
    assert {k.kid: k.state for k in repo.list_signing_keys()} == before
    assert repo.fetch_latest_change_cursor() == latest
    assert _rows(repo) == []
    assert rotate("k2")
    active = repo.fetch_active_signing_key()
    assert active is not None and active.kid == "k2"
    assert _rows(repo) == [("rotate_signing_key", "key:k2", "ok", "")]
    # A rotation that lost the race (the active key is no longer k1) writes no row.
    assert not rotate("k3")
    assert len(_rows(repo)) == 1


def test_an_activation_and_its_audit_row_commit_together(repo: Repository) -> None:
    repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
    repo.create_next_signing_key(key_record("n1"), at(1))
    latest = repo.fetch_latest_change_cursor()

    def activate() -> str:
        return repo.activate_next_signing_key(
            "n1",
            at(2),
            expected_active_kid="k1",
            publish_until=at(3600),
            audit=_row("rotate_signing_key", "key:n1"),
        )

    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        activate()
    assert fired
    assert {k.kid: k.state for k in repo.list_signing_keys()} == {"k1": "active", "n1": "next"}
    assert repo.fetch_latest_change_cursor() == latest
    assert _rows(repo) == []
    assert activate() == "activated"
    assert {k.kid: k.state for k in repo.list_signing_keys()} == {"k1": "retired", "n1": "active"}
    assert _rows(repo) == [("rotate_signing_key", "key:n1", "ok", "")]
    # Lost the race (n1 is active now, not k1): nothing changed, no row.
    assert activate() == "already_rotated"
    assert len(_rows(repo)) == 1


def _trust_record() -> TrustRecord:
    return TrustRecord(
        name="gh",
        issuer="https://token.actions.example",
        audience="authsvc",
        jwks_json=None,
        jwks_url="https://token.actions.example/.well-known/jwks",
        max_lifetime_seconds=3600,
        created_at=T0,
    )


def test_a_trust_and_its_audit_row_commit_together(repo: Repository) -> None:
    latest = repo.fetch_latest_change_cursor()
    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        repo.create_trust(_trust_record(), T0, audit=_row("add_trust", "trust:gh"))
    assert fired
    assert repo.fetch_trust("gh") is None
    assert repo.fetch_latest_change_cursor() == latest
    assert _rows(repo) == []
    repo.create_trust(_trust_record(), T0, audit=_row("add_trust", "trust:gh"))
    assert repo.fetch_trust("gh") is not None
    assert _rows(repo) == [("add_trust", "trust:gh", "ok", "")]


def test_a_trust_removal_and_its_audit_row_commit_together(repo: Repository) -> None:
    repo.create_trust(_trust_record(), T0)
    repo.create_service(
        "svc", _GRANTS, None, T0, [CredentialRecord("federated", "gh", "repo:acme/svc")]
    )
    latest = repo.fetch_latest_change_cursor()

    def remove() -> int:
        return repo.delete_trust(
            "gh",
            at(1),
            audit=lambda unbound: _row(
                "remove_trust", "trust:gh", f"federated_subjects_unbound={unbound}"
            ),
        )

    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        remove()
    assert fired
    assert repo.fetch_trust("gh") is not None
    assert repo.fetch_federated_binding("gh", "repo:acme/svc") == "svc"
    assert repo.fetch_latest_change_cursor() == latest
    assert _rows(repo) == []
    assert remove() == 1
    assert repo.fetch_trust("gh") is None
    assert repo.fetch_federated_binding("gh", "repo:acme/svc") is None
    assert _rows(repo) == [("remove_trust", "trust:gh", "ok", "federated_subjects_unbound=1")]


def test_a_rewrap_and_its_audit_row_commit_together(repo: Repository) -> None:
    repo.create_wrapped_key(SECRET_HASH_KEY, "kek-a", b"hash-key", T0)
    repo.create_signing_key(
        replace(key_record("k1"), kek_id="kek-a"), T0, expected_active_kid=None, publish_until=T0
    )

    def rewrap() -> int:
        return repo.rewrap_keys(
            lambda record: ("kek-b", b"rewrapped-" + record.kid.encode()),
            lambda record: None if record.kek_id == "kek-b" else ("kek-b", b"rewrapped-hash"),
            at(1),
            audit=lambda changed: _row("rotate_kek", "kek:kek-b", f"rewrapped={changed}"),
        )

    with failing_insert(repo.engine, "audit_events") as fired, pytest.raises(StorageUnavailable):
        rewrap()
    assert fired
    assert repo.fetch_wrapping_kek_id() == "kek-a"
    key = repo.fetch_active_signing_key()
    assert key is not None and key.kek_id == "kek-a"
    assert _rows(repo) == []
    assert rewrap() == 2
    assert repo.fetch_wrapping_kek_id() == "kek-b"
    assert _rows(repo) == [("rotate_kek", "kek:kek-b", "ok", "rewrapped=2")]
