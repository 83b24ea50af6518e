"""Key lifecycle with an injected clock: publish next, activate, retire, revoke, prune."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from authsvc.clock import to_datetime, to_timestamp
from authsvc.crypto.kek import KekRing, KeyEncryptionKey
from authsvc.errors import ConfigError, DecryptError, FailedPrecondition
from authsvc.keys.manager import KeyManager
from authsvc.keys.rotator import (
    CLIENT_JWKS_REFRESH_SECONDS,
    Rotator,
    default_publish_lead,
    jwks_max_age,
)
from authsvc.keys.wrapping import load_secret_hash_key, rotate_kek
from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.records import SECRET_HASH_KEY
from authsvc.storage.repository import Repository
from authsvc_client.validation import LocalValidator
from tests.support.clock import START, FakeClock
from tests.support.server import TEST_KEK

NEW_KEK = "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs="


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    migrate.upgrade(engine)
    return Repository(engine)


def manager(repo: Repository, clock: FakeClock, kek: str = TEST_KEK) -> KeyManager:
    return KeyManager(
        repo, KeyEncryptionKey.from_base64(kek), clock, max_ttl_seconds=3600, leeway_seconds=30
    )


def rotator(m: KeyManager, clock: FakeClock, interval: int = 600, lead: float = 0) -> Rotator:
    # lead 0 unless a test is about it: on-demand rotations then never wait (Rotator.rotate_now).
    return Rotator(m, clock, interval_seconds=interval, publish_lead_seconds=lead)


def states(repo: Repository) -> dict[str, str]:
    return {k.kid: k.state for k in repo.list_signing_keys()}


class TestKeyManager:
    def test_ensure_active_creates_one_key_once(self, repo: Repository) -> None:
        m = manager(repo, FakeClock())
        first = m.ensure_active()
        assert first.state == "active" and m.ensure_active().kid == first.kid
        # Beside it one `next` key, made once too.
        assert sorted(states(repo).values()) == ["active", "next"]
        next_key = m.next_key()
        assert next_key is not None and m.ensure_next().kid == next_key.kid
        assert len(repo.list_signing_keys()) == 2

    def test_the_next_key_is_wrapped_under_the_kek_like_the_active_one(
        self, repo: Repository
    ) -> None:
        m = manager(repo, FakeClock())
        m.ensure_active()
        next_key = m.next_key()
        assert next_key is not None and next_key.private_key_enc is not None
        assert next_key.kek_id == KeyEncryptionKey.from_base64(TEST_KEK).kek_id
        assert m.private_key(next_key).key_size == 2048
        other = manager(repo, FakeClock(), "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=")
        with pytest.raises(DecryptError):
            other.private_key(next_key)

    def test_rotation_activates_the_published_next_key_and_prepares_another(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        published = m.next_key()
        assert published is not None
        clock.advance(100)
        result = rotator(m, clock).rotate_now()
        assert result.rotated_here and result.key.kid == published.kid
        assert result.key.created_at == published.created_at  # the very key published earlier
        following = m.next_key()
        assert following is not None and following.kid not in (old.kid, published.kid)
        assert states(repo) == {old.kid: "retired", published.kid: "active", following.kid: "next"}

    def test_rotation_retires_the_old_key_and_drops_its_private_part(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        clock.advance(100)
        result = rotator(m, clock).rotate_now()
        assert result.rotated_here and result.key.kid != old.kid
        keys = {k.kid: k for k in repo.list_signing_keys()}
        retired = keys[old.kid]
        assert retired.state == "retired" and retired.private_key_enc is None
        assert retired.publish_until is not None
        assert to_timestamp(retired.publish_until) == START + 100 + 3600 + 30
        with pytest.raises(ValueError):
            m.private_key(retired)
        assert m.private_key(keys[result.key.kid]).key_size == 2048

    def test_revoke_previous_ends_every_other_key_the_next_one_too(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        r = rotator(m, clock)
        m.ensure_active()
        r.rotate_now()
        pre_published = m.next_key()
        assert pre_published is not None
        new = r.rotate_now(revoke_previous=True).key
        # A fresh key signs: the pre-published one may have leaked with the active one.
        assert new.kid != pre_published.kid
        after = states(repo)
        assert after[pre_published.kid] == "revoked"
        following = m.next_key()
        assert following is not None and following.kid not in (new.kid, pre_published.kid)
        others = sorted(v for k, v in after.items() if k not in (new.kid, following.kid))
        assert others == ["revoked", "revoked", "revoked"]
        assert all(
            k.private_key_enc is None for k in repo.list_signing_keys() if k.state == "revoked"
        )

    def test_rotate_if_due_follows_the_interval(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        clock.advance(599)
        assert rotator(m, clock).rotate_if_due() is None
        clock.advance(1)
        due = rotator(m, clock).rotate_if_due()
        assert due is not None and due.key.kid != first.kid
        clock.advance(10_000)
        assert rotator(m, clock, interval=0).rotate_if_due() is None  # 0: no schedule

    def test_a_key_activated_in_the_future_is_due_after_a_step_back(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        r = rotator(m, clock)
        clock.step(-30)  # within the leeway: an ordinary skew between replicas, not due
        assert r.rotate_if_due() is None
        clock.step(-1)
        # The `next` key is stamped in that future too: published for an unknown time, as
        # long as the active key at least (they were stored together), so it may activate.
        due = r.rotate_if_due()
        assert due is not None and due.key.kid != first.kid
        # The new key is stamped by the corrected clock: the schedule is back to normal.
        clock.advance(599)
        assert r.rotate_if_due() is None

    def test_prune_drops_retired_keys_after_their_last_token(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        rotator(m, clock).rotate_now()
        clock.advance(3600 + 30 - 1)
        assert m.prune() == 0
        clock.advance(1)
        assert m.prune() == 1
        assert old.kid not in {k.kid for k in repo.list_signing_keys()}

    def test_a_retired_key_outlives_the_last_token_another_replica_signs_with_it(
        self, repo: Repository
    ) -> None:
        """A replica that has not synced yet signs with the retired key for up to one sync
        interval more: its last token expires max TTL + leeway after that, and the key stays
        published until then."""
        clock = FakeClock()
        m = KeyManager(
            repo,
            KeyEncryptionKey.from_base64(TEST_KEK),
            clock,
            max_ttl_seconds=3600,
            leeway_seconds=30,
            sync_interval_seconds=0.5,
        )
        old = m.ensure_active()
        rotator(m, clock).rotate_now()
        retired = {k.kid: k for k in repo.list_signing_keys()}[old.kid]
        assert retired.publish_until is not None
        assert to_timestamp(retired.publish_until) == clock.now() + 3600 + 30 + 1
        clock.advance(3600 + 30)
        assert m.prune() == 0  # a token signed elsewhere 0.5 s later is still valid

    def test_pruning_by_an_earlier_clock_keeps_what_it_still_needs(
        self, repo: Repository
    ) -> None:
        """The server prunes by WallClock.earliest_now: after a wrong forward jump of the
        wall clock, a retired key whose tokens the corrected clock still accepts stays."""
        clock = FakeClock()
        m = manager(repo, clock)
        old = m.ensure_active()
        rotator(m, clock).rotate_now()
        rotated_at = clock.now()
        clock.advance(7200)  # the wall clock jumps two hours ahead
        assert m.prune(rotated_at + 60) == 0
        assert old.kid in states(repo)
        assert m.prune() == 1

    def test_a_wrong_kek_cannot_unwrap_and_says_nothing(self, repo: Repository) -> None:
        active = manager(repo, FakeClock()).ensure_active()
        other = manager(repo, FakeClock(), "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=")
        with pytest.raises(DecryptError) as exc:
            other.private_key(active)
        assert str(exc.value) == "decryption failed"

    def test_every_kid_is_fresh(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        m.ensure_active()
        kids = {rotator(m, clock).rotate_now().key.kid for _ in range(3)}
        assert len(kids) == 3


class TestNextKeyAndKekRotation:
    def test_kek_rotate_rewraps_the_next_key_which_then_activates_under_the_new_kek(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        old_kek = KeyEncryptionKey.from_base64(TEST_KEK)
        new_kek = KeyEncryptionKey.from_base64(NEW_KEK)
        load_secret_hash_key(repo, KekRing(old_kek), to_datetime(clock.now()))
        m = manager(repo, clock)
        m.ensure_active()
        before = m.next_key()
        assert before is not None and before.kek_id == old_kek.kek_id
        rotate_kek(repo, KekRing(old_kek), new_kek, to_datetime(clock.now()))
        after = m.next_key()
        assert after is not None and after.kid == before.kid
        assert after.kek_id == new_kek.kek_id and after.private_key_enc != before.private_key_enc
        # A replica given only the new KEK unwraps it and activates it; the one left on the
        # old KEK alone may not (it could not sign with it).
        rolled = manager(repo, clock, NEW_KEK)
        assert rolled.private_key(after).key_size == 2048
        with pytest.raises(ConfigError):
            rotator(m, clock).rotate_now()
        result = rotator(rolled, clock).rotate_now()
        assert result.rotated_here and result.key.kid == before.kid
        following = rolled.next_key()
        assert following is not None and following.kek_id == new_kek.kek_id

    def test_a_committed_rotation_is_reported_even_when_the_following_key_cannot_be_made(
        self, repo: Repository, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        m.ensure_active()
        upcoming = m.next_key()
        assert upcoming is not None
        # The database now wraps new data under a KEK this process lacks: no new key can be
        # wrapped, but the published one (under our KEK) can still be activated.
        repo.create_wrapped_key(SECRET_HASH_KEY, "kek-elsewhere", b"wrapped", to_datetime(0))
        result = rotator(m, clock).rotate_now()
        assert result.rotated_here and result.key.kid == upcoming.kid
        assert m.next_key() is None
        assert "next signing key is not prepared yet" in caplog.text


class TestRotator:
    """The schedule policy: due by the interval, a `next` key only once published for the lead."""

    def test_the_lead_holds_a_due_rotation_back(self, repo: Repository) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        # A lead longer than the interval: due at 600 s, the next key ready at 900 s.
        r = rotator(m, clock, interval=600, lead=900)
        clock.advance(600)
        assert r.is_due(first)
        assert r.rotate_if_due() is None
        assert states(repo)[first.kid] == "active"
        clock.advance(299)
        assert r.rotate_if_due() is None
        clock.advance(1)
        done = r.rotate_if_due()
        assert done is not None and done.rotated_here and done.key.kid != first.kid

    def test_on_demand_waits_for_the_lead_and_says_how_long(self, repo: Repository) -> None:
        """DESIGN: a `next` key is published for the lead before it becomes active, on demand
        too; a second rotation within the lead (or a retry of one whose answer was lost) is
        refused, not a key validators may not hold yet."""
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        r = rotator(m, clock, interval=0, lead=900)
        young = m.next_key()
        assert young is not None and not r.is_published_long_enough(young)
        clock.advance(899)
        with pytest.raises(FailedPrecondition, match=r"in 1 s .*revoke_previous"):
            r.rotate_now()
        assert states(repo) == {first.kid: "active", young.kid: "next"}
        clock.advance(1)
        assert r.rotate_now().key.kid == young.kid
        with pytest.raises(FailedPrecondition, match="in 900 s"):
            r.rotate_now()  # its successor was published just now
        fresh = r.rotate_now(revoke_previous=True)  # a compromise does not wait
        assert states(repo)[fresh.key.kid] == "active"

    def test_a_database_without_a_next_key_gets_one_before_any_rotation(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        nxt = m.next_key()
        assert nxt is not None
        # As a database from before `next` keys: only the active key.
        with repo.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM signing_keys WHERE state = 'next'")
        r = rotator(m, clock, interval=600, lead=60)
        clock.advance(600)
        assert r.rotate_if_due() is None  # due, so a next key is published, not activated
        published = m.next_key()
        assert published is not None and states(repo)[first.kid] == "active"
        clock.advance(60)
        done = r.rotate_if_due()
        assert done is not None and done.key.kid == published.kid

    def test_a_replica_without_the_kek_of_the_next_key_leaves_the_rotation_to_others(
        self, repo: Repository
    ) -> None:
        clock = FakeClock()
        m = manager(repo, clock)
        first = m.ensure_active()
        nxt = m.next_key()
        assert nxt is not None
        stale = manager(repo, clock, "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=")
        with pytest.raises(ConfigError, match="AUTHSVC_KEK_PREVIOUS"):
            stale.activate_next(nxt, first.kid)
        assert states(repo) == {first.kid: "active", nxt.kid: "next"}


class TestPublishLead:
    def test_the_client_refresh_period_is_the_local_validators_default(self) -> None:
        default = inspect.signature(LocalValidator).parameters["jwks_refresh_seconds"].default
        assert default == CLIENT_JWKS_REFRESH_SECONDS

    def test_the_default_lead_covers_the_longest_cache_plus_one_sync(self) -> None:
        # Seven days: HTTP caches may keep the JWK Set 300 s, longer than the client's 30 s.
        assert default_publish_lead(7 * 24 * 3600, 0.5) == 300.5
        assert jwks_max_age(7 * 24 * 3600) == 300
        # A short interval: max-age is a tenth of it, the client's 30 s is the longer cache.
        assert default_publish_lead(100, 0.5) == 30.5
        assert default_publish_lead(0, 2.0) == 302.0
