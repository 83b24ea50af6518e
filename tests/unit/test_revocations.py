"""RevocationSet: jti and per-service revocations, cursor, pruning, concurrency and memory."""

from __future__ import annotations

import gc
import secrets
import threading
import tracemalloc

from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.v1 import auth_pb2

NOW = 1_700_000_000


def jti_entry(cursor: int, jti: str, expires_at: int = NOW + 900) -> RevocationEntry:
    return RevocationEntry(
        cursor=cursor, jti=jti, service_id=None, revoked_before=None, expires_at=expires_at
    )


def service_entry(cursor: int, service: str, before: int, expires_at: int) -> RevocationEntry:
    return RevocationEntry(
        cursor=cursor, jti=None, service_id=service, revoked_before=before, expires_at=expires_at
    )


class TestRevocationEntry:
    def test_from_proto_one_token(self) -> None:
        event = auth_pb2.RevocationEvent(cursor=7, jti="j1")
        event.expires_at.seconds = NOW + 60
        assert RevocationEntry.from_proto(event) == RevocationEntry(7, "j1", None, None, NOW + 60)

    def test_from_proto_whole_service(self) -> None:
        event = auth_pb2.RevocationEvent(cursor=8, service_id="svc-a")
        event.revoked_before.seconds = NOW
        event.expires_at.seconds = NOW + 3600
        # No kind (a server older than the field): the target says it.
        assert RevocationEntry.from_proto(event) == RevocationEntry(
            8, None, "svc-a", NOW, NOW + 3600, "service_tokens"
        )

    def test_from_proto_keeps_the_kind(self) -> None:
        event = auth_pb2.RevocationEvent(
            cursor=9, service_id="svc-a", kind=auth_pb2.REVOCATION_KIND_SERVICE_DISABLED
        )
        event.revoked_before.seconds = NOW
        event.expires_at.seconds = NOW + 3600
        assert RevocationEntry.from_proto(event).kind == "service_disabled"


class TestDisabledKind:
    def _disabled(self, cursor: int, before: int, expires_at: int) -> RevocationEntry:
        return RevocationEntry(cursor, None, "svc-a", before, expires_at, "service_disabled")

    def test_a_disable_revokes_and_says_disabled(self) -> None:
        revocations = RevocationSet()
        revocations.add(self._disabled(1, NOW, NOW + 3600))
        assert revocations.is_revoked("any", "svc-a", NOW - 1)
        assert revocations.is_disabled("svc-a", NOW - 1)
        # Issued after the cutoff (re-enabled since): neither.
        assert not revocations.is_revoked("any", "svc-a", NOW)
        assert not revocations.is_disabled("svc-a", NOW)

    def test_a_plain_service_revocation_is_not_a_disable(self) -> None:
        revocations = RevocationSet()
        revocations.add(service_entry(1, "svc-a", NOW + 100, NOW + 3600))
        revocations.add(self._disabled(2, NOW, NOW + 3600))
        # Revoked by the later plain cutoff, disabled only before the disable's own cutoff.
        assert revocations.is_revoked("any", "svc-a", NOW + 50)
        assert not revocations.is_disabled("svc-a", NOW + 50)
        assert revocations.is_disabled("svc-a", NOW - 1)

    def test_prune_drops_the_disable_with_its_entry(self) -> None:
        revocations = RevocationSet()
        revocations.add(self._disabled(1, NOW, NOW + 10))
        assert revocations.prune(NOW + 10) == 1
        assert not revocations.is_disabled("svc-a", NOW - 1)


