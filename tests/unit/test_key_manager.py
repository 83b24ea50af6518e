"""Key lifecycle with an injected clock: activate, retire, revoke, prune."""

from __future__ import annotations

from pathlib import Path

import pytest

from authsvc.clock import to_timestamp
from authsvc.crypto.kek import KeyEncryptionKey
from authsvc.errors import DecryptError
from authsvc.keys.manager import KeyManager
from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from tests.support.clock import START, FakeClock
from tests.support.server import TEST_KEK


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    migrate.upgrade(engine)
    return Repository(engine)


def manager(repo: Repository, clock: FakeClock, kek: str = TEST_KEK) -> KeyManager:
    return KeyManager(
        repo, KeyEncryptionKey.from_base64(kek), clock, max_ttl_seconds=3600, leeway_seconds=30
    )


class TestKeyManager:
    def test_ensure_active_creates_one_key_once(self, repo: Repository) -> None:
        m = manager(repo, FakeClock())
        first = m.ensure_active()
        assert first.state == "active" and m.ensure_active().kid == first.kid
        assert len(repo.list_signing_keys()) == 1

    def test_rotation_retires_the_old_key_and_drops_its_private_part(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        clock.advance(100)
        result = m.rotate()
        assert result.rotated_here and result.key.kid != old.kid
        keys = {k.kid: k for k in repo.list_signing_keys()}
        retired = keys[old.kid]
        assert retired.state == "retired" and retired.private_key_enc is None
        assert retired.publish_until is not None
        assert to_timestamp(retired.publish_until) == START + 100 + 3600 + 30
        with pytest.raises(ValueError):
            m.private_key(retired)
        assert m.private_key(keys[result.key.kid]).key_size == 2048

    def test_revoke_previous_ends_every_older_key(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        m.ensure_active()
        m.rotate()
        new = m.rotate(revoke_previous=True).key
        states = sorted(k.state for k in repo.list_signing_keys() if k.kid != new.kid)
        assert states == ["revoked", "revoked"]

    def test_rotate_if_due_follows_the_interval(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        clock.advance(599)
        assert m.rotate_if_due(600) is None
        clock.advance(1)
        due = m.rotate_if_due(600)
        assert due is not None and due.key.kid != first.kid
        assert m.rotate_if_due(0) is None  # 0 disables scheduled rotation

    def test_a_key_activated_in_the_future_is_due_after_a_step_back(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        clock.step(-30)  # within the leeway: an ordinary skew between replicas, not due
        assert m.rotate_if_due(600) is None
        clock.step(-1)
        due = m.rotate_if_due(600)
        assert due is not None and due.key.kid != first.kid
        # The new key is stamped by the corrected clock: the schedule is back to normal.
        clock.advance(599)
        assert m.rotate_if_due(600) is None

    def test_prune_drops_retired_keys_after_their_last_token(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        m.rotate()
        clock.advance(3600 + 30 - 1)
        assert m.prune() == 0
        clock.advance(1)
        assert m.prune() == 1
        assert old.kid not in {k.kid for k in repo.list_signing_keys()}

    def test_a_wrong_kek_cannot_unwrap_and_says_nothing(self, repo: Repository) -> None:
        active = manager(repo, FakeClock()).ensure_active()
        other = manager(repo, FakeClock(), "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=")
        with pytest.raises(DecryptError) as exc:
            other.private_key(active)
        assert str(exc.value) == "decryption failed"

    def test_every_kid_is_fresh(self, repo: Repository) -> None:
        m = manager(repo, FakeClock())
        m.ensure_active()
        kids = {m.rotate().key.kid for _ in range(3)}
        assert len(kids) == 3
