"""A write that takes its audit row (`audit=AuditEvent`) commits both or neither, on SQLite and
PostgreSQL: the driver failing the audit INSERT rolls back the change it came with."""

from __future__ import annotations

import pytest

from authsvc.errors import StorageUnavailable
from authsvc.storage.records import AudienceGrant
from authsvc.storage.repository import AuditEvent, Repository
from tests.storage.helpers import T0, at, failing_insert, live_secrets

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
