"""Repository.update_service_grants on every dialect: a read-modify-write that loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from authsvc.errors import FailedPrecondition, NotFound
from authsvc.storage.records import AudienceGrant, ServiceRecord
from authsvc.storage.repository import Repository
from tests.storage.helpers import T0, at

Change = Callable[[ServiceRecord], Sequence[AudienceGrant]]


def _add(scope: str, pause: float = 0.0) -> Change:
    def change(service: ServiceRecord) -> Sequence[AudienceGrant]:
        # A pause between the read and the write widens the window a lost update needs.
        time.sleep(pause)
        return [AudienceGrant(g.audience, (*g.scopes, scope)) for g in service.grants]

    return change


class TestUpdateServiceGrants:
    def test_returns_before_and_after_and_records_a_change(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("a", ("x",))], b"h", T0)
        cursor = repo.fetch_latest_change_cursor()
        before, after = repo.update_service_grants("svc", _add("y"), at(5))
        assert before.grants == (AudienceGrant("a", ("x",)),)
        assert after.grants == (AudienceGrant("a", ("x", "y")),)
        assert after.updated_at == at(5)
        assert repo.fetch_service("svc") == after
        assert [c.ref for c in repo.list_changes(cursor)] == ["svc"]

    def test_unchanged_grants_write_nothing(self, repo: Repository) -> None:
        created = repo.create_service("svc", [AudienceGrant("a", ())], b"h", T0)
        cursor = repo.fetch_latest_change_cursor()
        before, after = repo.update_service_grants("svc", lambda s: s.grants, at(5))
        assert before == after == created
        assert repo.list_changes(cursor) == []

    def test_what_the_change_raises_rolls_it_back(self, repo: Repository) -> None:
        created = repo.create_service("svc", [AudienceGrant("a", ())], b"h", T0)

        def refuse(service: ServiceRecord) -> Sequence[AudienceGrant]:
            raise FailedPrecondition("no")

        with pytest.raises(FailedPrecondition):
            repo.update_service_grants("svc", refuse, at(5))
        assert repo.fetch_service("svc") == created
        with pytest.raises(NotFound):
            repo.update_service_grants("ghost", _add("y"), at(5))

    def test_updates_at_once_are_each_applied(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("a", ())], b"h", T0)
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                repo.update_service_grants("svc", _add(f"s{i}", 0.05), at(1))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        service = repo.fetch_service("svc")
        assert service is not None
        assert sorted(service.grants[0].scopes) == [f"s{i}" for i in range(6)]
