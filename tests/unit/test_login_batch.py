"""The login batch on a real SQLite database: batching must never change a login's verdict."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest
from sqlalchemy import event

from authsvc.clock import to_datetime
from authsvc.config import Settings
from authsvc.errors import (
    AuthsvcError,
    PermissionDenied,
    ResourceExhausted,
    StorageUnavailable,
    Unauthenticated,
)
from authsvc.server.app import Core, build_core, create_service
from authsvc.storage.records import AuditRecord, ServiceRecord
from authsvc.usecases.audit import Origin
from authsvc.usecases.login_batch import LoginBatcher, Settled
from authsvc.usecases.logins import Login, SecretCredential, Verdict
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings

PEER = "ipv4:10.0.0.7"
P = TypeVar("P")
T = TypeVar("T")


@dataclass
class World:
    core: Core
    logins: LoginBatcher
    clock: FakeClock
    secret: str = field(repr=False)
    batches: list[int]
    settings: Settings

    def login(
        self,
        secret: str | None = None,
        *,
        sid: str = "orders",
        peer: str = PEER,
        request_id: str = "r",
    ) -> Login:
        credential = SecretCredential.present(
            self.core.hasher, sid, self.secret if secret is None else secret
        )
        return Login(credential, Origin(sid, peer, request_id), "issue_token")

    def failures(self, key: str) -> int:
        """The failures counted for `key`, read as a login reads them."""
        now = to_datetime(self.clock.now())
        with self.core.repo.login_batch(now, self.settings.throttle_window_seconds) as txn:
            return txn.failures(key, key)[0]

    def audit_outcomes(self) -> list[str]:
        """Outcomes of the logins audited so far, oldest first."""
        events = reversed(self.core.repo.list_audit_events(limit=1000))
        return [e.outcome for e in events if e.action == "issue_token"]


@dataclass(frozen=True)
class FunctionPolicy(Generic[P, T]):
    """A LoginPolicy from two functions."""

    decide_fn: Callable[[ServiceRecord], Verdict[P]]
    complete_fn: Callable[[P], T]

    def decide(self, service: ServiceRecord) -> Verdict[P]:
        return self.decide_fn(service)

    def complete(self, prepared: P) -> T:
        return self.complete_fn(prepared)


def _policy(verdict: Verdict[str], complete: Any = None) -> FunctionPolicy[str, str]:
    """A policy deciding `verdict` whatever the service; completing with `complete()`."""
    return FunctionPolicy(
        lambda service: verdict, (lambda prepared: complete()) if complete else str
    )


_OK = Verdict.grant("prepared", "billing")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = in_process_settings(
        tmp_path,
        AUTHSVC_THROTTLE_ID_FAILURES="2",
        AUTHSVC_THROTTLE_PEER_FAILURES="50",
        AUTHSVC_THROTTLE_KNOWN_PEER_SECONDS="1000",
    )
    clock = FakeClock()
    core = build_core(settings, clock)
    secret = create_service(core, "orders", ["billing"], ["billing.read"])
    batches: list[int] = []
    logins = LoginBatcher(
        core.repo, settings, clock, on_batch=lambda size, seconds: batches.append(size)
    )
    try:
        yield World(core, logins, clock, secret, batches, settings)
    finally:
        logins.close()
        core.dispose()


def _hold_the_batch(world: World) -> tuple[threading.Event, Future[Settled[str]]]:
    """Occupy the login batch's thread inside a batch until the event is set, so that what is
    submitted meanwhile queues up and is settled as one batch."""
    entered, release = threading.Event(), threading.Event()

    def decide(service: ServiceRecord) -> Verdict[str]:
        entered.set()
        release.wait(10)
        return _OK

    blocker = world.logins.submit(
        world.login(request_id="hold"), FunctionPolicy(decide, str)
    )
    assert entered.wait(10)
    return release, blocker


def _outcome(future: Future[Any]) -> str:
    try:
        future.result(timeout=10)
    except AuthsvcError as exc:
        return type(exc).__name__
    return "ok"


def _batch_sizes(world: World, count: int) -> list[int]:
    """The sizes of the login batches once `count` have been reported. A batch is reported
    after its refusals are answered, so a test holding every answer may be ahead of it."""
    deadline = time.monotonic() + 30
    while len(world.batches) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(world.batches)


class TestBatchesDecideAsSingleTransactions:
    def test_every_failure_in_a_batch_is_counted(self, world: World) -> None:
        release, blocker = _hold_the_batch(world)
        wrong = [world.logins.submit(world.login("asvcs_wrong")) for _ in range(4)]
        release.set()
        assert _outcome(blocker) == "ok"
        # Over the id limit (2), but the blocker's success made PEER a known peer: spared.
        assert [_outcome(f) for f in wrong] == ["Unauthenticated"] * 4
        assert _batch_sizes(world, 2) == [1, 4]
        assert world.failures("id:orders") == 4

    def test_an_unknown_peer_is_throttled_by_the_id_count_within_the_batch(
        self, world: World
    ) -> None:
        release, blocker = _hold_the_batch(world)
        stranger = "ipv4:203.0.113.9"
        futures = [world.logins.submit(world.login("asvcs_wrong", peer=stranger)) for _ in range(3)]
        futures.append(world.logins.submit(world.login(peer=stranger)))  # the right secret
        release.set()
        _outcome(blocker)
        assert [_outcome(f) for f in futures] == [
            "Unauthenticated",
            "Unauthenticated",
            "ResourceExhausted",
            "ResourceExhausted",
        ]
        assert _batch_sizes(world, 2) == [1, 4]
        # Throttled attempts are not counted.
        assert world.failures("id:orders") == 2
        assert world.failures(f"peer:{stranger}") == 2

    def test_a_success_in_a_batch_resets_the_id_count_for_the_logins_after_it(
        self, world: World
    ) -> None:
        release, blocker = _hold_the_batch(world)
        stranger = "ipv4:203.0.113.10"
        futures = [
            world.logins.submit(world.login("asvcs_wrong", peer=stranger)),
            world.logins.submit(world.login(peer=PEER)),  # reset by the known peer
            world.logins.submit(world.login("asvcs_wrong", peer=stranger)),
            world.logins.submit(world.login("asvcs_wrong", peer=stranger)),
        ]
        release.set()
        _outcome(blocker)
        assert [_outcome(f) for f in futures] == [
            "Unauthenticated",
            "ok",
            "Unauthenticated",
            "Unauthenticated",
        ]
        assert world.failures("id:orders") == 2


class TestOutcomes:
    def test_unknown_id_and_wrong_secret_are_one_answer(self, world: World) -> None:
        for login in (world.login("asvcs_wrong"), world.login(sid="nobody")):
            with pytest.raises(Unauthenticated) as caught:
                world.logins.authenticate_sync(login)
            assert str(caught.value) == "invalid service credentials"
        # The unknown id is audited on its peer's aggregated row.
        assert world.audit_outcomes() == ["bad_credentials", "unknown_service"]

    def test_a_grant_is_committed_before_its_work_runs(self, world: World) -> None:
        seen: list[list[str]] = []

        def sign() -> str:
            seen.append(world.audit_outcomes())  # another connection: only committed rows
            return "signed"

        value = world.logins.settle_sync(
            world.login(), _policy(Verdict.grant("unsigned", "billing", "jti=abc"), sign)
        )
        assert value == "signed"
        assert seen == [["ok"]]
        (row,) = _login_rows(world)
        assert row.detail == "credential=secret jti=abc"

    def test_a_refusal_by_policy_is_audited_and_raised(self, world: World) -> None:
        denied: Verdict[str] = Verdict.deny(
            "audience_denied", "ledger", PermissionDenied("audience not allowed")
        )
        with pytest.raises(PermissionDenied):
            world.logins.settle_sync(world.login(), _policy(denied))
        assert world.audit_outcomes() == ["audience_denied"]

    def test_a_policy_that_raises_fails_only_its_own_login(self, world: World) -> None:
        def broken(service: ServiceRecord) -> Verdict[str]:
            raise ValueError("bug in a policy")

        release, blocker = _hold_the_batch(world)
        bad = world.logins.submit(world.login(request_id="b"), FunctionPolicy(broken, str))
        good = world.logins.submit(world.login(), _policy(_OK, lambda: "signed"))
        release.set()
        _outcome(blocker)
        with pytest.raises(ValueError):
            bad.result(10)
        # The batch answers with what the policy prepared; the caller completes it.
        assert good.result(10).value == "prepared"

    def test_a_grant_is_completed_on_the_callers_thread_and_a_failure_reaches_it_alone(
        self, world: World
    ) -> None:
        threads: list[str] = []

        def sign() -> str:
            threads.append(threading.current_thread().name)
            raise RuntimeError("the signature did not verify")

        with pytest.raises(RuntimeError, match="did not verify"):
            world.logins.settle_sync(world.login(), _policy(_OK, sign))
        assert threads == [threading.current_thread().name]
        # The grant was audited before its work ran; the next login is not affected.
        assert world.audit_outcomes() == ["ok"]
        assert world.logins.settle_sync(world.login(), _policy(_OK, lambda: "signed")) == "signed"

    def test_settle_completes_on_the_event_loop(self, world: World) -> None:
        threads: list[str] = []

        def sign() -> str:
            threads.append(threading.current_thread().name)
            return "signed"

        async def call() -> str:
            return await world.logins.settle(world.login(), _policy(_OK, sign))

        assert asyncio.run(call()) == "signed"
        assert threads == [threading.current_thread().name]

    def test_a_disabled_service_is_refused_after_its_secret_checks(self, world: World) -> None:
        world.core.repo.update_service_disabled("orders", True, to_datetime(world.clock.now()))
        with pytest.raises(Unauthenticated, match="disabled"):
            world.logins.authenticate_sync(world.login())
        assert world.audit_outcomes() == ["disabled"]

    def test_a_previous_secret_logs_in_but_is_refused_what_needs_the_current_one(
        self, world: World
    ) -> None:
        now = world.clock.now()
        new = "asvcs_" + "N" * 43
        world.core.repo.update_service_secret(
            "orders", world.core.hasher.hash(new), to_datetime(now), to_datetime(now + 300)
        )
        old = world.login()  # the original secret, now in its grace period
        assert world.logins.authenticate_sync(old).service_id == "orders"
        with pytest.raises(PermissionDenied, match="previous secret"):
            world.logins.authenticate_sync(replace(old, current_only=True))
        assert world.logins.authenticate_sync(replace(world.login(new), current_only=True))
        assert world.audit_outcomes() == ["previous_secret_denied"]
        assert world.failures("id:orders") == 0

    def test_a_call_cancelled_while_queued_is_never_settled(self, world: World) -> None:
        release, blocker = _hold_the_batch(world)
        cancelled = world.logins.submit(world.login("asvcs_wrong"))
        assert cancelled.cancel()
        release.set()
        _outcome(blocker)
        world.logins.authenticate_sync(world.login())  # the queue has been worked through
        assert world.failures("id:orders") == 0
        assert world.audit_outcomes() == ["ok"]  # the blocker's grant, nothing else

    def test_an_event_loop_caller_cancelled_while_queued_is_never_settled(
        self, world: World
    ) -> None:
        release, blocker = _hold_the_batch(world)

        async def cancelled_call() -> None:
            task = asyncio.create_task(world.logins.authenticate(world.login("asvcs_wrong")))
            await asyncio.sleep(0.05)  # queued behind the blocker
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            # The next login from the loop is answered: the batch went on past the cancelled one.
            service = await world.logins.authenticate(world.login())
            assert service.service_id == "orders"

        asyncio.run(cancelled_call())
        _outcome(blocker)
        assert world.failures("id:orders") == 0
        assert world.audit_outcomes() == ["ok"]  # the blocker's grant, nothing else

    def test_event_loop_callers_of_one_batch_get_their_own_answers(self, world: World) -> None:
        release, blocker = _hold_the_batch(world)

        async def batch() -> list[str]:
            calls = [
                asyncio.create_task(world.logins.authenticate(world.login(secret)))
                for secret in (None, "asvcs_wrong", None)
            ]
            # One turn of the loop runs each task up to its first await, and `settle` submits
            # before that: all three are queued behind the blocker, whatever the machine's load.
            await asyncio.sleep(0)
            release.set()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return [type(o).__name__ for o in outcomes]

        assert asyncio.run(batch()) == ["ServiceRecord", "Unauthenticated", "ServiceRecord"]
        _outcome(blocker)
        assert _batch_sizes(world, 2) == [1, 3]


class TestDatabaseFaults:
    def test_a_batch_the_database_cannot_take_fails_every_login_and_counts_nothing(
        self, world: World
    ) -> None:
        path = world.settings.database_url.removeprefix("sqlite:///")
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")  # every writer now waits, then gives up
            futures = [
                world.logins.submit(world.login()),
                world.logins.submit(world.login("asvcs_wrong")),
                world.logins.submit(world.login(sid="nobody")),
            ]
            for future in futures:
                with pytest.raises(StorageUnavailable):
                    future.result(timeout=30)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert world.failures("id:orders") == 0 and world.failures(f"peer:{PEER}") == 0
        assert world.audit_outcomes() == []
        world.logins.authenticate_sync(world.login())  # and it recovers by itself


class TestKnownPeers:
    def test_a_known_peer_is_rewritten_at_most_once_per_hundredth_of_its_memory(
        self, world: World
    ) -> None:
        def last_success() -> float | None:
            with world.core.repo.login_batch(to_datetime(world.clock.now()), 60) as batch:
                at = batch.known_peer_since("orders", PEER)
            return None if at is None else at.timestamp()

        start = world.clock.now()
        world.logins.authenticate_sync(world.login())
        assert last_success() == start
        world.clock.advance(9)  # memory 1000 s: refreshed every 10 s at most
        world.logins.authenticate_sync(world.login())
        assert last_success() == start
        world.clock.advance(2)
        world.logins.authenticate_sync(world.login())
        assert last_success() == start + 11

    def test_a_known_peer_is_spared_the_id_limit(self, world: World) -> None:
        world.logins.authenticate_sync(world.login())  # PEER is now known
        stranger = "ipv4:198.51.100.1"
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                world.logins.authenticate_sync(world.login("asvcs_wrong", peer=stranger))
        with pytest.raises(ResourceExhausted):
            world.logins.authenticate_sync(world.login(peer=stranger))
        assert world.logins.authenticate_sync(world.login(peer=PEER)).service_id == "orders"


def _login_rows(world: World) -> list[AuditRecord]:
    return [e for e in world.core.repo.list_audit_events() if e.action == "issue_token"]


class TestAggregatedAudit:
    """Throttled and unknown-id attempts: one row per key and window, every attempt counted."""

    def test_throttled_attempts_add_to_one_row_per_key_in_a_batch_and_across_batches(
        self, world: World
    ) -> None:
        counted: list[tuple[str, str]] = []
        logins = LoginBatcher(
            world.core.repo,
            world.settings,
            world.clock,
            on_outcome=lambda action, outcome: counted.append((action, outcome)),
        )
        try:
            stranger = "ipv4:203.0.113.20"
            for _ in range(2):  # the id limit (2)
                with pytest.raises(Unauthenticated):
                    logins.authenticate_sync(world.login("asvcs_wrong", peer=stranger))
            futures = [
                logins.submit(world.login(peer=stranger, request_id=f"t{i}")) for i in range(30)
            ]
            assert {_outcome(f) for f in futures} == {"ResourceExhausted"}
            for i in range(5):
                with pytest.raises(ResourceExhausted):
                    logins.authenticate_sync(world.login(peer=stranger, request_id=f"late{i}"))
        finally:
            logins.close()
        rows = [e for e in _login_rows(world) if e.outcome == "throttled"]
        assert len(rows) == 1
        (row,) = rows
        assert (row.actor, row.target, row.peer, row.count) == ("orders", "orders", "*", 35)
        assert row.request_id == "t0" and row.first_at is not None and row.first_at <= row.at
        assert counted.count(("issue_token", "throttled")) == 35
        assert counted.count(("issue_token", "bad_credentials")) == 2

    def test_unknown_ids_from_one_peer_share_one_row_whatever_the_ids(self, world: World) -> None:
        for i in range(40):
            with pytest.raises(Unauthenticated, match="invalid service credentials"):
                world.logins.authenticate_sync(world.login(sid=f"ghost-{i}", request_id=f"g{i}"))
        (row,) = _login_rows(world)
        assert (row.outcome, row.actor, row.peer, row.count) == ("unknown_service", "*", PEER, 40)
        assert row.request_id == "g0"
        # Still counted as failures, as for a known id: the same cost and the same answer.
        assert world.failures(f"peer:{PEER}") == 40

    def test_a_peer_over_its_limit_is_one_row_for_every_id_it_tries(self, world: World) -> None:
        stranger = "ipv4:203.0.113.21"
        for i in range(50):  # the peer limit (50), spent on unknown ids
            with pytest.raises(Unauthenticated):
                world.logins.authenticate_sync(world.login(sid=f"guess-{i}", peer=stranger))
        for i in range(20):
            with pytest.raises(ResourceExhausted):
                world.logins.authenticate_sync(world.login(sid=f"more-{i}", peer=stranger))
        rows = {e.outcome: e for e in _login_rows(world)}
        assert set(rows) == {"unknown_service", "throttled"}
        throttled = rows["throttled"]
        assert (throttled.actor, throttled.peer, throttled.count) == ("*", stranger, 20)

    def test_a_new_window_starts_a_new_row(self, world: World) -> None:
        for i in range(3):
            with pytest.raises(Unauthenticated):
                world.logins.authenticate_sync(world.login(sid=f"ghost-{i}"))
        world.clock.advance(world.settings.throttle_window_seconds)
        with pytest.raises(Unauthenticated):
            world.logins.authenticate_sync(world.login(sid="ghost-3"))
        assert [e.count for e in _login_rows(world)] == [1, 3]

    def test_an_unknown_id_costs_the_database_what_a_wrong_secret_does(self, world: World) -> None:
        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement.split()[0].upper())

        engine = world.core.repo.engine
        costs = []
        event.listen(engine, "before_cursor_execute", count)
        try:
            logins = (world.login("asvcs_wrong", request_id="c0"), world.login(sid="ghost"))
            for login in logins:
                statements.clear()
                with pytest.raises(Unauthenticated) as caught:
                    world.logins.authenticate_sync(login)
                assert str(caught.value) == "invalid service credentials"
                costs.append(sorted(statements))
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert costs[0] == costs[1]

    def test_successes_and_known_id_failures_keep_one_row_each(self, world: World) -> None:
        for _ in range(3):
            world.logins.settle_sync(world.login(), _policy(_OK))
        with pytest.raises(Unauthenticated):
            world.logins.authenticate_sync(world.login("asvcs_wrong"))
        rows = _login_rows(world)
        assert [(e.outcome, e.count, e.first_at) for e in rows] == [
            ("bad_credentials", 1, None),
            ("ok", 1, None),
            ("ok", 1, None),
            ("ok", 1, None),
        ]
