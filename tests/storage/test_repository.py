"""Repository conformance: every method behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc

from authsvc.errors import AlreadyExists, FailedPrecondition, NotFound, StorageUnavailable
from authsvc.storage.records import SECRET_HASH_KEY, AudienceGrant
from authsvc.storage.repository import KekChanged, LoginBatch, Repository
from tests.storage.helpers import T0, at, key_record, live_secrets


def _aware_utc(value: datetime | None) -> bool:
    return value is None or value.utcoffset() == timedelta(0)


class TestServices:
    def test_create_then_fetch_round_trips_every_field(self, repo: Repository) -> None:
        created = repo.create_service(
            "orders",
            [AudienceGrant("billing", ("b.read",)), AudienceGrant("inventory", ("b.read",))],
            b"h1",
            T0,
        )
        fetched = repo.fetch_service("orders")
        assert fetched == created
        assert fetched.audiences == ("billing", "inventory")
        assert fetched.scopes == ("b.read",)
        assert fetched.disabled is False
        assert fetched.created_at == fetched.updated_at == T0
        assert fetched.created_at.tzinfo is not None and _aware_utc(fetched.created_at)

    def test_unknown_service_is_none(self, repo: Repository) -> None:
        assert repo.fetch_service("nobody") is None

    def test_duplicate_id_is_already_exists_and_keeps_the_first(self, repo: Repository) -> None:
        repo.create_service("orders", [AudienceGrant("a", ("s",))], b"first", T0)
        with pytest.raises(AlreadyExists):
            repo.create_service("orders", [AudienceGrant("b", ("t",))], b"second", at(1))
        assert repo.fetch_service("orders").audiences == ("a",)  # type: ignore[union-attr]
        assert [h for _, h in live_secrets(repo, "orders", at(1))] == [b"first"]

    def test_list_is_ordered_by_id(self, repo: Repository) -> None:
        for name in ["zeta", "alpha", "mid"]:
            repo.create_service(name, [AudienceGrant("x", ())], b"h", T0)
        assert [s.service_id for s in repo.list_services()] == ["alpha", "mid", "zeta"]

    def test_disable_and_enable(self, repo: Repository) -> None:
        repo.create_service("a", [AudienceGrant("x", ())], b"h", T0)
        repo.create_service("b", [AudienceGrant("x", ())], b"h", T0)
        disabled = repo.update_service_disabled("b", True, at(5))
        assert disabled.disabled is True and disabled.updated_at == at(5)
        assert disabled.created_at == T0
        assert repo.list_disabled_service_ids() == ["b"]
        repo.update_service_disabled("b", False, at(6))
        assert repo.list_disabled_service_ids() == []
        assert repo.fetch_service("b").disabled is False  # type: ignore[union-attr]

    def test_disable_unknown_is_not_found(self, repo: Repository) -> None:
        with pytest.raises(NotFound):
            repo.update_service_disabled("ghost", True, T0)

    def test_non_utc_input_is_stored_as_the_same_instant_in_utc(self, repo: Repository) -> None:
        plus2 = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        record = repo.create_service("tz", [AudienceGrant("x", ())], b"h", plus2)
        assert record.created_at == T0 and record.created_at.tzinfo == UTC
        assert repo.fetch_service("tz").created_at.tzinfo == UTC  # type: ignore[union-attr]

    def test_naive_datetime_is_refused(self, repo: Repository) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            repo.create_service("naive", [AudienceGrant("x", ())], b"h", datetime(2030, 1, 1))
        assert repo.fetch_service("naive") is None


class TestSecrets:
    def test_new_service_has_one_current_secret(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"hash-1", T0)
        assert live_secrets(repo, "svc", T0) == [("current", b"hash-1")]

    def test_rotation_with_grace_keeps_the_old_secret_until_it_expires(
        self, repo: Repository
    ) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"hash-1", T0)
        previous = repo.update_service_secret("svc", b"hash-2", at(10), at(70))
        assert previous is not None
        assert (previous.slot, previous.secret_hash, previous.expires_at) == (
            "previous",
            b"hash-1",
            at(70),
        )
        assert live_secrets(repo, "svc", at(69)) == [
            ("current", b"hash-2"),
            ("previous", b"hash-1"),
        ]
        assert [h for _, h in live_secrets(repo, "svc", at(70))] == [b"hash-2"]

    def test_at_most_one_previous_secret(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"hash-1", T0)
        repo.update_service_secret("svc", b"hash-2", at(1), at(1000))
        previous = repo.update_service_secret("svc", b"hash-3", at(2), at(1000))
        assert previous is not None and previous.secret_hash == b"hash-2"
        hashes = [h for _, h in live_secrets(repo, "svc", at(3))]
        assert hashes == [b"hash-3", b"hash-2"]

    @pytest.mark.parametrize("grace_end", [None, 10, 5])
    def test_no_grace_ends_the_old_secret_now(
        self, repo: Repository, grace_end: int | None
    ) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"hash-1", T0)
        repo.update_service_secret("svc", b"hash-2", at(1), at(1000))
        # None, "now" and a time in the past all mean: no previous secret at all.
        until = None if grace_end is None else at(grace_end)
        assert repo.update_service_secret("svc", b"hash-3", at(10), until) is None
        assert [h for _, h in live_secrets(repo, "svc", at(10))] == [b"hash-3"]

    def test_a_rotation_expecting_a_superseded_current_secret_changes_nothing(
        self, repo: Repository
    ) -> None:
        repo.create_service("svc", [AudienceGrant("a", ())], b"1" * 32, T0)
        repo.update_service_secret(
            "svc", b"2" * 32, at(1), at(100), expected_current_hash=b"1" * 32
        )
        # A second rotation authenticated with the first secret, committing after the first.
        with pytest.raises(FailedPrecondition):
            repo.update_service_secret(
                "svc", b"3" * 32, at(2), None, expected_current_hash=b"1" * 32
            )
        assert live_secrets(repo, "svc", at(2)) == [
            ("current", b"2" * 32),
            ("previous", b"1" * 32),
        ]

    def test_an_ended_grace_is_deleted_and_stays_ended_at_an_earlier_time(
        self, repo: Repository
    ) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"hash-1", T0)
        repo.update_service_secret("svc", b"hash-2", at(10), at(70))
        assert repo.end_secret_graces(at(69)) == 0
        assert len(live_secrets(repo, "svc", at(69))) == 2
        assert repo.end_secret_graces(at(70)) == 1
        # Read again at a time within the grace (a clock stepped back): it does not return.
        assert [h for _, h in live_secrets(repo, "svc", at(20))] == [b"hash-2"]
        assert repo.end_secret_graces(at(100)) == 0

    def test_rotate_unknown_service_is_not_found(self, repo: Repository) -> None:
        with pytest.raises(NotFound):
            repo.update_service_secret("ghost", b"h", T0, None)

    def test_secrets_of_unknown_service_are_empty(self, repo: Repository) -> None:
        assert live_secrets(repo, "ghost", T0) == []

    def test_repr_never_shows_the_hash(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"\x01SENSITIVE-HASH", T0)
        secret = repo.update_service_secret("svc", b"hash-2", at(1), at(100))
        assert secret is not None and secret.secret_hash == b"\x01SENSITIVE-HASH"
        assert "SENSITIVE" not in repr(secret) and "secret_hash" not in repr(secret)


class TestSigningKeys:
    def test_first_key_becomes_active(self, repo: Repository) -> None:
        assert repo.fetch_active_signing_key() is None
        won = repo.create_signing_key(
            key_record("k1"), at(1), expected_active_kid=None, publish_until=at(100)
        )
        assert won is True
        active = repo.fetch_active_signing_key()
        assert active is not None
        assert (active.kid, active.state, active.activated_at) == ("k1", "active", at(1))
        assert active.private_key_enc == b"wrapped-private-k1"
        assert json.loads(active.public_jwk)["kid"] == "k1"

    def test_stale_expectation_inserts_nothing(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        assert not repo.create_signing_key(
            key_record("k2"), at(1), expected_active_kid=None, publish_until=at(9)
        )
        assert not repo.create_signing_key(
            key_record("k3"), at(1), expected_active_kid="other", publish_until=at(9)
        )
        assert [k.kid for k in repo.list_signing_keys()] == ["k1"]

    def test_rotation_retires_the_old_key_and_drops_its_private_part(
        self, repo: Repository
    ) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        assert repo.create_signing_key(
            key_record("k2", at(10)), at(10), expected_active_kid="k1", publish_until=at(3610)
        )
        by_kid = {k.kid: k for k in repo.list_signing_keys()}
        old, new = by_kid["k1"], by_kid["k2"]
        assert (old.state, old.retired_at, old.publish_until) == ("retired", at(10), at(3610))
        assert old.private_key_enc is None
        assert old.activated_at == T0
        assert (new.state, new.activated_at) == ("active", at(10))
        assert repo.fetch_active_signing_key() == new

    def test_revoke_others_revokes_every_older_key_at_once(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        repo.create_signing_key(
            key_record("k2", at(1)), at(1), expected_active_kid="k1", publish_until=at(3600)
        )
        assert repo.create_signing_key(
            key_record("k3", at(2)),
            at(2),
            expected_active_kid="k2",
            publish_until=at(3600),
            revoke_others=True,
        )
        states = {
            k.kid: (k.state, k.publish_until, k.private_key_enc) for k in repo.list_signing_keys()
        }
        assert states["k1"] == ("revoked", at(2), None)
        assert states["k2"] == ("revoked", at(2), None)
        assert states["k3"][0] == "active" and states["k3"][2] == b"wrapped-private-k3"

    def test_list_is_newest_first(self, repo: Repository) -> None:
        previous = None
        for i in range(3):
            repo.create_signing_key(
                key_record(f"k{i}", at(i)),
                at(i),
                expected_active_kid=previous,
                publish_until=at(100),
            )
            previous = f"k{i}"
        keys = repo.list_signing_keys()
        assert [k.kid for k in keys] == ["k2", "k1", "k0"]
        assert all(_aware_utc(k.created_at) and _aware_utc(k.publish_until) for k in keys)

    def test_duplicate_kid_is_already_exists(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        with pytest.raises(AlreadyExists):
            repo.create_signing_key(
                key_record("k1"), at(1), expected_active_kid="k1", publish_until=at(2)
            )
        assert [(k.kid, k.state) for k in repo.list_signing_keys()] == [("k1", "active")]

    def test_prune_drops_only_unpublished_retired_and_revoked_keys(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        repo.create_signing_key(
            key_record("k2", at(1)), at(1), expected_active_kid="k1", publish_until=at(100)
        )
        repo.create_signing_key(
            key_record("k3", at(2)), at(2), expected_active_kid="k2", publish_until=at(200)
        )
        assert repo.prune_signing_keys(at(99)) == 0
        assert repo.prune_signing_keys(at(100)) == 1  # k1 (publish_until reached)
        assert [k.kid for k in repo.list_signing_keys()] == ["k3", "k2"]
        assert repo.prune_signing_keys(at(10_000)) == 1  # k2; the active key always stays
        assert [k.kid for k in repo.list_signing_keys()] == ["k3"]

    def test_a_next_key_is_stored_once_and_activated_by_a_later_rotation(
        self, repo: Repository
    ) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        assert repo.create_next_signing_key(key_record("n1"), at(1))
        assert not repo.create_next_signing_key(key_record("n2"), at(2))  # one next at a time
        keys = {k.kid: k for k in repo.list_signing_keys()}
        assert set(keys) == {"k1", "n1"}
        assert (keys["n1"].state, keys["n1"].created_at, keys["n1"].activated_at) == (
            "next",
            at(1),
            None,
        )
        assert repo.fetch_active_signing_key() == keys["k1"]  # published, not signing
        assert (
            repo.activate_next_signing_key(
                "n1", at(5), expected_active_kid="k1", publish_until=at(3605)
            )
            == "activated"
        )
        keys = {k.kid: k for k in repo.list_signing_keys()}
        assert (keys["k1"].state, keys["k1"].publish_until) == ("retired", at(3605))
        assert (keys["n1"].state, keys["n1"].activated_at) == ("active", at(5))

    def test_activating_a_next_key_checks_the_active_key_and_the_state(
        self, repo: Repository
    ) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        repo.create_next_signing_key(key_record("n1"), at(1))
        stale = repo.activate_next_signing_key(
            "n1", at(2), expected_active_kid="other", publish_until=at(9)
        )
        assert stale == "already_rotated"
        assert (
            repo.activate_next_signing_key(
                "k1", at(2), expected_active_kid="k1", publish_until=at(9)
            )
            == "no_next"
        )
        assert {k.kid: k.state for k in repo.list_signing_keys()} == {"k1": "active", "n1": "next"}

    def test_revoke_others_revokes_the_next_key_too(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        repo.create_next_signing_key(key_record("n1"), at(1))
        assert repo.create_signing_key(
            key_record("k2", at(2)),
            at(2),
            expected_active_kid="k1",
            publish_until=at(3600),
            revoke_others=True,
        )
        keys = {k.kid: k for k in repo.list_signing_keys()}
        assert (keys["n1"].state, keys["n1"].private_key_enc) == ("revoked", None)
        assert (
            repo.activate_next_signing_key(
                "n1", at(3), expected_active_kid="k2", publish_until=at(9)
            )
            == "no_next"
        )

    def test_a_next_key_under_a_replaced_kek_is_not_stored(self, repo: Repository) -> None:
        repo.create_wrapped_key(SECRET_HASH_KEY, "kek-new", b"wrapped", T0)
        record = replace(key_record("n1"), kek_id="kek-old")
        with pytest.raises(KekChanged):
            repo.create_next_signing_key(record, at(1))
        assert repo.list_signing_keys() == []

    def test_repr_never_shows_the_private_key(self, repo: Repository) -> None:
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        active = repo.fetch_active_signing_key()
        assert "wrapped-private" not in repr(active) and "private_key_enc" not in repr(active)


class TestRevocations:
    def _revoke_jti(self, repo: Repository, jti: str, expires: int, now: int = 0) -> object:
        return repo.create_revocation(
            jti=jti,
            service_id=None,
            revoked_before=None,
            expires_at=at(expires),
            reason="leaked",
            now=at(now),
        )

    def test_jti_revocation_round_trips(self, repo: Repository) -> None:
        record = repo.create_revocation(
            jti="j1",
            service_id=None,
            revoked_before=None,
            expires_at=at(900),
            reason="leaked",
            now=at(1),
        )
        assert record is not None and record.cursor >= 1
        assert (record.jti, record.service_id, record.reason) == ("j1", None, "leaked")
        assert (record.expires_at, record.created_at) == (at(900), at(1))
        assert repo.list_revocations(0, at(2)) == [record]

    def test_held_revocations_are_the_records_in_whole_epoch_seconds(
        self, repo: Repository
    ) -> None:
        """What a replica loads at start must equal what it would derive from the records."""
        self._revoke_jti(repo, "j1", 900)
        self._revoke_jti(repo, "j2", 1)  # expires before `now`: not held
        repo.create_revocation(
            jti=None,
            service_id="orders",
            revoked_before=at(5.75),
            expires_at=at(3600.5),
            reason="disabled",
            now=at(1),
            kind="service_disabled",
        )
        records = repo.list_revocations(0, at(2))
        held = repo.list_held_revocations(0, at(2))
        assert held == [
            (
                r.cursor,
                r.jti,
                r.service_id,
                None if r.revoked_before is None else int(r.revoked_before.timestamp()),
                int(r.expires_at.timestamp()),
                r.kind,
            )
            for r in records
        ]
        assert [h.jti or h.service_id for h in held] == ["j1", "orders"]
        assert [h.kind for h in held] == ["token", "service_disabled"]
        assert repo.list_held_revocations(held[0].cursor, at(2), limit=1) == held[1:]

    def test_kind_defaults_from_the_target_and_must_fit_it(self, repo: Repository) -> None:
        self._revoke_jti(repo, "j-kind", 900)
        service = repo.create_revocation(
            jti=None,
            service_id="orders",
            revoked_before=at(5),
            expires_at=at(900),
            reason="all of them",
            now=at(1),
        )
        assert service is not None and service.kind == "service_tokens"
        assert [r.kind for r in repo.list_revocations(0, at(2))] == ["token", "service_tokens"]
        with pytest.raises(ValueError):
            repo.create_revocation(
                jti="j-bad",
                service_id=None,
                revoked_before=None,
                expires_at=at(900),
                reason="x",
                now=at(1),
                kind="service_disabled",
            )

    def test_service_revocation_round_trips(self, repo: Repository) -> None:
        record = repo.create_revocation(
            jti=None,
            service_id="orders",
            revoked_before=at(5),
            expires_at=at(3600),
            reason="compromised",
            now=at(4),
        )
        assert record is not None
        [listed] = repo.list_revocations(0, at(4))
        assert listed == record
        assert (listed.service_id, listed.jti, listed.revoked_before) == ("orders", None, at(5))
        assert _aware_utc(listed.revoked_before)

    def test_same_jti_twice_adds_nothing(self, repo: Repository) -> None:
        assert self._revoke_jti(repo, "j1", 900) is not None
        assert self._revoke_jti(repo, "j1", 5000) is None
        [only] = repo.list_revocations(0, T0)
        assert only.expires_at == at(900)

    def test_several_service_revocations_may_coexist(self, repo: Repository) -> None:
        for i in range(2):
            repo.create_revocation(
                jti=None,
                service_id="orders",
                revoked_before=at(i),
                expires_at=at(900),
                reason="",
                now=at(i),
            )
        assert len(repo.list_revocations(0, T0)) == 2

    @pytest.mark.parametrize(("jti", "service_id"), [(None, None), ("j", "svc")])
    def test_exactly_one_target(
        self, repo: Repository, jti: str | None, service_id: str | None
    ) -> None:
        with pytest.raises(ValueError, match="exactly one"):
            repo.create_revocation(
                jti=jti,
                service_id=service_id,
                revoked_before=None,
                expires_at=at(9),
                reason="",
                now=T0,
            )
        assert repo.fetch_latest_revocation_cursor() == 0

    def test_cursors_increase_and_paging_by_cursor_sees_each_row_once(
        self, repo: Repository
    ) -> None:
        cursors = [self._revoke_jti(repo, f"j{i}", 900).cursor for i in range(7)]  # type: ignore[attr-defined]
        assert cursors == sorted(cursors) and len(set(cursors)) == 7
        assert repo.fetch_latest_revocation_cursor() == cursors[-1]
        seen: list[str | None] = []
        after = 0
        while page := repo.list_revocations(after, T0, limit=3):
            assert len(page) <= 3
            seen.extend(r.jti for r in page)
            after = page[-1].cursor
        assert seen == [f"j{i}" for i in range(7)]
        assert repo.list_revocations(cursors[3], T0) == repo.list_revocations(0, T0)[4:]

    def test_expired_revocations_are_hidden_then_pruned(self, repo: Repository) -> None:
        self._revoke_jti(repo, "short", 60)
        self._revoke_jti(repo, "long", 600)
        assert [r.jti for r in repo.list_revocations(0, at(59))] == ["short", "long"]
        assert [r.jti for r in repo.list_revocations(0, at(60))] == ["long"]
        assert repo.prune_revocations(at(60)) == 1
        assert repo.prune_revocations(at(60)) == 0
        assert [r.jti for r in repo.list_revocations(0, T0)] == ["long"]

    def test_cursors_are_never_reused_after_a_prune(self, repo: Repository) -> None:
        last = self._revoke_jti(repo, "a", 10).cursor  # type: ignore[attr-defined]
        assert repo.prune_revocations(at(10)) == 1
        assert repo.fetch_latest_revocation_cursor() == 0
        again = self._revoke_jti(repo, "b", 900, now=11)
        assert again.cursor > last  # type: ignore[attr-defined]

    def test_latest_cursor_of_empty_table_is_zero(self, repo: Repository) -> None:
        assert repo.fetch_latest_revocation_cursor() == 0
        assert repo.list_revocations(0, T0) == []


class TestChanges:
    def test_every_state_change_is_recorded_in_order(self, repo: Repository) -> None:
        assert repo.fetch_latest_change_cursor() == 0
        repo.create_service("svc", [AudienceGrant("x", ())], b"h", T0)
        repo.update_service_disabled("svc", True, at(1))
        repo.create_signing_key(
            key_record("k1"), at(2), expected_active_kid=None, publish_until=at(2)
        )
        repo.create_signing_key(
            key_record("k2", at(3)), at(3), expected_active_kid="k1", publish_until=at(4)
        )
        repo.prune_signing_keys(at(4))
        changes = repo.list_changes(0)
        assert [(c.kind, c.ref) for c in changes] == [
            ("service", "svc"),
            ("service", "svc"),
            ("key", "k1"),
            ("key", "k2"),
            ("key", "k1"),
        ]
        assert [c.created_at for c in changes] == [T0, at(1), at(2), at(3), at(4)]
        cursors = [c.cursor for c in changes]
        assert cursors == sorted(set(cursors))
        assert repo.fetch_latest_change_cursor() == cursors[-1]
        assert repo.list_changes(cursors[1], limit=2) == changes[2:4]

    def test_lost_rotation_and_failed_writes_record_nothing(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"h", T0)
        before = repo.fetch_latest_change_cursor()
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid="nope", publish_until=T0)
        with pytest.raises(AlreadyExists):
            repo.create_service("svc", [AudienceGrant("x", ())], b"h", T0)
        assert repo.prune_signing_keys(at(1)) == 0
        assert repo.fetch_latest_change_cursor() == before


class TestAudit:
    def _event(self, repo: Repository, i: int, **extra: str) -> None:
        repo.create_audit_event(
            at=at(i),
            actor=f"actor{i}",
            action="rotate_secret",
            target="service:x",
            outcome="ok",
            peer="ipv4:127.0.0.1:5",
            request_id=f"r{i}",
            **extra,
        )

    def test_events_round_trip_newest_first(self, repo: Repository) -> None:
        self._event(repo, 1, detail="grace_seconds=60")
        self._event(repo, 2)
        newest, oldest = repo.list_audit_events()
        assert (newest.actor, newest.at, newest.detail) == ("actor2", at(2), "")
        assert (oldest.actor, oldest.action, oldest.target, oldest.outcome) == (
            "actor1",
            "rotate_secret",
            "service:x",
            "ok",
        )
        assert (oldest.peer, oldest.request_id, oldest.detail) == (
            "ipv4:127.0.0.1:5",
            "r1",
            "grace_seconds=60",
        )
        assert newest.id > oldest.id

    def test_paging_with_before_id(self, repo: Repository) -> None:
        for i in range(5):
            self._event(repo, i)
        first = repo.list_audit_events(limit=2)
        second = repo.list_audit_events(limit=2, before_id=first[-1].id)
        third = repo.list_audit_events(limit=2, before_id=second[-1].id)
        assert [e.actor for e in first + second + third] == [f"actor{i}" for i in range(4, -1, -1)]

    def test_prune_drops_events_older_than_the_cutoff(self, repo: Repository) -> None:
        for i in range(4):
            self._event(repo, i)
        assert repo.prune_audit_events(at(2)) == 2
        assert [e.actor for e in repo.list_audit_events()] == ["actor3", "actor2"]


def _count_failure(repo: Repository, key: str, now: datetime, window: int = 60) -> int:
    """One more failure for `key` as a login counts it; returns the count in the window."""
    with repo.login_batch(now, window) as batch:
        batch.failures(key, key)
        batch.count_failure(key)
        return batch.failures(key, key)[0]


def _failures(repo: Repository, key: str, now: datetime, window: int = 60) -> int:
    """Failures for `key` in the window at `now`, read as a login reads them."""
    with repo.login_batch(now, window) as batch:
        return batch.failures(key, key)[0]


class TestAuthFailures:
    def test_failures_count_up_within_the_window(self, repo: Repository) -> None:
        assert _failures(repo, "id:svc", T0) == 0
        assert [_count_failure(repo, "id:svc", at(i)) for i in range(3)] == [1, 2, 3]
        assert _failures(repo, "id:svc", at(59)) == 3
        assert _failures(repo, "id:other", at(1)) == 0

    def test_window_expiry_restarts_the_count(self, repo: Repository) -> None:
        _count_failure(repo, "k", T0)
        _count_failure(repo, "k", at(30))
        # The window started at T0, not at the last failure.
        assert _failures(repo, "k", at(60)) == 0
        assert _count_failure(repo, "k", at(60)) == 1
        assert _count_failure(repo, "k", at(61)) == 2
        assert _failures(repo, "k", at(119)) == 2

    def test_a_reset_is_committed(self, repo: Repository) -> None:
        _count_failure(repo, "k", T0)
        with repo.login_batch(T0, 60) as batch:
            batch.reset_failures("k")
            batch.reset_failures("never-seen")
        assert _failures(repo, "k", T0) == 0
        assert _count_failure(repo, "k", T0) == 1

    def test_prune_drops_stale_counters(self, repo: Repository) -> None:
        _count_failure(repo, "old", T0)
        _count_failure(repo, "new", at(100))
        assert repo.prune_auth_failures(at(50)) == 1
        assert _failures(repo, "old", at(1)) == 0
        assert _failures(repo, "new", at(100)) == 1


class TestLoginBatch:
    """The login batch's unit of work: reads inside the transaction, writes at its commit."""

    def _service(self, repo: Repository, sid: str = "svc", secret: bytes = b"h" * 32) -> None:
        repo.create_service(sid, [AudienceGrant("billing", ("read",))], secret, T0)

    def test_credentials_are_the_service_and_its_live_secret_hashes(self, repo: Repository) -> None:
        self._service(repo, secret=b"a" * 32)
        repo.update_service_secret("svc", b"b" * 32, at(1), previous_expires_at=at(61))
        with repo.login_batch(at(30), 60) as batch:
            service = batch.service("svc")
            assert service is not None and service.audiences == ("billing",)
            # The current first.
            assert batch.secrets("svc") == (("current", b"b" * 32), ("previous", b"a" * 32))
            assert batch.service("nobody") is None and batch.secrets("nobody") == ()
        with repo.login_batch(at(61), 60) as batch:
            assert batch.secrets("svc") == (("current", b"b" * 32),)  # the grace has ended

    def test_a_service_without_a_live_secret_has_no_hashes(self, repo: Repository) -> None:
        self._service(repo)
        repo.update_service_secret("svc", b"b" * 32, at(1), previous_expires_at=None)
        with repo.login_batch(at(2), 60) as batch:
            assert batch.service("svc") is not None
            assert batch.secrets("svc") == (("current", b"b" * 32),)

    def test_failures_counted_in_a_batch_are_seen_by_the_batch_and_committed(
        self, repo: Repository
    ) -> None:
        _count_failure(repo, "id:svc", T0)
        with repo.login_batch(at(1), 60) as batch:
            assert batch.failures("id:svc", "peer:p") == (1, 0)
            batch.count_failure("id:svc")
            batch.count_failure("peer:p")
            assert batch.failures("id:svc", "peer:p") == (2, 1)
            batch.reset_failures("id:svc")
            assert batch.failures("id:svc", "peer:p") == (0, 1)
            batch.count_failure("id:svc")
        assert _failures(repo, "id:svc", at(2)) == 1
        assert _failures(repo, "peer:p", at(2)) == 1

    def test_an_expired_window_reads_zero_and_restarts_at_one(self, repo: Repository) -> None:
        _count_failure(repo, "k", T0)
        with repo.login_batch(at(60), 60) as batch:
            assert batch.failures("k", "peer:p") == (0, 0)
            batch.count_failure("k")
        assert _failures(repo, "k", at(61)) == 1

    def test_known_peers_and_audit_rows_commit_with_the_batch(self, repo: Repository) -> None:
        with repo.login_batch(at(5), 60) as batch:
            assert batch.known_peer_since("svc", "ipv4:10.0.0.1") is None
            batch.remember_peer("svc", "ipv4:10.0.0.1")
            batch.remember_peer("svc", "ipv4:10.0.0.1")  # once per batch and pair
            for i in range(3):
                batch.audit(
                    actor="svc",
                    action="issue_token",
                    target="billing",
                    outcome="ok",
                    peer="ipv4:10.0.0.1",
                    request_id=f"r{i}",
                    detail=f"jti=j{i}",
                )
        with repo.login_batch(at(6), 60) as batch:
            assert batch.known_peer_since("svc", "ipv4:10.0.0.1") == at(5)
        rows = repo.list_audit_events()
        assert [(r.request_id, r.detail, r.at) for r in rows] == [
            (f"r{i}", f"jti=j{i}", at(5)) for i in (2, 1, 0)
        ]

    def _attempt(self, batch: LoginBatch, key: str, request_id: str) -> None:
        batch.aggregate(
            key,
            actor="*",
            action="issue_token",
            target="*",
            outcome="unknown_service",
            peer="ipv4:10.0.0.2",
            request_id=request_id,
        )

    def test_aggregated_attempts_are_one_row_per_key_across_batches(self, repo: Repository) -> None:
        with repo.login_batch(at(5), 60) as batch:
            for i in range(3):
                self._attempt(batch, "k1", f"r{i}")
            self._attempt(batch, "k2", "other")
        assert batch.created_aggregates == {"k1", "k2"}
        with repo.login_batch(at(9), 60) as batch:
            self._attempt(batch, "k1", "later")
            self._attempt(batch, "k1", "later2")
        assert batch.created_aggregates == set()
        k2, k1 = repo.list_audit_events()
        # The first attempt's fields stay; the count grows and `at` follows the last attempt.
        assert (k1.count, k1.first_at, k1.at, k1.request_id) == (5, at(5), at(9), "r0")
        assert (k1.actor, k1.action, k1.target, k1.outcome, k1.peer, k1.detail) == (
            "*",
            "issue_token",
            "*",
            "unknown_service",
            "ipv4:10.0.0.2",
            "",
        )
        assert (k2.count, k2.first_at, k2.request_id) == (1, at(5), "other")

    def test_plain_audit_rows_count_one_and_have_no_first_time(self, repo: Repository) -> None:
        with repo.login_batch(at(5), 60) as batch:
            batch.audit(
                actor="svc",
                action="issue_token",
                target="billing",
                outcome="ok",
                peer="p",
                request_id="r",
            )
        repo.create_audit_event(
            at=at(6),
            actor="cli",
            action="create_service",
            target="service:x",
            outcome="ok",
            peer="local",
            request_id="c",
        )
        assert [(e.count, e.first_at) for e in repo.list_audit_events()] == [(1, None)] * 2

    def test_an_aggregated_row_is_pruned_by_its_last_attempt(self, repo: Repository) -> None:
        with repo.login_batch(at(5), 60) as batch:
            self._attempt(batch, "k", "r")
        with repo.login_batch(at(50), 60) as batch:
            self._attempt(batch, "k", "r2")
        assert repo.prune_audit_events(at(10)) == 0
        assert repo.prune_audit_events(at(51)) == 1

    def test_an_error_inside_the_batch_commits_nothing(self, repo: Repository) -> None:
        with pytest.raises(RuntimeError), repo.login_batch(at(1), 60) as batch:
            batch.failures("id:svc", "peer:p")
            batch.count_failure("id:svc")
            batch.remember_peer("svc", "peer:p")
            batch.audit(
                actor="svc",
                action="issue_token",
                target="billing",
                outcome="bad_credentials",
                peer="p",
                request_id="r",
            )
            self._attempt(batch, "k", "r")
            raise RuntimeError("the login batch failed mid-batch")
        assert _failures(repo, "id:svc", at(2)) == 0
        assert repo.list_audit_events() == []
        with repo.login_batch(at(2), 60) as batch:
            assert batch.known_peer_since("svc", "peer:p") is None

    def test_a_refused_statement_fails_the_batch_as_sqlalchemy_would_and_commits_nothing(
        self, repo: Repository
    ) -> None:
        """The batch runs its statements on the DBAPI cursor: a driver error still comes out as
        SQLAlchemy's exception for it (what `_storage_errors` and callers judge), with the
        parameters left out as the engine's hide_parameters leaves them out, and the
        transaction is rolled back."""
        with (
            pytest.raises(sa_exc.IntegrityError) as raised,
            repo.login_batch(at(1), 60) as batch,
        ):
            batch.failures("id:svc", "peer:p")
            batch.count_failure("id:svc")
            batch.audit(
                actor=None,  # type: ignore[arg-type]  # NOT NULL: the database refuses the row
                action="issue_token",
                target="billing",
                outcome="ok",
                peer="ipv4:10.9.8.7",
                request_id="request-value-7f3a",
            )
        assert not isinstance(raised.value, StorageUnavailable)
        assert raised.value.orig is not None and raised.value.__cause__ is raised.value.orig
        assert "[parameters:" not in str(raised.value)
        assert _failures(repo, "id:svc", at(2)) == 0
        assert repo.list_audit_events() == []

    @pytest.mark.parametrize("dialect", [pytest.param("postgres", marks=pytest.mark.postgres)])
    def test_a_connection_lost_mid_batch_is_unavailable_and_the_next_batch_reconnects(
        self, repo: Repository
    ) -> None:
        """PostgreSQL ends the batch's session (a restart, a failover, an admin) between two
        statements: the batch is StorageUnavailable, nothing of it is kept, and the dead
        connection is not handed to the next batch."""
        dropped: list[object] = []
        event.listen(repo.engine, "invalidate", lambda dbapi_conn, *_: dropped.append(dbapi_conn))
        with pytest.raises(StorageUnavailable), repo.login_batch(at(1), 60) as batch:
            batch.failures("id:svc", "peer:p")
            batch.count_failure("id:svc")
            lost = batch._c.connection.dbapi_connection
            end = text("SELECT pg_terminate_backend(:pid)")
            with repo.engine.connect() as admin:
                admin.execute(end, {"pid": lost.info.backend_pid})  # type: ignore[union-attr]
            batch.count_failure("peer:p")
        # The dead connection is dropped before the next batch could be handed it.
        assert dropped == [lost]
        assert _failures(repo, "id:svc", at(2)) == 0
        assert _count_failure(repo, "id:svc", at(3)) == 1
