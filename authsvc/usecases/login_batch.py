"""The login batch: logins that arrive together are settled in one database transaction.

Every login (IssueToken, and RotateServiceSecret with the current secret), whatever its kind of
credential (`authsvc.usecases.logins`), is decided on what
the database holds: the service, its live secrets, the failure counters of its id and of the
peer, the peer's record as a known peer. Its outcome is recorded in the same transaction
(failure counts, the success reset, the known peer, the audit row). Done one login per
transaction, that was four reads and two writes per token behind SQLite's single writer: about
200 tokens/s whatever the number of cores (BENCHMARKS.md). Here one thread takes every login
waiting when it is free and settles them in order inside one transaction (group commit), so
the cost of a transaction is shared by all the logins that queued behind the previous one, and
the batch grows by itself with the load. The decision is exactly the one a transaction of its
own would give: counters are read once per batch and then kept up to date as the batch's own
logins count and reset them.

Every login leaves one audit row, except those no one authenticated that an attacker can
repeat at will: throttled attempts, and failures for ids that do not exist. Those are counted
on one aggregated row per kind, throttle key and throttle window ("N attempts throttled for
key K from T1 to T2"), written in the same transaction, so a flood costs the database O(1) rows
per key and window; each attempt is still counted in metrics (`on_outcome`).

No answer leaves before its transaction commits. A granted IssueToken is therefore audited
before the server spends a signature on it (write-ahead: the audit row names the jti), and a
database fault fails the whole batch with UNAVAILABLE, counting nothing, for right and wrong
secrets alike.

A granted verdict is completed (`LoginPolicy.complete`; IssueToken: the RSA signature) by
its caller once the commit has answered it, on the caller's own thread: the event loop for an
RPC. Signing here, in the batch's thread, looked free (pyca/cryptography releases the GIL while
it signs) but was not: every token then crossed threads twice more and the thread waited for
the GIL the event loop held, up to its 5 ms switch interval, after each signature. Measured
side by side on the benchmark machine (BENCHMARKS.md), signing on the event loop costs 9%
less server CPU per token and issues 1.1x more tokens/s on one process; under IssueToken and
ValidateToken load together it issues 1.7-1.9x more tokens/s, for 12-28% fewer ValidateToken
calls/s (p99 18-21 ms against 15-16 ms) while issuing saturates the process. A process
therefore signs serially on its event loop, 0.3 ms a token: more cores are used with
`serve --workers N`, grpcio's recommended way for Python anyway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast, overload

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.config import Settings
from authsvc.errors import (
    AuthsvcError,
    PermissionDenied,
    ResourceExhausted,
    StorageUnavailable,
    Unauthenticated,
)
from authsvc.storage.records import ServiceRecord
from authsvc.storage.repository import LoginBatch, Repository
from authsvc.usecases.audit import log_audit
from authsvc.usecases.logins import (
    BAD_CREDENTIALS,
    CURRENT_ONLY,
    Login,
    LoginPolicy,
    Verdict,
)

__all__ = ["MAX_BATCH", "LoginBatcher", "Settled"]

log = logging.getLogger("authsvc.server")

# Logins settled in one transaction at most; under a longer queue the next batch follows at once.
MAX_BATCH = 256
# Known-peer rows remembered as written (per process) before the map is cleared.
_PEERS_REMEMBERED = 100_000

P = TypeVar("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Settled(Generic[T]):
    """A login that authenticated: its service as committed, and what its policy's committed
    verdict prepared, for the caller to complete (None without a policy)."""

    service: ServiceRecord
    value: T | None = None


@dataclass(frozen=True)
class _Decided:
    service: ServiceRecord
    verdict: Verdict[Any] | None


@dataclass
class _Pending:
    login: Login
    policy: LoginPolicy[Any, Any] | None
    future: concurrent.futures.Future[Settled[Any]]
    # The caller's context (request id, method, peer), for the audit log line.
    context: contextvars.Context
    audit_lines: list[dict[str, str]] = field(default_factory=list)
    # (aggregate key, log line) of the attempts counted on an aggregated audit row.
    aggregate_lines: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    outcome: str = ""


_STOP = object()


class LoginBatcher:
    """One settling thread per server process. From the event loop: `authenticate()` and
    `settle()`; from worker threads: their `_sync` twins."""

    def __init__(
        self,
        repo: Repository,
        settings: Settings,
        clock: Clock,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_batch(size, seconds)` is called from the settling thread after each batch, and
        `on_outcome(action, outcome)` once per login it committed (metrics: the per-attempt
        detail that aggregated audit rows leave out)."""
        self._repo = repo
        self._on_batch = on_batch
        self._on_outcome = on_outcome
        self._s = settings
        self._clock = clock
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        # (service id, peer) -> when this process last recorded that success in storage.
        self._peers_written: dict[tuple[str, str], float] = {}
        # Refresh a known peer's row at most this often: its memory (30 days by default) is
        # then kept to within 1%, without a write per token.
        self._peer_refresh = min(3600.0, settings.throttle_known_peer_seconds / 100)
        self._thread = threading.Thread(target=self._run, name="login-batch", daemon=True)
        self._thread.start()

    @overload
    def submit(self, login: Login) -> concurrent.futures.Future[Settled[None]]: ...

    @overload
    def submit(
        self, login: Login, policy: LoginPolicy[P, T]
    ) -> concurrent.futures.Future[Settled[P]]: ...

    def submit(
        self, login: Login, policy: LoginPolicy[Any, Any] | None = None
    ) -> concurrent.futures.Future[Settled[Any]]:
        """Queue a login; the future holds its verdict once its transaction has committed:
        the service and what the policy prepared, not yet completed (`settle` completes it)."""
        future: concurrent.futures.Future[Settled[Any]] = concurrent.futures.Future()
        self._queue.put(_Pending(login, policy, future, contextvars.copy_context()))
        return future

    async def settle(self, login: Login, policy: LoginPolicy[P, T]) -> T:
        """Authenticate `login`, let `policy` decide in the same transaction, and return what
        the policy completed once its verdict is committed.

        Raises:
            ResourceExhausted: too many failures for this id (from an unknown peer) or peer.
            Unauthenticated: wrong id or credential (one message for both), or a disabled
                service.
            PermissionDenied: a previous secret asked what only the current one may do.
            StorageUnavailable: the database could not settle it; nothing was counted.
            AuthsvcError: whatever the policy's verdict refused it with.
        """
        settled = await asyncio.wrap_future(self.submit(login, policy))
        return policy.complete(_prepared(settled))

    def settle_sync(self, login: Login, policy: LoginPolicy[P, T]) -> T:
        return policy.complete(_prepared(self.submit(login, policy).result()))

    async def authenticate(self, login: Login) -> ServiceRecord:
        """The service `login` authenticates as; a success is not audited here (the caller
        audits what it then does). Raises as `settle` does."""
        settled: Settled[None] = await asyncio.wrap_future(self.submit(login))
        return settled.service

    def authenticate_sync(self, login: Login) -> ServiceRecord:
        settled: Settled[None] = self.submit(login).result()
        return settled.service

    def close(self) -> None:
        """Settle what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    # -- the settling thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Pending)
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                assert isinstance(more, _Pending)
                batch.append(more)
            # A call cancelled while it queued (its client went away) is not settled at all:
            # nothing counted, nothing audited, as if it had never arrived.
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not batch:
                if stop:
                    return
                continue
            started = time.perf_counter()
            try:
                self._settle_batch(batch)
                if self._on_batch is not None:
                    self._on_batch(len(batch), time.perf_counter() - started)
            except Exception:  # the thread must outlive any one batch
                log.exception("login batch failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(AuthsvcError("internal error"))
            if stop:
                return

    def _settle_batch(self, batch: list[_Pending]) -> None:
        """Decide and commit the batch, then answer each of its logins."""
        now = self._clock.now()
        peers_written: list[tuple[str, str]] = []
        for pending in batch:
            pending.audit_lines.clear()
            pending.aggregate_lines.clear()
            pending.outcome = ""
        try:
            with self._repo.login_batch(to_datetime(now), self._s.throttle_window_seconds) as txn:
                outcomes = [self._settle(txn, p, now, peers_written) for p in batch]
        except StorageUnavailable:
            for pending in batch:
                pending.future.set_exception(StorageUnavailable("database unavailable"))
            return
        except Exception:
            if len(batch) > 1:
                # Whatever failed, it must fail only the login it came from.
                for pending in batch:
                    self._settle_batch([pending])
                return
            log.exception("login transaction failed")
            batch[0].future.set_exception(AuthsvcError("internal error"))
            return
        for key in peers_written:
            self._peers_written[key] = now
        logged: set[str] = set()
        for pending, outcome in zip(batch, outcomes, strict=True):
            for line in pending.audit_lines:
                pending.context.run(log_audit, **line)
            # An aggregated row gets the log line of the attempt that created it, only.
            for aggregate_key, line in pending.aggregate_lines:
                if aggregate_key in txn.created_aggregates and aggregate_key not in logged:
                    logged.add(aggregate_key)
                    pending.context.run(log_audit, **line)
            if self._on_outcome is not None:
                failed = isinstance(outcome, BaseException)
                self._on_outcome(
                    pending.login.action, pending.outcome or ("error" if failed else "ok")
                )
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                prepared = None if outcome.verdict is None else outcome.verdict.prepared
                pending.future.set_result(Settled(outcome.service, prepared))

    def _settle(
        self,
        txn: LoginBatch,
        pending: _Pending,
        now: float,
        peers_written: list[tuple[str, str]],
    ) -> _Decided | BaseException:
        login = pending.login
        # A federated token names a subject, not a service: the binding is read here, in the
        # transaction that decides the login.
        service_id = login.credential.resolve(txn)
        s = self._s
        id_key, peer_key = _throttle_keys(service_id, login.origin.peer)
        credential = f"credential={login.credential.kind}"

        def audit(outcome: str, target: str = service_id, detail: str = "") -> None:
            line = {
                "action": login.action,
                "actor": service_id,
                "target": target,
                "outcome": outcome,
                "peer": login.origin.peer,
                "request_id": login.origin.request_id,
            }
            txn.audit(**line, detail=f"{credential} {detail}" if detail else credential)
            pending.audit_lines.append(line)
            pending.outcome = outcome

        def aggregate(outcome: str, key: str) -> None:
            # Attempts no one authenticated (throttled, unknown id) share one row per throttle
            # key and window: the key's side is named, the other is "*" (any).
            by_peer = key == peer_key
            line = {
                "action": login.action,
                "actor": "*" if by_peer else service_id,
                "target": "*" if by_peer else service_id,
                "outcome": outcome,
                "peer": login.origin.peer if by_peer else "*",
                "request_id": login.origin.request_id,
            }
            window = int(now // s.throttle_window_seconds)
            aggregate_key = f"{login.action}|{outcome}|{key}|{window}"
            txn.aggregate(aggregate_key, **line, detail=credential)
            pending.aggregate_lines.append((aggregate_key, line))
            pending.outcome = outcome

        # The per-peer limit binds everyone. The per-id limit spares a peer that logged in as
        # this id recently: otherwise an attacker could lock a service out from its own address
        # just by failing logins under its name.
        id_failures, peer_failures = txn.failures(id_key, peer_key)
        if not service_id:
            # No service to count against (a federated token bound to none, an assertion
            # naming none): only the peer's count applies, or every such failure fleet-wide
            # would share one id key and throttle each other.
            id_failures = 0
        by_peer = peer_failures >= s.throttle_peer_failures
        if by_peer or (
            id_failures >= s.throttle_id_failures and not self._known(txn, service_id, login, now)
        ):
            aggregate("throttled", peer_key if by_peer else id_key)
            return ResourceExhausted(
                "too many failed attempts; retry later", retry_after=s.throttle_window_seconds
            )
        service = txn.service(service_id)
        match = login.credential.check(txn, service)
        if match.detail:
            # Which registered credential matched, or why none did: the audit row's only.
            credential = f"{credential} {match.detail}"
        if service is None or not match.ok:
            if service_id:
                txn.count_failure(id_key)
            txn.count_failure(peer_key)
            if service is None:
                # Ids that do not exist are the attacker's to choose: one row per peer.
                aggregate("unknown_service", peer_key)
            else:
                audit("bad_credentials")
            return Unauthenticated(BAD_CREDENTIALS)
        if id_failures:
            txn.reset_failures(id_key)
        self._remember_peer(txn, service_id, login, now, peers_written)
        if service.disabled:
            audit("disabled")
            return Unauthenticated("service is disabled")
        if login.current_only and not match.current:
            audit("previous_secret_denied")
            return PermissionDenied(CURRENT_ONLY)
        verdict: Verdict[Any] | None = None
        if pending.policy is not None:
            try:
                verdict = pending.policy.decide(service)
            except Exception as exc:  # a bug in the caller's policy fails its own login only
                return exc
            audit(verdict.outcome, verdict.target, verdict.detail)
            if verdict.error is not None:
                return verdict.error
        return _Decided(service, verdict)

    def _known(self, txn: LoginBatch, service_id: str, login: Login, now: float) -> bool:
        memory = self._s.throttle_known_peer_seconds
        if memory <= 0 or not service_id:
            return False
        last = txn.known_peer_since(service_id, login.origin.peer)
        return last is not None and to_timestamp(last) > now - memory

    def _remember_peer(
        self,
        txn: LoginBatch,
        service_id: str,
        login: Login,
        now: float,
        written: list[tuple[str, str]],
    ) -> None:
        if self._s.throttle_known_peer_seconds <= 0:
            return
        key = (service_id, login.origin.peer)
        last = self._peers_written.get(key)
        if last is not None and 0 <= now - last < self._peer_refresh:
            return
        if len(self._peers_written) >= _PEERS_REMEMBERED:
            self._peers_written.clear()
        txn.remember_peer(*key)
        written.append(key)


def _prepared(settled: Settled[P]) -> P:
    # A policy's granted login always carries what it prepared; None only means "no policy".
    return cast(P, settled.value)


def _throttle_keys(service_id: str, peer: str) -> tuple[str, str]:
    return f"id:{service_id}", f"peer:{peer}"
