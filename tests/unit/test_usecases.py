"""Each use case without a gRPC server: a real SQLite repository, real RSA keys, a fake clock.

What an RPC does is the servicer's translation of one of these calls; these tests pin the rules
themselves (tests/integration covers the same rules over gRPC).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from authsvc.clock import to_datetime
from authsvc.crypto.kek import KeyEncryptionKey
from authsvc.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from authsvc.server.app import Core, build_core, create_service
from authsvc.storage.records import AudienceGrant, AuditRecord, ServiceRecord
from authsvc.sync import RevocationFeed, ServerState
from authsvc.tokens.issuer import IssuedToken, TokenIssuer
from authsvc.usecases.audit import CLI_ACTOR, AuditTrail, Origin
from authsvc.usecases.callers import Callers
from authsvc.usecases.housekeeping import Housekeeping, Pruned
from authsvc.usecases.kek import rotate_kek_audited
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.revocation import Revocations, RevokeTarget, service_cutoff
from authsvc.usecases.secrets import Secrets
from authsvc.usecases.tokens import TokenRequest, Tokens, scopes_for
from authsvc.usecases.watch import RevocationWatch
from authsvc_client.claims import ADMIN_SCOPE
from authsvc_client.unverified import unverified_audience, unverified_payload
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import TokenVerifier
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings

PEER = "ipv4:10.1.2.3"


def _origin(actor: str = "", request_id: str = "req") -> Origin:
    return Origin(actor=actor, peer=PEER, request_id=request_id)


@dataclass
class World:
    core: Core
    clock: FakeClock
    state: ServerState
    logins: LoginBatcher
    tokens: Tokens
    revocations: Revocations
    secrets: Secrets
    callers: Callers
    orders: str = field(repr=False)
    admin: str = field(repr=False)

    def issue(
        self, service: str = "orders", audience: str = "billing", scopes: tuple[str, ...] = ()
    ) -> IssuedToken:
        secret = self.orders if service == "orders" else self.admin
        request = TokenRequest(service, secret, audience, scopes)
        return asyncio.run(self.tokens.issue(request, _origin(service)))

    def audit(self, action: str) -> list[AuditRecord]:
        """Audit rows of `action`, oldest first."""
        rows = reversed(self.core.repo.list_audit_events(limit=1000))
        return [e for e in rows if e.action == action]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = in_process_settings(tmp_path)
    clock = FakeClock()
    core = build_core(settings, clock)
    core.manager.ensure_active()
    orders = create_service(core, "orders", ["billing", "inventory"], ["billing.read", "x.y"])
    admin = create_service(core, "root", [], [], admin=True)
    state = ServerState(
        core.repo,
        core.manager,
        clock,
        revocations_kept_seconds=settings.max_ttl_seconds + settings.leeway_seconds,
    )
    state.load()
    verifier = TokenVerifier(
        keys=lambda: state.keyring,
        revocations=state.revocations,
        issuer=settings.issuer,
        leeway_seconds=settings.leeway_seconds,
        is_subject_enabled=state.is_subject_enabled,
        clock=clock.now,
    )
    trail = AuditTrail(core.repo, clock)
    logins = LoginBatcher(core.repo, settings, clock)
    try:
        yield World(
            core=core,
            clock=clock,
            state=state,
            logins=logins,
            tokens=Tokens(
                settings=settings,
                signer=lambda: state.signer,
                issuer=TokenIssuer(settings.issuer),
                hasher=core.hasher,
                clock=clock,
                logins=logins,
                verifier=verifier,
            ),
            revocations=Revocations(
                settings=settings,
                repo=core.repo,
                verifier=verifier,
                clock=clock,
                trail=trail,
                callers=Callers(settings, verifier),
            ),
            secrets=Secrets(
                settings=settings,
                repo=core.repo,
                hasher=core.hasher,
                clock=clock,
                trail=trail,
                logins=logins,
            ),
            callers=Callers(settings, verifier),
            orders=orders,
            admin=admin,
        )
    finally:
        logins.close()
        core.dispose()


class TestIssueToken:
    def test_without_an_active_signing_key_it_is_failed_precondition(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The state does not allow it now (errors.FailedPrecondition): not INTERNAL, which
        says authsvc is broken, and no audit row for a token that was never made."""
        before = len(world.audit("issue_token"))
        monkeypatch.setattr(world.tokens, "_signer", lambda: None)
        with pytest.raises(FailedPrecondition, match="no active signing key"):
            world.issue()
        assert len(world.audit("issue_token")) == before

    def test_a_token_carries_every_scope_of_the_audience_and_is_audited_before_signing(
        self, world: World
    ) -> None:
        issued = world.issue()
        assert issued.claims.subject == "orders" and issued.claims.audience == "billing"
        assert issued.claims.scopes == ("billing.read", "x.y")
        (row,) = world.audit("issue_token")
        assert (row.actor, row.outcome, row.peer, row.request_id) == ("orders", "ok", PEER, "req")
        assert row.detail == f"credential=secret jti={issued.claims.jti}"
        assert world.tokens.validate(issued.token, "billing", ("x.y",)).valid

    def test_an_audience_or_scope_the_service_lacks_is_refused_and_audited(
        self, world: World
    ) -> None:
        with pytest.raises(PermissionDenied, match="audience not allowed"):
            world.issue(audience="payroll")
        with pytest.raises(PermissionDenied, match="scope not allowed for this service: admin"):
            world.issue(scopes=("billing.read", "admin"))
        assert [r.outcome for r in world.audit("issue_token")] == [
            "audience_denied",
            "scope_denied",
        ]

    def test_any_service_gets_a_scopeless_token_for_authsvc_but_no_scope_there(
        self, world: World
    ) -> None:
        follow = world.issue(audience="authsvc")
        assert follow.claims.scopes == ()
        assert world.callers.follower(follow.token).subject == "orders"
        with pytest.raises(PermissionDenied):
            world.callers.admin(follow.token)
        with pytest.raises(PermissionDenied):
            world.issue(audience="authsvc", scopes=(ADMIN_SCOPE,))

    def test_a_wrong_secret_is_unauthenticated_and_a_bad_request_never_reaches_the_batch(
        self, world: World
    ) -> None:
        with pytest.raises(Unauthenticated, match="invalid service credentials"):
            asyncio.run(
                world.tokens.issue(TokenRequest("orders", "asvcs_wrong", "billing"), _origin())
            )
        with pytest.raises(InvalidArgument, match="ttl_seconds"):
            asyncio.run(
                world.tokens.issue(
                    TokenRequest("orders", world.orders, "billing", ttl_seconds=-1), _origin()
                )
            )
        # Only the login that reached the batch is audited.
        assert [r.outcome for r in world.audit("issue_token")] == ["bad_credentials"]

    def test_scopes_for_is_the_audience_lookup(self, world: World) -> None:
        service = world.core.repo.fetch_service("orders")
        assert isinstance(service, ServiceRecord)
        assert scopes_for(service, "inventory") == ("billing.read", "x.y")
        assert scopes_for(service, "payroll") is None


