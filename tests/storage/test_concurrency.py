"""Races settled by storage: threads and separate processes on one database, both dialects."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.records import AudienceGrant
from authsvc.storage.repository import Repository
from tests.storage.helpers import T0, at, key_record, live_secrets

_TIMEOUT_S = 60


def _run_threads(count: int, body: Callable[[int], Any]) -> list[Any]:
    """Run body(i) on `count` threads released together; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=_TIMEOUT_S)
            results[i] = body(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=_TIMEOUT_S)
    if errors:
        raise errors[0]
    return results


def _rotate_in_process(url: str, kid: str, barrier: Any, results: Any) -> None:
    """Child process: its own engine, then one rotation expecting k0 to be active."""
    engine = make_engine(url)
    try:
        repo = Repository(engine)
        repo.ping()  # connect before the barrier so the processes really collide
        barrier.wait(timeout=_TIMEOUT_S)
        won = repo.create_signing_key(
            key_record(kid, at(1)), at(1), expected_active_kid="k0", publish_until=at(100)
        )
        results.put((kid, won))
    except BaseException as exc:
        results.put((kid, f"error: {type(exc).__name__}"))
    finally:
        engine.dispose()


def _upgrade_in_process(url: str, barrier: Any, results: Any) -> None:
    engine = make_engine(url)
    try:
        barrier.wait(timeout=_TIMEOUT_S)
        migrate.upgrade(engine)
        results.put("ok")
    except BaseException as exc:
        results.put(f"error: {type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def _run_processes(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, results)) for a in args]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=_TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=_TIMEOUT_S)
            if p.is_alive():  # pragma: no cover - only on a hang
                p.kill()
                p.join()
        results.close()
        results.join_thread()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return out


def _start_with_k0(repo: Repository) -> None:
    assert repo.create_signing_key(key_record("k0"), T0, expected_active_kid=None, publish_until=T0)


def _assert_one_winner(repo: Repository, outcomes: dict[str, object]) -> None:
    assert sorted(map(str, outcomes.values())) == ["False"] * (len(outcomes) - 1) + ["True"]
    winner = next(kid for kid, won in outcomes.items() if won is True)
    keys = repo.list_signing_keys()
    assert [k.kid for k in keys if k.state == "active"] == [winner]
    # Losers inserted nothing; k0 was retired exactly once.
    assert sorted(k.kid for k in keys) == sorted(["k0", winner])
    assert [(k.kid, k.state) for k in keys if k.kid == "k0"] == [("k0", "retired")]
    assert [c.ref for c in repo.list_changes(0)] == ["k0", winner]


class TestRotationRace:
    @pytest.mark.parametrize("shared_engine", [True, False], ids=["one-engine", "engine-each"])
    def test_threads_rotating_at_once_leave_exactly_one_active_key(
        self, repo: Repository, migrated_url: str, shared_engine: bool
    ) -> None:
        _start_with_k0(repo)
        contenders = 4
        engines = [
            repo.engine if shared_engine else make_engine(migrated_url) for _ in range(contenders)
        ]
        try:
            won = _run_threads(
                contenders,
                lambda i: Repository(engines[i]).create_signing_key(
                    key_record(f"t{i}", at(1)),
                    at(1),
                    expected_active_kid="k0",
                    publish_until=at(100),
                ),
            )
        finally:
            if not shared_engine:
                for e in engines:
                    e.dispose()
        _assert_one_winner(repo, {f"t{i}": w for i, w in enumerate(won)})

    def test_processes_rotating_at_once_leave_exactly_one_active_key(
        self, repo: Repository, migrated_url: str
    ) -> None:
        _start_with_k0(repo)
        results = _run_processes(_rotate_in_process, [(migrated_url, "p1"), (migrated_url, "p2")])
        _assert_one_winner(repo, dict(results))


def _connect_in_process(urls: list[str], barrier: Any, results: Any) -> None:
    """Child process: for each new database, wait for the others, then open it."""
    outcome = "ok"
    for url in urls:
        engine = make_engine(url)
        try:
            barrier.wait(timeout=_TIMEOUT_S)
            with engine.connect() as conn:  # a new connection switches a new database to WAL
                conn.exec_driver_sql("SELECT 1")
        except BaseException as exc:
            outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            engine.dispose()
    results.put(outcome)


class TestConcurrentFirstConnections:
    def test_processes_opening_a_new_sqlite_database_at_once_all_connect(
        self, tmp_path: Path
    ) -> None:
        """Their WAL switches race: before the retry, about one database in five had a loser."""
        urls = [f"sqlite:///{tmp_path / f'new{i}.db'}" for i in range(20)]
        results = _run_processes(_connect_in_process, [(urls,), (urls,), (urls,)])
        assert results == ["ok", "ok", "ok"]


class TestConcurrentMigrations:
    def test_processes_upgrading_at_once_all_succeed(self, database_url: str) -> None:
        results = _run_processes(_upgrade_in_process, [(database_url,), (database_url,)])
        assert results == ["ok", "ok"]
        engine = make_engine(database_url)
        try:
            assert migrate.is_current(engine)
        finally:
            engine.dispose()


class TestSqliteMigrationLock:
    def test_an_upgrade_waits_for_the_file_lock_another_process_holds(
        self, tmp_path: Path
    ) -> None:
        """SQLite migrations are not transactional DDL: without the lock two processes both
        applied one revision ("duplicate column name"). A holder of the lock file must make an
        upgrade wait, and the upgrade must finish once it is released."""
        import fcntl
        import os

        url = f"sqlite:///{tmp_path / 'locked.db'}"
        engine = make_engine(url)
        fd = os.open(tmp_path / "locked.db.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        errors: list[BaseException] = []

        def upgrade() -> None:
            try:
                migrate.upgrade(engine)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        worker = threading.Thread(target=upgrade)
        try:
            worker.start()
            worker.join(timeout=1.5)
            assert worker.is_alive(), "the upgrade ran while another holder had the lock"
            assert migrate.current_revision(engine) is None
        finally:
            os.close(fd)
        worker.join(timeout=_TIMEOUT_S)
        try:
            assert not worker.is_alive() and errors == []
            assert migrate.is_current(engine)
            assert (os.stat(tmp_path / "locked.db.migrate-lock").st_mode & 0o777) == 0o600
        finally:
            engine.dispose()


class TestConcurrentWrites:
    def test_failure_counts_lose_no_increment(self, repo: Repository) -> None:
        threads, each = 4, 10

        def count(i: int) -> None:
            for _ in range(each):
                with repo.login_batch(at(1), 60) as batch:
                    batch.failures("id:svc", f"peer:{i}")
                    batch.count_failure("id:svc")

        _run_threads(threads, count)
        with repo.login_batch(at(1), 60) as batch:
            assert batch.failures("id:svc", "peer:x")[0] == threads * each

    def test_duplicate_creates_one_wins_the_rest_already_exist(self, repo: Repository) -> None:
        def create(i: int) -> str:
            try:
                repo.create_service("svc", [AudienceGrant(f"aud{i}", ())], b"h", T0)
            except Exception as exc:
                return type(exc).__name__
            return "created"

        outcomes = _run_threads(4, create)
        assert sorted(outcomes) == ["AlreadyExists"] * 3 + ["created"]
        assert len(live_secrets(repo, "svc", T0)) == 1

    def test_rotations_expecting_one_current_secret_at_once_let_exactly_one_win(
        self, repo: Repository
    ) -> None:
        repo.create_service("svc", [AudienceGrant("a", ())], b"1" * 32, T0)

        def rotate(i: int) -> str:
            try:
                repo.update_service_secret(
                    "svc", bytes([65 + i]) * 32, at(1), at(100), expected_current_hash=b"1" * 32
                )
            except Exception as exc:
                return type(exc).__name__
            return "rotated"

        outcomes = _run_threads(4, rotate)
        assert sorted(outcomes) == ["FailedPrecondition"] * 3 + ["rotated"]
        winner = bytes([65 + outcomes.index("rotated")]) * 32
        live = live_secrets(repo, "svc", at(2))
        assert live == [("current", winner), ("previous", b"1" * 32)]

    def test_rotations_at_once_each_succeed_in_turn(self, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("a", ())], b"1" * 32, T0)
        _run_threads(
            4, lambda i: repo.update_service_secret("svc", bytes([65 + i]) * 32, at(1), at(100))
        )
        live = live_secrets(repo, "svc", at(2))
        assert [slot for slot, _ in live] == ["current", "previous"]
        assert len({h for _, h in live}) == 2

    def test_a_follower_reading_by_cursor_misses_no_revocation(self, repo: Repository) -> None:
        """Rows must commit in cursor order, or a follower skips a late-committing smaller id."""
        writers, each = 4, 25
        seen: list[str] = []
        done = threading.Event()

        def follow() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                for record in repo.list_revocations(cursor, T0):
                    seen.append(record.jti or "")
                    cursor = record.cursor
                if finished:
                    return
                time.sleep(0.001)

        follower = threading.Thread(target=follow)
        follower.start()
        try:
            _run_threads(
                writers,
                lambda w: [
                    repo.create_revocation(
                        jti=f"w{w}-{n}",
                        service_id=None,
                        revoked_before=None,
                        expires_at=at(900),
                        reason="",
                        now=T0,
                    )
                    for n in range(each)
                ],
            )
        finally:
            done.set()
            follower.join(timeout=_TIMEOUT_S)
        assert len(seen) == len(set(seen)) == writers * each


def _activate_next_in_process(url: str, tag: str, barrier: Any, results: Any) -> None:
    """Child process: its own engine, then one activation of the `next` key n1 expecting k0."""
    engine = make_engine(url)
    try:
        repo = Repository(engine)
        repo.ping()
        barrier.wait(timeout=_TIMEOUT_S)
        outcome = repo.activate_next_signing_key(
            "n1", at(2), expected_active_kid="k0", publish_until=at(100)
        )
        results.put((tag, outcome))
    except BaseException as exc:
        results.put((tag, f"error: {type(exc).__name__}"))
    finally:
        engine.dispose()


class TestNextKeyRace:
    """Replicas preparing and activating the published `next` key at once (issue #12 item 8)."""

    def test_threads_preparing_a_next_key_at_once_keep_exactly_one(
        self, repo: Repository, migrated_url: str
    ) -> None:
        _start_with_k0(repo)
        contenders = 4
        engines = [make_engine(migrated_url) for _ in range(contenders)]
        try:
            stored = _run_threads(
                contenders,
                lambda i: Repository(engines[i]).create_next_signing_key(
                    key_record(f"n{i}"), at(1)
                ),
            )
        finally:
            for e in engines:
                e.dispose()
        assert sorted(stored) == [False] * (contenders - 1) + [True]
        nexts = [k for k in repo.list_signing_keys() if k.state == "next"]
        assert [k.kid for k in nexts] == [f"n{stored.index(True)}"]
        # Published from the moment it was stored: that is what the lead is counted from.
        assert nexts[0].created_at == at(1) and nexts[0].activated_at is None

    def test_processes_activating_the_next_key_at_once_leave_one_active_key(
        self, repo: Repository, migrated_url: str
    ) -> None:
        _start_with_k0(repo)
        assert repo.create_next_signing_key(key_record("n1"), at(1))
        results = dict(
            _run_processes(_activate_next_in_process, [(migrated_url, "p1"), (migrated_url, "p2")])
        )
        assert sorted(results.values()) == ["activated", "already_rotated"]
        keys = {k.kid: k for k in repo.list_signing_keys()}
        assert {kid: k.state for kid, k in keys.items()} == {"k0": "retired", "n1": "active"}
        assert keys["n1"].activated_at == at(2) and keys["n1"].created_at == at(1)
        # The private part stays with the key it wraps; the retired key's is dropped.
        assert keys["n1"].private_key_enc == b"wrapped-private-n1"
        assert keys["k0"].private_key_enc is None
        assert [c.ref for c in repo.list_changes(0)] == ["k0", "n1", "n1"]
