"""ServerState.refresh against a real SQLite database: a change it could not apply is not lost,
and a write committed before a refresh that failed is still answered as done.

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
from authsvc.crypto.kek import UnknownKek
from authsvc.errors import AuthsvcError, ConfigError, StorageUnavailable
from authsvc.server.app import AuthsvcServer, Core, build_core, create_service
from authsvc.storage.repository import Repository
from authsvc.sync import ServerState
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings, run_in_process


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


class TestRevocationsNeverWaitOnAReload:
    def test_a_key_this_replica_cannot_unwrap(
        self, core: Core, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A replica left on the old KEK after `kek rotate` fails every key reload once another
        replica rotates; revocations made meanwhile must still reach it, and the reload is
        tried again at every refresh until it succeeds."""
        state = ServerState(core.repo, core.manager, core.clock)
        state.load()
        old = state.signer
        next_key = core.manager.next_key()
        assert old is not None and next_key is not None
        core.manager.activate_next(next_key, old.kid)  # another replica rotated
        real_private_key = core.manager.private_key

        def not_held(record: Any) -> Any:
            raise UnknownKek

        monkeypatch.setattr(core.manager, "private_key", not_held)
        now = core.clock.now()
        core.repo.create_revocation(
            jti="leaked-jti",
            service_id=None,
            revoked_before=None,
            expires_at=to_datetime(now + 3600),
            reason="leaked",
            now=to_datetime(now),
        )
        synced = state.last_sync_at
        for _ in range(3):
            with pytest.raises(ConfigError):
                state.refresh()
            assert state.revocations.is_revoked("leaked-jti", "orders", int(now))
            assert state.last_sync_at == synced  # behind, and /readyz says so
            assert state.signer is old
        # The KEK is fixed: no new change record, yet the pending reload runs.
        monkeypatch.setattr(core.manager, "private_key", real_private_key)
        state.refresh()
        assert state.signer is not None and state.signer.kid == next_key.kid


class TestACommittedWriteIsAnsweredAsDone:
    @pytest.mark.parametrize(
        "failure",
        [StorageUnavailable("database unavailable"), ConfigError("a key this KEK cannot unwrap")],
        ids=["database away", "key not held"],
    )
    def test_rotate_signing_key_when_the_refresh_after_it_fails(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: AuthsvcError
    ) -> None:
        """RotateSigningKey has committed when this replica refreshes to show it: a refresh
        that fails then answers OK (the change shows at the next sync), not UNAVAILABLE or
        FAILED_PRECONDITION, which would say the rotation did not happen and invite a second
        one."""
        settings = in_process_settings(tmp_path)
        real = ServerState.refresh
        failed: list[int] = []

        def refresh(state: ServerState) -> Any:
            if armed and not failed:
                failed.append(1)
                raise failure
            return real(state)

        armed = False
        monkeypatch.setattr(ServerState, "refresh", refresh)

        async def body(
            server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
        ) -> None:
            nonlocal armed
            admin = await stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    service_id="admin", service_secret=secrets["admin"], audience="authsvc"
                )
            )
            md = (("authorization", f"Bearer {admin.access_token}"),)
            before = await stub.ListSigningKeys(auth_pb2.ListSigningKeysRequest(), metadata=md)
            (upcoming,) = [k.key_id for k in before.keys if k.state == "next"]
            armed = True
            rotated = await stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=md)
            assert failed, "the refresh after the rotation did not run"
            assert rotated.key_id == upcoming
            after = await stub.ListSigningKeys(auth_pb2.ListSigningKeysRequest(), metadata=md)
            assert [k.key_id for k in after.keys if k.state == "active"] == [upcoming]

        run_in_process(settings, FakeClock(), {}, body)