class TestValidateToken:
    def test_bad_requests_raise_but_a_stream_answers_malformed(self, world: World) -> None:
        token = world.issue().token
        for args in (("", "billing"), (token, ""), ("x" * 9000, "billing")):
            with pytest.raises(InvalidArgument):
                world.tokens.validate(*args)
            assert world.tokens.validate_in_stream(*args).reason == auth_pb2.MALFORMED
        assert world.tokens.validate(token, "inventory").reason == auth_pb2.WRONG_AUDIENCE


class TestRevocation:
    def test_a_presented_token_is_revoked_as_its_subject(self, world: World) -> None:
        issued = world.issue()
        assert asyncio.run(world.revocations.revoke_presented(issued.token, "leak", _origin()))
        world.state.refresh()
        assert world.tokens.validate(issued.token, "billing").reason == auth_pb2.REVOKED
        (row,) = world.audit("revoke_token")
        assert (row.actor, row.target) == ("orders", f"jti:{issued.claims.jti}")
        # Revoking it again is still a success; a token that is not one revokes nothing.
        assert asyncio.run(world.revocations.revoke_presented(issued.token, "", _origin()))
        assert not asyncio.run(world.revocations.revoke_presented("a.b.c", "", _origin()))

    def test_revoking_a_service_waits_for_its_cutoff_second(self, world: World) -> None:
        world.clock.advance(0.25)  # inside a second: the cutoff is the next whole one
        before = world.issue()
        started = world.clock.now()
        assert asyncio.run(world.revocations.revoke_service("orders", "", _origin("root")))
        assert world.clock.now() == service_cutoff(started)
        after = world.issue()
        world.state.refresh()
        assert world.tokens.validate(before.token, "billing").reason == auth_pb2.REVOKED
        assert world.tokens.validate(after.token, "billing").valid
        (row,) = world.audit("revoke_service_tokens")
        assert (row.actor, row.target) == ("root", "service:orders")

    def test_an_unknown_service_is_not_found(self, world: World) -> None:
        with pytest.raises(NotFound):
            asyncio.run(world.revocations.revoke_service("ghost", "", _origin("root")))

    def test_a_token_needs_no_caller_a_jti_or_service_needs_an_admin(self, world: World) -> None:
        def unreadable() -> str | None:
            raise AssertionError("a revocation by token must not read the caller's bearer")

        def revoke(target: RevokeTarget | None, value: str, bearer: str | None) -> bool:
            origin = _origin()
            return asyncio.run(
                world.revocations.revoke(target, value, "", lambda: bearer, origin)
            )

        issued = world.issue()
        assert asyncio.run(
            world.revocations.revoke("token", issued.token, "", unreadable, _origin())
        )
        with pytest.raises(InvalidArgument, match="one of token, jti or service_id"):
            revoke(None, "", None)
        with pytest.raises(Unauthenticated):
            revoke("jti", "j-1", None)
        with pytest.raises(PermissionDenied):
            revoke("service_id", "orders", world.issue("orders", "authsvc").token)
        admin = world.issue("root", "authsvc", (ADMIN_SCOPE,)).token
        assert revoke("jti", "j-1", admin)
        with pytest.raises(NotFound):
            revoke("service_id", "ghost", admin)
        rows = world.audit("revoke_token")
        assert [(r.actor, r.target) for r in rows] == [
            ("orders", f"jti:{issued.claims.jti}"),
            ("root", "jti:j-1"),
        ]
        assert rows[1].peer == PEER

    def test_a_jti_is_revoked_whether_or_not_it_was_seen(self, world: World) -> None:
        issued = world.issue()
        assert asyncio.run(world.revocations.revoke_jti(issued.claims.jti, "", _origin("root")))
        assert asyncio.run(world.revocations.revoke_jti("never-issued", "", _origin("root")))
        world.state.refresh()
        assert world.tokens.validate(issued.token, "billing").reason == auth_pb2.REVOKED
        assert world.tokens.validate(world.issue().token, "billing").valid
        rows = world.audit("revoke_token")
        assert [(r.actor, r.target) for r in rows] == [
            ("root", f"jti:{issued.claims.jti}"),
            ("root", "jti:never-issued"),
        ]
        for bad in ("", " padded", "esc\x1b[0m", "x" * 1000):
            with pytest.raises(InvalidArgument):
                asyncio.run(world.revocations.revoke_jti(bad, "", _origin("root")))


