"""The HTTP side port of a real server: health, readiness, JWKS and Prometheus metrics."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from authsvc.config import load_settings
from authsvc.server.app import AuthsvcServer, build_core
from authsvc.server.http import HttpSidePort, ReadinessPolicy
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc.sync import ServerState
from authsvc_client.v1 import auth_pb2
from tests.ops.conftest import OpsServer, Reply, http_get, start_ops_server
from tests.support.clock import FakeClock
from tests.support.server import TEST_ISSUER, TEST_KEK

START = 1_900_000_000.0


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(ops: OpsServer, name: str, **labels: str) -> float:
    return samples(ops.get("/metrics").text).get((name, frozenset(labels.items())), 0.0)


AUTH = "authsvc.v1.AuthService"


class TestHealth:
    def test_healthz_answers_while_the_process_lives(self, ops: OpsServer) -> None:
        reply = ops.get("/healthz")
        assert reply.status == 200

    def test_readyz_reports_every_check_passing(self, ops: OpsServer) -> None:
        reply = ops.get("/readyz")
        assert reply.status == 200
        body = json.loads(reply.body)
        assert body["ready"] is True
        assert body["checks"]["database"] is True
        assert body["checks"]["state_loaded"] is True
        assert body["checks"]["sync_recent"] is True

    def test_unknown_path_is_404(self, ops: OpsServer) -> None:
        assert ops.get("/admin").status == 404

    def test_head_answers_like_get_without_a_body(self, ops: OpsServer) -> None:
        host, port = ops.base_url.removeprefix("http://").rsplit(":", 1)
        for path in ("/healthz", "/.well-known/jwks.json"):
            got = ops.get(path)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request("HEAD", path)
                head = conn.getresponse()
                assert head.status == 200, path
                assert head.read() == b""
                assert head.headers["Content-Length"] == str(len(got.body))
                assert head.headers["Content-Type"] == got.headers["Content-Type"]
            finally:
                conn.close()


class TestJwks:
    def test_same_key_set_as_get_jwks(self, ops: OpsServer) -> None:
        over_grpc = ops.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        reply = ops.get("/.well-known/jwks.json")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/json")
        assert json.loads(reply.body) == json.loads(over_grpc)

    def test_cache_lifetime_is_a_tenth_of_the_rotation_interval(self, ops: OpsServer) -> None:
        reply = ops.get("/.well-known/jwks.json")
        assert "max-age=60" in reply.headers["Cache-Control"]

    def test_unchanged_set_answers_304_to_its_etag(self, ops: OpsServer) -> None:
        etag = ops.get("/.well-known/jwks.json").headers["ETag"]
        again = ops.get("/.well-known/jwks.json", {"If-None-Match": etag})
        assert again.status == 304
        assert again.body == b""

    def test_rotation_publishes_the_new_key(self, ops: OpsServer) -> None:
        before = {k["kid"] for k in json.loads(ops.get("/.well-known/jwks.json").body)["keys"]}
        new_kid = ops.server.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=ops.admin_md(), timeout=30
        ).key_id
        assert new_kid in before  # published as the next key before it signed
        kids = {k["kid"] for k in json.loads(ops.get("/.well-known/jwks.json").body)["keys"]}
        assert new_kid in kids
        assert before <= kids  # old tokens still verify
        assert kids - before  # and the following next key is published ahead too


class TestMetrics:
    def test_rpcs_are_counted_by_method_and_code(self, ops: OpsServer) -> None:
        ok = (
            "grpc_server_handled_total",
            dict(grpc_service=AUTH, grpc_method="IssueToken", grpc_code="OK"),
        )
        bad = (
            "grpc_server_handled_total",
            dict(grpc_service=AUTH, grpc_method="IssueToken", grpc_code="UNAUTHENTICATED"),
        )
        ok0, bad0 = metric(ops, ok[0], **ok[1]), metric(ops, bad[0], **bad[1])
        ops.server.issue("orders", ops.orders_secret, "billing")
        ops.server.issue("orders", ops.orders_secret, "billing")
        try:
            ops.server.issue("orders", "asvcs_wrong", "billing")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        assert metric(ops, ok[0], **ok[1]) == ok0 + 2
        assert metric(ops, bad[0], **bad[1]) == bad0 + 1

    def test_validation_failures_are_counted_by_reason(self, ops: OpsServer) -> None:
        name = "authsvc_token_validation_failures_total"
        aud0 = metric(ops, name, reason="WRONG_AUDIENCE")
        mal0 = metric(ops, name, reason="MALFORMED")
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        stub = ops.server.stub
        assert stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
        ).valid
        stub.ValidateToken(auth_pb2.ValidateTokenRequest(token=token, audience="inventory"))
        stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="not-a-jwt", audience="billing"))
        assert metric(ops, name, reason="WRONG_AUDIENCE") == aud0 + 1
        assert metric(ops, name, reason="MALFORMED") == mal0 + 1

    def test_streamed_checks_are_counted_per_message(self, ops: OpsServer) -> None:
        total = "authsvc_streamed_validations_total"
        failures = "authsvc_streamed_validation_failures_total"
        total0 = metric(ops, total)
        aud0 = metric(ops, failures, reason="WRONG_AUDIENCE")
        unary0 = metric(ops, "authsvc_token_validation_failures_total", reason="WRONG_AUDIENCE")
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        requests = [
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"),
            auth_pb2.ValidateTokenRequest(token=token, audience="inventory"),
            auth_pb2.ValidateTokenRequest(token=token, audience="inventory"),
        ]
        answers = list(ops.server.stub.ValidateTokenStream(iter(requests), timeout=30))
        assert [a.valid for a in answers] == [True, False, False]
        assert metric(ops, total) == total0 + 3
        assert metric(ops, failures, reason="WRONG_AUDIENCE") == aud0 + 2
        assert (
            metric(ops, "authsvc_token_validation_failures_total", reason="WRONG_AUDIENCE")
            == unary0
        )

    def test_issue_and_validate_latency_is_observed(self, ops: OpsServer) -> None:
        count = "grpc_server_handling_seconds_count"
        v0 = metric(ops, count, grpc_service=AUTH, grpc_method="ValidateToken")
        i0 = metric(ops, count, grpc_service=AUTH, grpc_method="IssueToken")
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        ops.server.stub.ValidateToken(auth_pb2.ValidateTokenRequest(token=token, audience="b"))
        assert metric(ops, count, grpc_service=AUTH, grpc_method="ValidateToken") == v0 + 1
        assert metric(ops, count, grpc_service=AUTH, grpc_method="IssueToken") == i0 + 1
        total = metric(
            ops, "grpc_server_handling_seconds_sum", grpc_service=AUTH, grpc_method="IssueToken"
        )
        assert 0 < total < 60

    def test_revocations_held_grows_with_a_revocation(self, ops: OpsServer) -> None:
        held0 = metric(ops, "authsvc_revocations_held")
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        assert ops.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token)).revoked
        assert metric(ops, "authsvc_revocations_held") == held0 + 1

    def test_key_age_and_sync_lag_are_exported(self, ops: OpsServer) -> None:
        values = samples(ops.get("/metrics").text)
        age = values[("authsvc_signing_key_active_age_seconds", frozenset())]
        lag = values[("authsvc_replica_sync_lag_seconds", frozenset())]
        assert 0 <= age < 600
        # The test server syncs every 0.2 s.
        assert 0 <= lag < 5

    def test_rotation_interval_and_database_up_are_exported(self, ops: OpsServer) -> None:
        # The inputs of the rotation-overdue and database alerts (deploy/prometheus/alerts.yml).
        assert metric(ops, "authsvc_signing_key_rotation_interval_seconds") == 600
        assert metric(ops, "authsvc_database_up") == 1

    def test_open_watch_streams_are_a_gauge(self, ops: OpsServer) -> None:
        name = "grpc_server_streams_open"
        labels = dict(grpc_service=AUTH, grpc_method="WatchRevocations")
        follower = ops.server.issue("orders", ops.orders_secret, "authsvc").access_token
        stream = ops.server.stub.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(),
            metadata=[("authorization", f"Bearer {follower}")],
        )
        try:
            deadline = time.monotonic() + 30
            while metric(ops, name, **labels) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(ops, name, **labels) == 1
        finally:
            stream.cancel()
        deadline = time.monotonic() + 30
        while metric(ops, name, **labels) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(ops, name, **labels) == 0
        assert metric(ops, "grpc_server_handled_total", grpc_code="CANCELLED", **labels) >= 1


class TestReadiness:
    """In process, with a clock the test moves: readiness follows sync lag and the database."""

    def test_stale_state_and_unreachable_database_are_not_ready(self, tmp_path: Path) -> None:
        settings = load_settings(
            {
                "AUTHSVC_KEK": TEST_KEK,
                "AUTHSVC_ISSUER": TEST_ISSUER,
                "AUTHSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
                # One sync at start, then none for the length of the test.
                "AUTHSVC_SYNC_INTERVAL_SECONDS": "60",
            },
            {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
        )
        clock = FakeClock()
        build_core(settings, clock).dispose()

        async def main() -> None:
            server = AuthsvcServer(settings, clock)
            out = io.StringIO()
            await server.start(out)
            try:
                url = f"http://127.0.0.1:{server.http_port}"
                assert f"authsvc http listening on 127.0.0.1:{server.http_port}" in out.getvalue()
                assert (await asyncio.to_thread(http_get, url + "/readyz")).status == 200
                age0 = _gauge(await asyncio.to_thread(http_get, url + "/metrics"))
                clock.t += 601  # past 10 sync intervals
                reply = await asyncio.to_thread(http_get, url + "/readyz")
                assert reply.status == 503
                assert json.loads(reply.body)["checks"]["sync_recent"] is False
                assert (await asyncio.to_thread(http_get, url + "/healthz")).status == 200
                age1 = _gauge(await asyncio.to_thread(http_get, url + "/metrics"))
                assert age1 - age0 == 601
            finally:
                await server.stop()

        asyncio.run(main())

    def test_database_that_cannot_answer_is_not_ready(self, tmp_path: Path) -> None:
        settings = load_settings(
            {
                "AUTHSVC_KEK": TEST_KEK,
                "AUTHSVC_ISSUER": TEST_ISSUER,
                "AUTHSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
            },
            {"listen": "127.0.0.1:0"},
        )
        clock = FakeClock()
        core = build_core(settings, clock)
        core.manager.ensure_active()
        state = ServerState(core.repo, core.manager, clock)
        state.load()
        # A real repository over a database file that cannot be opened.
        missing = Repository(make_engine(f"sqlite:///{tmp_path / 'gone' / 'x.db'}"))
        port = HttpSidePort(
            "127.0.0.1:0",
            state=state,
            registry=CollectorRegistry(),
            clock=clock,
            ping=missing.ping,
            rotation_interval_seconds=settings.key_rotation_interval_seconds,
            readiness=ReadinessPolicy.for_sync_interval(settings.sync_interval_seconds),
            read_timeout_seconds=settings.http_read_timeout_seconds,
            max_connections=settings.http_max_connections,
        )
        port.start()
        try:
            reply = http_get(f"http://127.0.0.1:{port.port}/readyz")
            assert reply.status == 503
            assert json.loads(reply.body)["checks"]["database"] is False
        finally:
            port.stop()
            missing.engine.dispose()
            core.dispose()


def _gauge(reply: Reply) -> float:
    return samples(reply.text)[("authsvc_signing_key_active_age_seconds", frozenset())]


def _connect(ops: OpsServer) -> socket.socket:
    host, port = ops.base_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server ends the connection before the deadline (what it sends is ignored)."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


def _status(ops: OpsServer, path: str) -> int:
    """The answer's status, 0 for a connection refused or reset (a busy port may do either)."""
    try:
        return ops.get(path).status
    except OSError:
        return 0


