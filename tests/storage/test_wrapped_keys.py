"""Storage of KEK-wrapped key material, on SQLite and PostgreSQL: the first writer's secret-hash
key wins, a re-wrap is all or nothing, and no key is activated under a KEK the database no
longer wraps under."""

from __future__ import annotations

import dataclasses

import pytest

from authsvc.storage.records import SECRET_HASH_KEY, SigningKeyRecord, WrappedKeyRecord
from authsvc.storage.repository import KekChanged, Repository
from tests.storage.helpers import T0, at, key_record


def _key(kid: str, kek_id: str) -> SigningKeyRecord:
    return dataclasses.replace(key_record(kid), kek_id=kek_id)


class TestWrappedKeys:
    def test_the_first_secret_hash_key_stored_wins(self, repo: Repository) -> None:
        assert repo.fetch_wrapping_kek_id() is None
        first = repo.create_wrapped_key(SECRET_HASH_KEY, "kek-a", b"first", T0)
        second = repo.create_wrapped_key(SECRET_HASH_KEY, "kek-b", b"second", at(1))
        assert (first.wrapped, second.wrapped) == (b"first", b"first")
        assert repo.fetch_wrapping_kek_id() == "kek-a"

    def test_a_failing_rewrap_changes_nothing(self, repo: Repository) -> None:
        repo.create_wrapped_key(SECRET_HASH_KEY, "kek-a", b"hash-key", T0)
        repo.create_signing_key(
            _key("k1", "kek-a"), T0, expected_active_kid=None, publish_until=T0
        )

        def signing(record: SigningKeyRecord) -> tuple[str, bytes]:
            return "kek-b", b"rewrapped-" + record.kid.encode()

        def failing(record: WrappedKeyRecord) -> tuple[str, bytes]:
            raise RuntimeError("unwrap failed")

        with pytest.raises(RuntimeError):
            repo.rewrap_keys(signing, failing, at(1))
        (key,) = repo.list_signing_keys()
        assert (key.kek_id, key.private_key_enc) == ("kek-a", b"wrapped-private-k1")
        assert repo.fetch_wrapping_kek_id() == "kek-a"

        def named(record: WrappedKeyRecord) -> tuple[str, bytes]:
            return "kek-b", b"rewrapped-hash-key"

        assert repo.rewrap_keys(signing, named, at(2)) == 2
        (key,) = repo.list_signing_keys()
        assert (key.kek_id, key.private_key_enc) == ("kek-b", b"rewrapped-k1")
        stored = repo.fetch_wrapped_key(SECRET_HASH_KEY)
        assert stored is not None and stored.wrapped == b"rewrapped-hash-key"
        assert repo.fetch_wrapping_kek_id() == "kek-b"

    def test_a_key_wrapped_under_a_replaced_kek_is_not_activated(self, repo: Repository) -> None:
        repo.create_wrapped_key(SECRET_HASH_KEY, "kek-b", b"hash-key", T0)
        with pytest.raises(KekChanged):
            repo.create_signing_key(
                _key("k1", "kek-a"), T0, expected_active_kid=None, publish_until=T0
            )
        assert repo.list_signing_keys() == []
        repo.create_signing_key(_key("k1", "kek-b"), T0, expected_active_kid=None, publish_until=T0)
        repo.create_signing_key(
            _key("k2", "kek-b"), at(1), expected_active_kid="k1", publish_until=at(100)
        )
        retired = {k.kid: k for k in repo.list_signing_keys()}["k1"]
        assert (retired.private_key_enc, retired.kek_id) == (None, None)