class TestSecrets:
    def test_the_current_secret_rotates_itself_a_previous_one_may_not(self, world: World) -> None:
        rotated = world.secrets.rotate_by_self("orders", world.orders, 300, _origin())
        assert rotated.previous_until is not None
        with pytest.raises(PermissionDenied, match="previous secret"):
            world.secrets.rotate_by_self("orders", world.orders, 0, _origin())
        # The previous secret still gets tokens during its grace; the new one too.
        assert world.issue().claims.subject == "orders"
        world.orders = rotated.secret
        assert world.issue().claims.subject == "orders"
        assert [(r.actor, r.outcome) for r in world.audit("rotate_secret")] == [
            ("orders", "ok"),
            ("orders", "previous_secret_denied"),
        ]

    def test_an_admin_rotation_of_an_unknown_service_is_audited_not_found(
        self, world: World
    ) -> None:
        with pytest.raises(NotFound):
            world.secrets.rotate_by_admin("ghost", 0, Origin.local(CLI_ACTOR))
        with pytest.raises(InvalidArgument):
            world.secrets.rotate_by_admin("orders", 10**9, Origin.local(CLI_ACTOR))
        (row,) = world.audit("rotate_secret")
        assert (row.actor, row.outcome, row.target) == ("cli", "not_found", "service:ghost")


    def test_a_first_secret_reports_no_grace_for_a_secret_that_never_was(
        self, world: World
    ) -> None:
        """rotate-secret on a secretless service gives it its first secret (README); with a
        grace period asked, there is no previous secret to keep, and none is reported."""
        now = to_datetime(world.clock.now())
        world.core.repo.create_service("kiosk", (AudienceGrant("billing", ()),), None, now)
        rotated = world.secrets.rotate_by_admin("kiosk", 3600, Origin.local(CLI_ACTOR))
        assert rotated.secret and rotated.previous_until is None
        again = world.secrets.rotate_by_admin("kiosk", 3600, Origin.local(CLI_ACTOR))
        assert again.previous_until is not None  # now there was one to keep

    def test_rotate_asks_for_an_admin_only_without_a_secret(self, world: World) -> None:
        asked: list[str] = []

        def admin() -> Origin:
            asked.append("admin")
            return _origin("root")

        rotated = world.secrets.rotate("orders", 0, world.orders, _origin("orders"), admin)
        assert asked == []  # a self-rotation needs no bearer token
        world.orders = rotated.secret
        world.secrets.rotate("orders", 0, "", _origin(), admin)
        assert asked == ["admin"]

        def no_admin() -> Origin:
            raise Unauthenticated("this call needs an admin bearer token")

        with pytest.raises(Unauthenticated):
            world.secrets.rotate("orders", 0, "", _origin(), no_admin)
        assert [(r.actor, r.outcome) for r in world.audit("rotate_secret")] == [
            ("orders", "ok"),
            ("root", "ok"),
        ]