class TestConnectionLimits:
    """Each connection holds a thread of the side port: none may hold it for long, and only so
    many at once."""

    def test_half_sent_idle_and_trickling_connections_are_closed_by_the_read_timeout(
        self, tmp_path: Path
    ) -> None:
        ops = start_ops_server(tmp_path, AUTHSVC_HTTP_READ_TIMEOUT_SECONDS="1")
        socks: list[socket.socket] = []
        stop = threading.Event()
        try:
            for _ in range(20):
                half = _connect(ops)
                half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                socks.append(half)
            socks += [_connect(ops) for _ in range(10)]
            # A header line a byte at a time, never finished: only a deadline for the whole
            # request ends it, not a timeout per read.
            trickle = _connect(ops)
            trickle.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")

            def drip() -> None:
                while not stop.wait(0.2):
                    try:
                        trickle.send(b"a")
                    except OSError:
                        return

            dripper = threading.Thread(target=drip, daemon=True)
            dripper.start()
            socks.append(trickle)
            deadline = time.monotonic() + 60
            assert [_closed_by_server(s, deadline) for s in socks] == [True] * len(socks)
            # Their threads are gone: a normal request is served.
            assert ops.get("/healthz").status == 200
        finally:
            stop.set()
            for s in socks:
                s.close()
            ops.server.stop()

    def test_connections_beyond_the_bound_are_answered_503_at_once(self, tmp_path: Path) -> None:
        ops = start_ops_server(
            tmp_path,
            AUTHSVC_HTTP_READ_TIMEOUT_SECONDS="120",
            AUTHSVC_HTTP_MAX_CONNECTIONS="4",
        )
        idle = [_connect(ops) for _ in range(4)]
        try:
            # Accepted in order: the fifth connection finds every slot taken.
            extra = _connect(ops)
            try:
                extra.settimeout(30)
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
            finally:
                extra.close()
            assert answer.startswith(b"HTTP/1.0 503 ")
            # A slot comes back when its connection ends.
            idle.pop().close()
            # (One request at a time: a second one sent the moment the first is answered can
            # arrive before its slot is released, and be the fifth.)
            deadline = time.monotonic() + 30
            status = _status(ops, "/healthz")
            while status != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
                status = _status(ops, "/healthz")
            assert status == 200
        finally:
            for s in idle:
                s.close()
            ops.server.stop()