class TestRevocationSet:
    def test_revoked_jti(self) -> None:
        revocations = RevocationSet()
        revocations.add(jti_entry(1, "j1"))
        assert revocations.is_revoked("j1", "svc-a", NOW)
        assert not revocations.is_revoked("j2", "svc-a", NOW)

    def test_service_cutoff_is_strictly_before(self) -> None:
        revocations = RevocationSet()
        revocations.add(service_entry(1, "svc-a", NOW, NOW + 3600))
        assert revocations.is_revoked("any", "svc-a", NOW - 1)
        assert not revocations.is_revoked("any", "svc-a", NOW)
        assert not revocations.is_revoked("any", "svc-b", NOW - 1)

    def test_later_cutoff_wins_whatever_the_order(self) -> None:
        revocations = RevocationSet()
        revocations.add(service_entry(2, "svc-a", NOW + 100, NOW + 3700))
        revocations.add(service_entry(1, "svc-a", NOW, NOW + 3600))
        assert revocations.is_revoked("any", "svc-a", NOW + 50)

    def test_add_is_idempotent_and_tracks_the_highest_cursor(self) -> None:
        revocations = RevocationSet()
        assert revocations.cursor == 0
        for entry in (jti_entry(5, "j1"), jti_entry(5, "j1"), jti_entry(3, "j2")):
            revocations.add(entry)
        assert len(revocations) == 2
        assert revocations.cursor == 5

    def test_prune_drops_what_has_expired(self) -> None:
        revocations = RevocationSet()
        revocations.add(jti_entry(1, "old", expires_at=NOW))
        revocations.add(jti_entry(2, "new", expires_at=NOW + 10))
        revocations.add(service_entry(3, "svc-a", NOW - 5, expires_at=NOW))
        assert revocations.prune(NOW - 1) == 0
        assert revocations.prune(NOW) == 2
        assert not revocations.is_revoked("old", "svc-a", NOW - 10)
        assert revocations.is_revoked("new", "x", NOW)
        assert revocations.prune(NOW + 10) == 1
        assert len(revocations) == 0

    def test_jti_re_added_with_a_later_expiry_survives_the_earlier_one(self) -> None:
        revocations = RevocationSet()
        revocations.add(jti_entry(1, "j1", expires_at=NOW))
        revocations.add(jti_entry(2, "j1", expires_at=NOW + 100))
        assert revocations.prune(NOW) == 0
        assert revocations.is_revoked("j1", "x", NOW)
        assert revocations.prune(NOW + 100) == 1

    def test_concurrent_writers_and_readers(self) -> None:
        revocations = RevocationSet()
        errors: list[BaseException] = []
        stop = threading.Event()

        def write(offset: int) -> None:
            for i in range(2000):
                revocations.add(jti_entry(offset + i, f"j{offset + i}", NOW + i % 50))

        def read() -> None:
            try:
                while not stop.is_set():
                    revocations.is_revoked("j1", "svc", NOW)
                    revocations.prune(NOW - 1)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(2)]
        writers = [threading.Thread(target=write, args=(k * 10_000,)) for k in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert not errors
        assert len(revocations) == 8000
        assert revocations.cursor == 3 * 10_000 + 1999
        assert revocations.prune(NOW + 100) == 8000

    def test_a_million_revocations_fit_well_under_200_mb(self) -> None:
        # Measured on 100k and scaled: the whole per-entry cost, jti strings included.
        count = 100_000
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            revocations = RevocationSet()
            for i in range(count):
                revocations.add(jti_entry(i, secrets.token_urlsafe(18), NOW + i % 3600))
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(revocations) == count
        assert used * (1_000_000 // count) < 160 * 1024 * 1024


class TestAddAll:
    def test_add_all_is_add_one_by_one(self) -> None:
        entries = [
            jti_entry(1, "j1"),
            service_entry(2, "svc-a", NOW - 10, NOW + 3600),
            jti_entry(3, "j1", expires_at=NOW + 1800),  # the same jti, later expiry
            service_entry(4, "svc-a", NOW - 20, NOW + 60),  # an earlier cutoff changes nothing
            jti_entry(5, "j2", expires_at=NOW + 5),
        ]
        one_by_one, together = RevocationSet(), RevocationSet()
        for entry in entries:
            one_by_one.add(entry)
        together.add_all(iter(entries))
        for s in (one_by_one, together):
            assert (len(s), s.cursor) == (3, 5)
            assert s.is_revoked("j1", "other", NOW) and s.is_revoked("j2", "other", NOW)
            assert s.is_revoked("x", "svc-a", NOW - 11) and not s.is_revoked("x", "svc-a", NOW)
        assert one_by_one.prune(NOW + 900) == together.prune(NOW + 900) == 1  # j2
        assert together.is_revoked("j1", "other", NOW)  # kept until its later expiry


class TestJtiWatchers:
    def test_a_watcher_hears_each_newly_revoked_jti_once(self) -> None:
        heard: list[str] = []
        revocations = RevocationSet()
        revocations.watch_jtis(heard.append)
        revocations.add(jti_entry(1, "j1"))
        revocations.add(jti_entry(2, "j1", expires_at=NOW + 1800))  # already revoked
        revocations.add(service_entry(3, "svc-a", NOW, NOW + 3600))
        revocations.add_all([jti_entry(4, "j2"), jti_entry(5, "j3")])
        assert heard == ["j1", "j2", "j3"]
