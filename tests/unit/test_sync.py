"""ServerState.refresh against a real SQLite database: a change it could not apply is not lost.

A replica learns of key, service and trust changes from the change log; a refresh that reads
the log and then fails to apply it (the database away for a moment) must see the same changes
again next time, or the replica goes on serving the old state while reporting itself in sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authsvc.clock import to_datetime
from authsvc.errors import StorageUnavailable
from authsvc.server.app import Core, build_core, create_service
from authsvc.storage.repository import Repository
from authsvc.sync import ServerState
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = build_core(in_process_settings(tmp_path), FakeClock())
    core.manager.ensure_active()
    try:
        yield core
    finally:
        core.dispose()


def _fail_once(monkeypatch: pytest.MonkeyPatch, core: Core, method: str) -> list[str]:
    """Make core.repo.`method` raise StorageUnavailable on its next call only."""
    calls: list[str] = []
    real = getattr(Repository, method)

    def flaky(repo: Repository, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        if len(calls) == 1:
            raise StorageUnavailable("database unavailable")
        return real(repo, *args, **kwargs)

    monkeypatch.setattr(Repository, method, flaky)
    return calls


class TestAChangeThatFailedToApplyIsRetried:
    def test_a_key_rotation(self, core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
        state = ServerState(core.repo, core.manager, core.clock)
        state.load()
        old = state.signer
        assert old is not None
        next_key = core.manager.next_key()
        assert next_key is not None
        core.manager.activate_next(next_key, old.kid)
        _fail_once(monkeypatch, core, "list_signing_keys")
        synced = state.last_sync_at
        with pytest.raises(StorageUnavailable):
            state.refresh()
        assert state.last_sync_at == synced  # not reported in sync
        assert state.signer is old
        state.refresh()
        assert state.signer is not None and state.signer.kid == next_key.kid
        assert next_key.kid in state.keyring

    def test_a_disabled_service(self, core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
        create_service(core, "orders", ["billing"], [])
        state = ServerState(core.repo, core.manager, core.clock)
        state.load()
        core.repo.update_service_disabled("orders", True, to_datetime(core.clock.now()))
        _fail_once(monkeypatch, core, "list_disabled_service_ids")
        with pytest.raises(StorageUnavailable):
            state.refresh()
        assert state.is_subject_enabled("orders")
        state.refresh()
        assert not state.is_subject_enabled("orders")
