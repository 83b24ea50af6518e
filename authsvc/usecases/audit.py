"""The audit trail: one log line and one row per event, for every path that changes state.

The RPCs, the CLI and the scheduler all write through `AuditTrail`, so an event has the same
fields whoever caused it. Two ways:

- a change the repository writes takes its row along (`AuditTrail.event`, passed as the write
  method's `audit` argument), in the change's own transaction: the change and its row persist
  together or not at all, so a failed audit write never leaves a change (a rotated secret, a
  registered service) whose caller was told it failed. Its log line (`AuditTrail.log`) follows
  the commit, as the login batch's do: a line for a change that did not persist would lie;
- anything else (a refusal, a change written elsewhere) goes through `AuditTrail.record`,
  whose log line comes first so the event still leaves a trace when the database is down.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from authsvc.clock import Clock, to_datetime
from authsvc.errors import InvalidArgument
from authsvc.storage.records import AuditRecord
from authsvc.storage.repository import AuditEvent, Repository

log = logging.getLogger("authsvc.server")

# Actor and peer of audit events made on this host without a gRPC call (CLI, scheduler).
CLI_ACTOR = "cli"
SCHEDULER_ACTOR = "scheduler"
LOCAL_PEER = "local"


@dataclass(frozen=True)
class Origin:
    """Who asks for a change and from where: an RPC's caller, or this host (CLI, scheduler).

    `actor` is the authenticated subject (a service id, or `cli`/`scheduler`); `peer` is the
    caller's address without its port; `request_id` ties the audit row to the call's log lines.
    """

    actor: str
    peer: str
    request_id: str

    @classmethod
    def local(cls, actor: str) -> Origin:
        """A change made on this host without a gRPC peer: a fresh request id per event."""
        return cls(actor=actor, peer=LOCAL_PEER, request_id=uuid.uuid4().hex)

    def as_actor(self, actor: str) -> Origin:
        """The same call, attributed to another actor (a login that authenticated a service)."""
        return Origin(actor=actor, peer=self.peer, request_id=self.request_id)


def log_audit(
    *, action: str, actor: str, target: str, outcome: str, peer: str, request_id: str
) -> None:
    """The log line of an audit event: every audit row has one (RPCs, CLI, scheduler).

    The event text is constant and each field its own member (`AUDIT_FIELDS`): an id is data
    and never becomes part of the text a reader splits into key=value pairs.
    """
    fields = {
        "action": action,
        "actor": actor,
        "target": target,
        "outcome": outcome,
        "peer": peer,
        "request_id": request_id,
    }
    log.info("audit", extra=fields)


class AuditTrail:
    """Writes audit events (the only writer of audit rows outside the login batch) and reads
    the newest back (`authsvc audit list`)."""

    def __init__(self, repo: Repository, clock: Clock) -> None:
        self._repo = repo
        self._clock = clock

    def event(
        self,
        origin: Origin,
        *,
        action: str,
        target: str,
        outcome: str = "ok",
        detail: str = "",
    ) -> AuditEvent:
        """The row of an event the repository writes with the change it records (the write
        method's `audit` argument); `log` it once that transaction has committed."""
        return AuditEvent(
            at=to_datetime(self._clock.now()),
            actor=origin.actor,
            action=action,
            target=target,
            outcome=outcome,
            peer=origin.peer,
            request_id=origin.request_id,
            detail=detail,
        )

    def log(self, event: AuditEvent) -> None:
        """The log line of an `event` whose row has committed."""
        log_audit(
            action=event.action,
            actor=event.actor,
            target=event.target,
            outcome=event.outcome,
            peer=event.peer,
            request_id=event.request_id,
        )

    def counted(self, build: Callable[[int], AuditEvent]) -> CountedEvent:
        """The row of a change whose detail only its own transaction knows (how many keys it
        re-wrapped, how many bindings it removed): pass the result as the write method's
        `audit`, which calls it there with that count; `log()` it once that has committed."""
        return CountedEvent(self, build)

    def record(
        self,
        origin: Origin,
        *,
        action: str,
        target: str,
        outcome: str = "ok",
        detail: str = "",
    ) -> None:
        """An event on its own row and transaction, its log line first."""
        event = self.event(origin, action=action, target=target, outcome=outcome, detail=detail)
        self.log(event)
        self._repo.create_audit_event(**asdict(event))

    def recent(self, limit: int) -> list[AuditRecord]:
        """The newest `limit` events, newest first, aggregated login rows included.

        Raises:
            InvalidArgument: `limit` below 1 (a zero limit would look like an empty trail).
        """
        if limit < 1:
            raise InvalidArgument("--limit must be at least 1")
        return self._repo.list_audit_events(limit=limit)


class CountedEvent:
    """See AuditTrail.counted: builds its row when the transaction calls it, keeps it to log."""

    def __init__(self, trail: AuditTrail, build: Callable[[int], AuditEvent]) -> None:
        self._trail = trail
        self._build = build
        self._event: AuditEvent | None = None

    def __call__(self, count: int) -> AuditEvent:
        self._event = self._build(count)
        return self._event

    def log(self) -> None:
        """The log line of the row the committed transaction wrote."""
        if self._event is None:
            raise RuntimeError("the write never built its audit row")
        self._trail.log(self._event)
