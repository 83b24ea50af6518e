"""Abuse limits: failed logins are throttled per service id and per peer, a victim is never locked
out from its own address, a database fault is UNAVAILABLE and never a counted failure, and the
per-id limit holds across replicas sharing one PostgreSQL database."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from sqlalchemy.engine import make_url

from authsvc.clock import SystemClock, to_datetime
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.postgres import (
    postgres_url,  # noqa: F401  (a fixture)
    postgres_url_or_skip,
)
from tests.support.server import RunningServer, base_env, run_cli, start_server

WRONG = "asvcs_" + "A" * 43


def _issue(stub: auth_pb2_grpc.AuthServiceStub, sid: str, secret: str) -> grpc.StatusCode:
    """IssueToken for audience billing; the status code (OK when a token came back)."""
    try:
        response = stub.IssueToken(
            auth_pb2.IssueTokenRequest(service_id=sid, service_secret=secret, audience="billing"),
            timeout=30,
        )
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            trailers = dict(exc.trailing_metadata())
            assert int(trailers["retry-after"]) > 0
        return code
    assert response.access_token
    return grpc.StatusCode.OK


def _failure_counts(database_url: str, service_id: str, peer: str) -> tuple[int, int]:
    """What the shared database counts against this id and this peer right now."""
    engine = make_engine(database_url)
    try:
        repo = Repository(engine)
        now = to_datetime(SystemClock().now())
        with repo.login_batch(now, 900) as batch:
            return batch.failures(f"id:{service_id}", f"peer:{peer}")
    finally:
        engine.dispose()


# -- two peer addresses on one host --------------------------------------------------------------


@contextmanager
def _two_address_server(folder: Path, **settings: str) -> Iterator[tuple[RunningServer, str, str]]:
    """A server on `localhost` (IPv4 and IPv6 loopback): 127.0.0.1 and ::1 are two peers."""
    env = base_env(f"sqlite:///{folder / 'authsvc.db'}", **settings)
    run_cli(env, "db", "upgrade")
    server = start_server(env, "--listen", "localhost:0")
    port = server.address.rsplit(":", 1)[1]
    try:
        yield server, f"127.0.0.1:{port}", f"[::1]:{port}"
    finally:
        server.stop()


class TestVictimLockout:
    def test_an_attacker_elsewhere_cannot_lock_a_service_out_of_its_own_address(
        self, tmp_path: Path
    ) -> None:
        with _two_address_server(
            tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="3", AUTHSVC_THROTTLE_PEER_FAILURES="50"
        ) as (server, home, elsewhere):
            secret = server.create_service("victim", ["billing"])
            with grpc.insecure_channel(home) as h, grpc.insecure_channel(elsewhere) as e:
                victim, attacker = (
                    auth_pb2_grpc.AuthServiceStub(h),
                    auth_pb2_grpc.AuthServiceStub(e),
                )
                assert _issue(victim, "victim", secret) == grpc.StatusCode.OK
                for _ in range(3):
                    assert _issue(attacker, "victim", WRONG) == grpc.StatusCode.UNAUTHENTICATED
                # The id is throttled for every other address, even with the right secret...
                assert _issue(attacker, "victim", WRONG) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _issue(attacker, "victim", secret) == grpc.StatusCode.RESOURCE_EXHAUSTED
                # ...but the victim keeps getting tokens from where it has logged in before.
                assert _issue(victim, "victim", secret) == grpc.StatusCode.OK

    def test_an_address_that_never_logged_in_is_held_to_the_id_limit(self, tmp_path: Path) -> None:
        with _two_address_server(
            tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="2", AUTHSVC_THROTTLE_PEER_FAILURES="50"
        ) as (server, home, elsewhere):
            secret = server.create_service("victim", ["billing"])
            with grpc.insecure_channel(home) as h, grpc.insecure_channel(elsewhere) as e:
                victim, attacker = (
                    auth_pb2_grpc.AuthServiceStub(h),
                    auth_pb2_grpc.AuthServiceStub(e),
                )
                for _ in range(2):
                    assert _issue(attacker, "victim", WRONG) == grpc.StatusCode.UNAUTHENTICATED
                # No success from `home` yet: it is a stranger too, so the id limit applies.
                assert _issue(victim, "victim", secret) == grpc.StatusCode.RESOURCE_EXHAUSTED

    def test_the_per_peer_limit_binds_a_known_peer_too(self, tmp_path: Path) -> None:
        with _two_address_server(
            tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="100", AUTHSVC_THROTTLE_PEER_FAILURES="4"
        ) as (server, home, _elsewhere):
            secret = server.create_service("victim", ["billing"])
            with grpc.insecure_channel(home) as h:
                stub = auth_pb2_grpc.AuthServiceStub(h)
                assert _issue(stub, "victim", secret) == grpc.StatusCode.OK
                # Guessing other ids from the victim's address spends that address's budget.
                for i in range(4):
                    assert _issue(stub, f"guess-{i}", WRONG) == grpc.StatusCode.UNAUTHENTICATED
                assert _issue(stub, "victim", secret) == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _issue(stub, "victim", WRONG) == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- database faults (PostgreSQL, for real) -----------------------------------------------------


def _admin_sql(*statements: sql.Composed) -> None:
    with psycopg.connect(
        make_url(postgres_url_or_skip()).set(drivername="postgresql").render_as_string(False),
        autocommit=True,
    ) as conn:
        for statement in statements:
            conn.execute(statement)


def _drop_connections(name: str) -> sql.Composed:
    return sql.SQL(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = {} AND pid <> pg_backend_pid()"
    ).format(sql.Literal(name))


@contextmanager
def _database_refusing_connections(database_url: str) -> Iterator[None]:
    """Every open connection dropped and every new one refused, until the block ends."""
    name = str(make_url(database_url).database)
    _admin_sql(
        sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)),
        _drop_connections(name),
    )
    try:
        yield
    finally:
        _admin_sql(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


@contextmanager
def _database_read_only(database_url: str) -> Iterator[None]:
    """Reads work, every write fails (as on a standby after a failover), until the block ends."""
    name = str(make_url(database_url).database)
    db = sql.Identifier(name)
    _admin_sql(
        sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(db),
        _drop_connections(name),
    )
    try:
        yield
    finally:
        _admin_sql(
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(db),
            _drop_connections(name),
        )


class TestDatabaseFaults:
    """Limits of 2 failures per id and per peer: one counted failure during a fault would show."""

    @pytest.fixture
    def server(self, postgres_url: str) -> Iterator[RunningServer]:  # noqa: F811
        env = base_env(
            postgres_url,
            AUTHSVC_THROTTLE_ID_FAILURES="2",
            AUTHSVC_THROTTLE_PEER_FAILURES="2",
        )
        run_cli(env, "db", "upgrade")
        running = start_server(env)
        try:
            yield running
        finally:
            running.stop()

    def _assert_nothing_counted(self, server: RunningServer, secret: str) -> None:
        assert _failure_counts(server.env["AUTHSVC_DATABASE_URL"], "victim", "ipv4:127.0.0.1") == (
            0,
            0,
        )
        assert _issue(server.stub, "victim", secret) == grpc.StatusCode.OK
        # The limits still work once the database is back: two failures, then throttled.
        for _ in range(2):
            assert _issue(server.stub, "victim", WRONG) == grpc.StatusCode.UNAUTHENTICATED
        assert _issue(server.stub, "victim", WRONG) == grpc.StatusCode.RESOURCE_EXHAUSTED

    def test_an_unreachable_database_is_unavailable_never_a_failed_login(
        self, server: RunningServer
    ) -> None:
        secret = server.create_service("victim", ["billing"])
        url = server.env["AUTHSVC_DATABASE_URL"]
        with _database_refusing_connections(url):
            for _ in range(3):
                assert _issue(server.stub, "victim", WRONG) == grpc.StatusCode.UNAVAILABLE
                assert _issue(server.stub, "victim", secret) == grpc.StatusCode.UNAVAILABLE
                assert _issue(server.stub, "nobody", WRONG) == grpc.StatusCode.UNAVAILABLE
        self._assert_nothing_counted(server, secret)

    def test_a_database_refusing_writes_is_unavailable_never_a_failed_login(
        self, server: RunningServer
    ) -> None:
        """The secret is checked (reads work) but the verdict cannot be recorded: no answer may
        tell a right secret from a wrong one, and no failure may be counted."""
        secret = server.create_service("victim", ["billing"])
        url = server.env["AUTHSVC_DATABASE_URL"]
        with _database_read_only(url):
            for _ in range(3):
                assert _issue(server.stub, "victim", WRONG) == grpc.StatusCode.UNAVAILABLE
                assert _issue(server.stub, "victim", secret) == grpc.StatusCode.UNAVAILABLE
                assert _issue(server.stub, "nobody", WRONG) == grpc.StatusCode.UNAVAILABLE
        self._assert_nothing_counted(server, secret)


# -- replicas ---------------------------------------------------------------------------------


class TestReplicas:
    def test_failures_spread_over_two_replicas_add_up_to_one_limit(
        self,
        postgres_url: str,  # noqa: F811
    ) -> None:
        env = base_env(
            postgres_url, AUTHSVC_THROTTLE_ID_FAILURES="4", AUTHSVC_THROTTLE_PEER_FAILURES="1000"
        )
        run_cli(env, "db", "upgrade")
        a = start_server(env)
        try:
            b = start_server(env)
            try:
                secret = a.create_service("victim", ["billing"])
                other = a.create_service("bystander", ["billing"])
                # Two failures on each replica: each alone would still be under its limit.
                for replica in (a, b, a, b):
                    assert _issue(replica.stub, "victim", WRONG) == grpc.StatusCode.UNAUTHENTICATED
                for replica in (a, b):
                    code = _issue(replica.stub, "victim", WRONG)
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    code = _issue(replica.stub, "victim", secret)
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert _issue(replica.stub, "bystander", other) == grpc.StatusCode.OK
                assert _failure_counts(postgres_url, "victim", "ipv4:127.0.0.1")[0] == 4
            finally:
                b.stop()
        finally:
            a.stop()


# -- the audit trail under a flood ----------------------------------------------------------------


def _login_outcomes(server: RunningServer) -> dict[tuple[str, str], float]:
    """authsvc_login_outcomes_total by (action, outcome), from the server's /metrics."""
    for line in server.output:
        if line.startswith("authsvc http listening on "):
            address = line.split()[4]
            break
    else:
        raise AssertionError("serve printed no 'authsvc http listening on' line")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.labels["action"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "authsvc_login_outcomes_total"
    }