class TestCallers:
    def test_the_admin_check(self, world: World) -> None:
        with pytest.raises(Unauthenticated, match="needs an admin bearer token"):
            world.callers.admin(None)
        with pytest.raises(Unauthenticated, match="MALFORMED"):
            world.callers.admin("not-a-token")
        with pytest.raises(Unauthenticated, match="WRONG_AUDIENCE"):
            world.callers.admin(world.issue().token)
        admin = world.issue("root", "authsvc", (ADMIN_SCOPE,))
        assert world.callers.admin(admin.token).subject == "root"
        with pytest.raises(PermissionDenied, match=ADMIN_SCOPE):
            world.callers.admin(world.issue("orders", "authsvc").token)

    def test_the_follower_check_takes_any_token_for_authsvc(self, world: World) -> None:
        with pytest.raises(Unauthenticated, match="needs a bearer token"):
            world.callers.follower(None)
        with pytest.raises(Unauthenticated, match="WRONG_AUDIENCE"):
            world.callers.follower(world.issue().token)
        with pytest.raises(Unauthenticated, match="MALFORMED"):
            world.callers.follower("x" * 100_000)
        assert world.callers.follower(world.issue("orders", "authsvc").token).subject == "orders"
        admin = world.issue("root", "authsvc", (ADMIN_SCOPE,))
        assert world.callers.follower(admin.token).subject == "root"


class TestUnverifiedPeek:
    def test_it_reads_what_the_verifier_reads_and_nothing_else(self, world: World) -> None:
        token = world.issue().token
        assert unverified_audience(token) == "billing"
        payload = unverified_payload(token)
        assert payload is not None and payload["sub"] == "orders"
        header, _body, signature = token.split(".")
        for broken in ("", "a.b", "a.b.c.d", f"{header}.!!!.{signature}", f"{header}..x"):
            assert unverified_audience(broken) is None


class TestAuditTrail:
    def test_recent_is_newest_first_and_bounded(self, world: World) -> None:
        trail = AuditTrail(world.core.repo, world.clock)
        for n in range(3):
            trail.record(Origin.local(CLI_ACTOR), action="probe", target=f"t:{n}")
        newest = trail.recent(2)
        assert [(e.action, e.target) for e in newest] == [("probe", "t:2"), ("probe", "t:1")]
        with pytest.raises(InvalidArgument, match="at least 1"):
            trail.recent(0)


class TestKekRotation:
    def test_every_key_is_rewrapped_once_and_each_run_is_audited(
        self, world: World, tmp_path: Path
    ) -> None:
        core = world.core
        new_text = KeyEncryptionKey.generate_base64()
        new = KeyEncryptionKey.from_base64(new_text)
        origin = Origin.local(CLI_ACTOR)
        first = rotate_kek_audited(
            core.repo, core.settings.kek_ring, new, world.clock, core.trail, origin
        )
        # The signing key and the secret-hash key.
        assert first.rewrapped >= 2 and first.kek_id == new.kek_id
        again = rotate_kek_audited(
            core.repo, core.settings.kek_ring, new, world.clock, core.trail, origin
        )
        assert again.rewrapped == 0
        assert [(r.outcome, r.detail) for r in world.audit("rotate_kek")] == [
            ("ok", f"rewrapped={first.rewrapped}"),
            ("already_rotated", "rewrapped=0"),
        ]
        # The new KEK alone opens the database now; the old one no longer does.
        moved = build_core(in_process_settings(tmp_path, AUTHSVC_KEK=new_text), world.clock)
        try:
            # The secret-hash key it unwraps is the one the stored hashes were made with.
            assert moved.hasher.hash(world.orders) == core.hasher.hash(world.orders)
        finally:
            moved.dispose()
        with pytest.raises(ConfigError):
            build_core(in_process_settings(tmp_path), world.clock)


