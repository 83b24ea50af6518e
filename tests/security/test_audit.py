"""Audit: every issue (ok and failed), revocation, secret rotation, key rotation and service change
is exactly one audit row and one structured log event; `authsvc audit list` shows them; old rows
are pruned on a schedule."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from authsvc.clock import SystemClock, to_datetime
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN, World, make_world
from tests.support.server import RunningServer, base_env, run_cli, start_server

PEER = "ipv4:127.0.0.1"
WRONG = "asvcs_" + "A" * 43
Row = tuple[str, str, str, str]  # actor, action, target, outcome


def audit_list(server: RunningServer, *extra: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        server.cli("audit", "list", "--json", "--limit", "10000", *extra).stdout
    )
    return rows


def log_events(lines: list[str]) -> list[dict[str, Any]]:
    """The structured audit events among JSON log lines."""
    events = []
    for line in lines:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "audit":
                events.append(entry)
    return events


class Recorder:
    """Runs each RPC under its own x-request-id and remembers the audit row it must leave."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.stub = world.server.stub
        self.expected: dict[str, Row] = {}
        # The peer each row names, when not PEER ("*": an aggregated row for a service id).
        self.peers: dict[str, str] = {}

    def call(
        self,
        name: str,
        expected: Row,
        rpc: Callable[..., Any],
        request: Any,
        *,
        admin: bool = False,
        code: grpc.StatusCode = grpc.StatusCode.OK,
    ) -> Any:
        request_id = f"audit-{name}"
        metadata = [("x-request-id", request_id)]
        if admin:
            metadata += self.world.admin_md()
        self.expected[request_id] = expected
        try:
            response = rpc(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == code, (name, exc.code())
            return None
        assert code == grpc.StatusCode.OK, name
        return response

    def issue(
        self,
        name: str,
        expected: Row,
        sid: str,
        secret: str,
        audience: str = "billing",
        scopes: tuple[str, ...] = (),
        code: grpc.StatusCode = grpc.StatusCode.OK,
    ) -> Any:
        request = auth_pb2.IssueTokenRequest(
            service_id=sid, service_secret=secret, audience=audience, scopes=list(scopes)
        )
        return self.call(name, expected, self.stub.IssueToken, request, code=code)


Audited = tuple[World, Recorder, dict[str, subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """One server, every audited operation done once; yields what each must have left."""
    world, server = make_world(
        tmp_path_factory.mktemp("authsvc-audit"), AUTHSVC_THROTTLE_ID_FAILURES="2"
    )
    try:
        rec = Recorder(world)
        unauth, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
        payroll = server.create_service("payroll", ["billing"])
        victim = server.create_service("victim", ["billing"])
        # CLI changes: no peer, actor "cli"; --verbose shows their log events on stderr.
        cli: dict[str, subprocess.CompletedProcess[str]] = {
            "create": server.cli(
                "services", "create", "retired", "--audience", "billing", "--json", "--verbose"
            ),
            "disable": server.cli("services", "disable", "retired", "--verbose"),
            "rotate": server.cli("keys", "rotate", "--verbose"),
        }

        # IssueToken, ok and every way it fails.
        ok = rec.issue(
            "issue-ok", ("orders", "issue_token", "billing", "ok"), "orders", world.orders_secret
        )
        rec.issue(
            "issue-bad-secret",
            ("orders", "issue_token", "orders", "bad_credentials"),
            "orders",
            WRONG,
            code=unauth,
        )
        # An unknown id: the first attempt of its peer's aggregated row.
        rec.issue(
            "issue-unknown-id",
            ("*", "issue_token", "*", "unknown_service"),
            "nobody",
            WRONG,
            code=unauth,
        )
        rec.issue(
            "issue-audience",
            ("orders", "issue_token", "payroll", "audience_denied"),
            "orders",
            world.orders_secret,
            audience="payroll",
            code=denied,
        )
        rec.issue(
            "issue-scope",
            ("orders", "issue_token", "billing", "scope_denied"),
            "orders",
            world.orders_secret,
            scopes=("billing.admin",),
            code=denied,
        )
        rec.issue(
            "issue-disabled",
            ("retired", "issue_token", "retired", "disabled"),
            "retired",
            json.loads(cli["create"].stdout)["service_secret"],
            code=unauth,
        )
        for i in range(2):
            rec.issue(
                f"issue-victim-{i}",
                ("victim", "issue_token", "victim", "bad_credentials"),
                "victim",
                WRONG,
                code=unauth,
            )
        rec.issue(
            "issue-throttled",
            ("victim", "issue_token", "victim", "throttled"),
            "victim",
            victim,
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        rec.peers["audit-issue-throttled"] = "*"  # the id's aggregated row: any peer

        # Revocations: the token itself, by jti and by service (admin).
        jti = world.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=ok.access_token, audience="billing")
        ).claims.jti
        rec.call(
            "revoke-token",
            ("orders", "revoke_token", f"jti:{jti}", "ok"),
            rec.stub.RevokeToken,
            auth_pb2.RevokeTokenRequest(token=ok.access_token),
        )
        rec.call(
            "revoke-jti",
            (ADMIN, "revoke_token", "jti:some-jti", "ok"),
            rec.stub.RevokeToken,
            auth_pb2.RevokeTokenRequest(jti="some-jti"),
            admin=True,
        )
        rec.call(
            "revoke-service",
            (ADMIN, "revoke_service_tokens", "service:payroll", "ok"),
            rec.stub.RevokeToken,
            auth_pb2.RevokeTokenRequest(service_id="payroll"),
            admin=True,
        )

        # Secret rotation: by the service itself, by an admin, refused, unknown service.
        rotate = rec.stub.RotateServiceSecret
        rec.call(
            "rotate-self",
            ("payroll", "rotate_secret", "service:payroll", "ok"),
            rotate,
            auth_pb2.RotateServiceSecretRequest(service_id="payroll", current_secret=payroll),
        )
        rec.call(
            "rotate-admin",
            (ADMIN, "rotate_secret", "service:payroll", "ok"),
            rotate,
            auth_pb2.RotateServiceSecretRequest(service_id="payroll"),
            admin=True,
        )
        rec.call(
            "rotate-bad",
            ("payroll", "rotate_secret", "payroll", "bad_credentials"),
            rotate,
            auth_pb2.RotateServiceSecretRequest(service_id="payroll", current_secret=WRONG),
            code=unauth,
        )
        rec.call(
            "rotate-unknown",
            (ADMIN, "rotate_secret", "service:ghost", "not_found"),
            rotate,
            auth_pb2.RotateServiceSecretRequest(service_id="ghost"),
            admin=True,
            code=grpc.StatusCode.NOT_FOUND,
        )

        # Key rotation and service changes over the admin RPCs.
        key = rec.call(
            "rotate-key",
            (ADMIN, "rotate_signing_key", "key:?", "ok"),
            rec.stub.RotateSigningKey,
            auth_pb2.RotateSigningKeyRequest(),
            admin=True,
        )
        rec.expected["audit-rotate-key"] = (ADMIN, "rotate_signing_key", f"key:{key.key_id}", "ok")
        rec.call(
            "create-service",
            (ADMIN, "create_service", "service:ledger", "ok"),
            rec.stub.CreateService,
            auth_pb2.CreateServiceRequest(service_id="ledger", audiences=["billing"]),
            admin=True,
        )
        rec.call(
            "disable-service",
            (ADMIN, "disable_service", "service:ledger", "ok"),
            rec.stub.DisableService,
            auth_pb2.DisableServiceRequest(service_id="ledger"),
            admin=True,
        )
        yield world, rec, cli
    finally:
        server.stop()


class TestEveryEventIsOneRowAndOneLogLine:
    def test_each_rpc_leaves_exactly_one_row_with_every_field(self, audited: Audited) -> None:
        world, rec, _cli = audited
        rows = audit_list(world.server)
        for request_id, expected in rec.expected.items():
            mine = [r for r in rows if r["request_id"] == request_id]
            got = [(r["actor"], r["action"], r["target"], r["outcome"]) for r in mine]
            assert got == [expected], request_id
            assert mine[0]["peer"] == rec.peers.get(request_id, PEER)
            assert mine[0]["time"]

    def test_each_rpc_logs_exactly_one_structured_event(self, audited: Audited) -> None:
        world, rec, _cli = audited
        deadline = time.monotonic() + 10
        while True:
            events = log_events(list(world.server.output))
            by_id = {rid: [e for e in events if e.get("request_id") == rid] for rid in rec.expected}
            if all(len(v) == 1 for v in by_id.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for request_id, (actor, action, target, outcome) in rec.expected.items():
            assert len(by_id[request_id]) == 1, request_id
            event = by_id[request_id][0]
            got = {k: event[k] for k in ("action", "actor", "target", "outcome", "peer")}
            assert got == {
                "action": action,
                "actor": actor,
                "target": target,
                "outcome": outcome,
                "peer": rec.peers.get(request_id, PEER),
            }, request_id

    @pytest.mark.parametrize(
        ("command", "action", "target"),
        [
            ("create", "create_service", "service:retired"),
            ("disable", "disable_service", "service:retired"),
            ("rotate", "rotate_signing_key", None),
        ],
    )
    def test_cli_changes_are_audited_as_cli_from_local(
        self,
        audited: Audited,
        command: str,
        action: str,
        target: str | None,
    ) -> None:
        world, _rec, cli = audited
        rows = [
            r
            for r in audit_list(world.server)
            if r["actor"] == "cli" and r["action"] == action and r["peer"] == "local"
        ]
        if target is not None:
            rows = [r for r in rows if r["target"] == target]
        else:
            kid = cli["rotate"].stdout.split()[3]
            rows = [r for r in rows if r["target"] == f"key:{kid}"]
        assert len(rows) == 1
        assert rows[0]["outcome"] == "ok" and rows[0]["request_id"]
        # One structured event on the command's stderr, with the row's request id.
        events = log_events(cli[command].stderr.splitlines())
        assert len(events) == 1
        assert events[0]["action"] == action
        assert events[0]["request_id"] == rows[0]["request_id"]

    def test_registering_services_with_the_cli_is_audited_too(self, audited: Audited) -> None:
        world, _rec, _cli = audited
        created = {
            r["target"]
            for r in audit_list(world.server)
            if (r["actor"], r["action"], r["peer"]) == ("cli", "create_service", "local")
        }
        assert {"service:orders", "service:billing", f"service:{ADMIN}"} <= created


class TestAuditList:
    def test_newest_first_and_limited(self, audited: Audited) -> None:
        world, _rec, _cli = audited
        everything = audit_list(world.server)
        newest = json.loads(world.server.cli("audit", "list", "--json", "--limit", "3").stdout)
        assert newest == everything[:3]
        assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)

    def test_text_output_has_one_line_per_event(self, audited: Audited) -> None:
        world, _rec, _cli = audited
        lines = world.server.cli("audit", "list", "--limit", "5").stdout.splitlines()
        assert len(lines) == 5
        assert all(len(line.split("\t")) == 7 for line in lines)
        assert any("\tissue_token\t" in line or "\tdisable_service\t" in line for line in lines)

    def test_audit_rows_never_hold_a_secret(self, audited: Audited) -> None:
        world, _rec, _cli = audited
        dump = json.dumps(audit_list(world.server))
        for secret in (world.admin_secret, world.orders_secret, world.billing_secret, WRONG):
            assert secret not in dump


class TestPruning:
    def test_old_rows_and_expired_revocations_are_pruned_on_schedule(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'authsvc.db'}"
        env = base_env(
            url,
            AUTHSVC_AUDIT_RETENTION_DAYS="30",
            AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS="2",
            AUTHSVC_KEY_PUBLISH_LEAD_SECONDS="1",
        )
        run_cli(env, "db", "upgrade")
        now = to_datetime(SystemClock().now())
        engine = make_engine(url)
        try:
            repo = Repository(engine)
            for name, age in (("too-old", 31), ("recent", 29)):
                repo.create_audit_event(
                    at=now - timedelta(days=age),
                    actor=name,
                    action="create_service",
                    target=f"service:{name}",
                    outcome="ok",
                    peer="local",
                    request_id=name,
                )
            # Kept max TTL (1 h) + leeway after the token's exp, so a clock step cannot let a
            # revoked token back in: one is past that, one is not yet.
            for jti, expired_for in (
                ("long-expired", timedelta(hours=2)),
                ("just-expired", timedelta(minutes=10)),
            ):
                repo.create_revocation(
                    jti=jti,
                    service_id=None,
                    revoked_before=None,
                    expires_at=now - expired_for,
                    reason="",
                    now=now - expired_for - timedelta(hours=1),
                )
        finally:
            engine.dispose()
        server = start_server(env)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                rows = audit_list(server)
                actors = {r["actor"] for r in rows}
                if "too-old" not in actors and "scheduler" in actors:
                    break
                time.sleep(0.25)
            assert "too-old" not in actors and "recent" in actors
            # The scheduled rotation that ran meanwhile is audited too, once per rotation.
            scheduled = [r for r in rows if r["actor"] == "scheduler"]
            assert scheduled and all(
                r["action"] == "rotate_signing_key" and r["peer"] == "local" for r in scheduled
            )
            assert len({r["target"] for r in scheduled}) == len(scheduled)
            engine = make_engine(url)
            try:
                with engine.connect() as conn:
                    left = list(conn.execute(text("SELECT jti FROM revocations")).scalars())
            finally:
                engine.dispose()
            assert left == ["just-expired"]
        finally:
            server.stop()