class TestAuditUnderAFlood:
    def test_throttled_and_unknown_id_attempts_cost_one_row_per_key_and_window(
        self, tmp_path: Path
    ) -> None:
        env = base_env(
            f"sqlite:///{tmp_path / 'authsvc.db'}",
            AUTHSVC_THROTTLE_ID_FAILURES="3",
            AUTHSVC_THROTTLE_PEER_FAILURES="1000",
        )
        run_cli(env, "db", "upgrade")
        server = start_server(env, "--http-listen", "127.0.0.1:0")
        try:
            orders = server.create_service("orders", ["billing"])
            victim = server.create_service("victim", ["billing"])
            stub = server.stub
            for _ in range(3):
                assert _issue(stub, "victim", WRONG) == grpc.StatusCode.UNAUTHENTICATED
            for secret in [WRONG] * 100 + [victim] * 50:
                assert _issue(stub, "victim", secret) == grpc.StatusCode.RESOURCE_EXHAUSTED
            for i in range(150):
                assert _issue(stub, f"ghost-{i}", WRONG) == grpc.StatusCode.UNAUTHENTICATED
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as exc:
                    stub.RotateServiceSecret(
                        auth_pb2.RotateServiceSecretRequest(
                            service_id="victim", current_secret=victim
                        ),
                        timeout=30,
                    )
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for _ in range(5):
                assert _issue(stub, "orders", orders) == grpc.StatusCode.OK

            rows = json.loads(server.cli("audit", "list", "--json", "--limit", "10000").stdout)
            logins = [r for r in rows if r["action"] in ("issue_token", "rotate_secret")]

            def kind(action: str, outcome: str) -> list[dict[str, Any]]:
                return [r for r in logins if (r["action"], r["outcome"]) == (action, outcome)]

            # Failures for a known id, and successes, keep one row each.
            assert len(kind("issue_token", "bad_credentials")) == 3
            assert len(kind("issue_token", "ok")) == 5
            assert all(
                r["count"] == 1 and r["first_time"] is None for r in kind("issue_token", "ok")
            )
            # A flood is counted on one row per key and window (two if a window ended meanwhile).
            for action, outcome, attempts, actor, peer in (
                ("issue_token", "throttled", 150, "victim", "*"),
                ("issue_token", "unknown_service", 150, "*", "ipv4:127.0.0.1"),
                ("rotate_secret", "throttled", 20, "victim", "*"),
            ):
                aggregated = kind(action, outcome)
                assert 1 <= len(aggregated) <= 2, (action, outcome)
                assert sum(r["count"] for r in aggregated) == attempts, (action, outcome)
                assert {(r["actor"], r["peer"]) for r in aggregated} == {(actor, peer)}
                assert all(r["first_time"] <= r["time"] for r in aggregated)
            assert "ghost-" not in json.dumps(rows)
            # Metrics keep the per-attempt detail.
            deadline = time.monotonic() + 20
            while True:
                counted = _login_outcomes(server)
                if counted.get(("issue_token", "ok")) == 5 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert counted[("issue_token", "throttled")] == 150
            assert counted[("issue_token", "unknown_service")] == 150
            assert counted[("issue_token", "bad_credentials")] == 3
            assert counted[("rotate_secret", "throttled")] == 20
            # The text listing reads an aggregated row as one line that says how many.
            text = server.cli("audit", "list", "--limit", "10000").stdout
            assert any(
                "throttled (" in line and "attempts since" in line for line in text.splitlines()
            )
        finally:
            server.stop()