class TestWatchRevocations:
    def _revoke(self, world: World, *jtis: str) -> None:
        for jti in jtis:
            asyncio.run(world.revocations.revoke_jti(jti, "", _origin("root")))

    def test_a_follower_gets_storage_then_the_live_log_once_each_in_order(
        self, world: World
    ) -> None:
        self._revoke(world, "a", "b", "c")
        world.state.refresh()
        # Like a server that started after these: they are behind the log, in storage only.
        feed = RevocationFeed(world.state.revocation_cursor, streams_per_peer=1)
        watch = RevocationWatch(
            repo=world.core.repo, clock=world.clock, feed=feed, callers=world.callers
        )
        token = world.issue("orders", "authsvc").token

        async def follow() -> list[str]:
            events = watch.follow(token, 0, PEER)
            seen = [(await anext(events)).jti for _ in range(3)]
            assert feed.open_streams == 1
            with pytest.raises(ResourceExhausted):
                await anext(watch.follow(token, 0, PEER))
            # A revocation published after the replay comes from the log, then the feed ends.
            await asyncio.to_thread(self._revoke, world, "d")
            after = world.core.repo.list_revocations(
                world.state.revocation_cursor, to_datetime(world.clock.now())
            )
            feed.publish(after)
            seen.append((await anext(events)).jti)
            feed.close()
            seen += [e.jti async for e in events]
            return seen

        assert asyncio.run(follow()) == ["a", "b", "c", "d"]
        assert feed.open_streams == 0

    def test_who_may_follow_and_from_where(self, world: World) -> None:
        watch = RevocationWatch(
            repo=world.core.repo, clock=world.clock, feed=RevocationFeed(0), callers=world.callers
        )
        token = world.issue("orders", "authsvc").token

        async def first(token: str | None, cursor: int) -> None:
            await anext(watch.follow(token, cursor, PEER))

        with pytest.raises(Unauthenticated):
            asyncio.run(first(None, 0))
        with pytest.raises(Unauthenticated, match="WRONG_AUDIENCE"):
            asyncio.run(first(world.issue().token, 0))
        with pytest.raises(InvalidArgument, match="after_cursor"):
            asyncio.run(first(token, -1))


class TestHousekeeping:
    """The scheduler's deletions, decided by `Housekeeping.prune` (no server, no scheduler)."""

    def _seed(self, world: World, at: float) -> None:
        when = to_datetime(at)
        with world.core.repo.login_batch(when, world.core.settings.throttle_window_seconds) as b:
            b.failures("id:ghost", "peer:10.0.0.9")
            b.count_failure("id:ghost")
            b.remember_peer("orders", "10.0.0.1")
        world.core.repo.create_audit_event(
            at=when,
            actor="root",
            action="probe",
            target="service:orders",
            outcome="ok",
            peer=PEER,
            request_id="req",
        )

    def test_each_window_deletes_only_what_is_past_it(self, world: World) -> None:
        settings = replace(world.core.settings, throttle_known_peer_seconds=3600)
        start = world.clock.now()
        self._seed(world, start)
        keeper = Housekeeping(world.core.repo, world.clock, settings)

        # Inside every window: nothing goes.
        world.clock.advance(1)
        assert keeper.prune() == Pruned(auth_failures=0, known_peers=0, audit_events=0)
        assert world.audit("probe")

        # Past the throttle window and the known-peer period, within audit retention.
        world.clock.advance(max(settings.throttle_window_seconds, 3600) + 1)
        pruned = keeper.prune()
        assert (pruned.auth_failures, pruned.known_peers, pruned.audit_events) == (1, 1, 0)
        assert world.audit("probe")

        # Past audit retention.
        world.clock.advance(settings.audit_retention_days * 86400)
        assert keeper.prune().audit_events >= 1
        assert world.audit("probe") == []

    def test_audit_rows_survive_a_wrong_forward_jump(self, world: World) -> None:
        """Retention counts from the earlier clock: a wall clock stepped a year ahead must not
        delete the audit trail (the server passes `WallClock.earliest_now`)."""
        start = world.clock.now()
        self._seed(world, start)
        keeper = Housekeeping(
            world.core.repo, world.clock, world.core.settings, earliest_now=lambda: start + 5
        )
        world.clock.step(400 * 86400)
        assert keeper.prune().audit_events == 0
        assert world.audit("probe")
