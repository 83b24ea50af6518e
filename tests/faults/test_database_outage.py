"""PostgreSQL stops while a server is serving, then comes back (a private cluster per test).

What a user sees during the outage: ValidateToken, GetJwks and revocations already synced go on
from memory; IssueToken and RevokeToken answer UNAVAILABLE (never UNAUTHENTICATED, even for a
wrong secret, and never INTERNAL); the gRPC health entry `authsvc.database` is NOT_SERVING and
/readyz is 503 while the server itself and AuthService stay SERVING. Once the database is back
everything recovers without a restart.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authsvc.server.app import DATABASE_HEALTH_SERVICE, SERVICE_NAME
from authsvc_client.v1 import auth_pb2
from tests.faults.conftest import PrivatePostgres
from tests.support.server import RunningServer, base_env, run_cli, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(server: RunningServer, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def _readyz(server: RunningServer) -> tuple[int, dict[str, Any]]:
    line = next(x for x in server.output if x.startswith("authsvc http listening on "))
    url = f"http://{line.split()[4]}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


def _database_up(server: RunningServer) -> float:
    """The authsvc_database_up gauge (the database alert's input) from /metrics."""
    line = next(x for x in server.output if x.startswith("authsvc http listening on "))
    with urllib.request.urlopen(f"http://{line.split()[4]}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "authsvc_database_up":
                return float(sample.value)
    raise AssertionError("no authsvc_database_up in /metrics")


def _wait_for(condition: Callable[[], bool], timeout: float = 15) -> float:
    """Seconds until `condition` held (AssertionError after `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, float]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), time.monotonic() - start


@pytest.mark.postgres
class TestPostgresStoppedWhileServing:
    def test_validation_goes_on_writes_are_unavailable_and_it_recovers_without_restart(
        self, private_postgres: PrivatePostgres
    ) -> None:
        pg = private_postgres
        env = base_env(pg.url, AUTHSVC_HTTP_LISTEN="127.0.0.1:0")
        run_cli(env, "db", "upgrade")
        server = start_server(env)
        try:
            secret = server.create_service("orders", ["billing"], ["billing.read"])
            token = server.issue("orders", secret, "billing").access_token
            revoked = server.issue("orders", secret, "billing").access_token
            server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=revoked), timeout=10)

            def validate(t: str) -> auth_pb2.ValidateTokenResponse:
                return server.stub.ValidateToken(  # type: ignore[no-any-return]
                    auth_pb2.ValidateTokenRequest(token=t, audience="billing"), timeout=5
                )

            stopped_at = time.monotonic()
            pg.stop()
            detected = _wait_for(lambda: _health(server, DATABASE_HEALTH_SERVICE) == NOT_SERVING)
            detected_after = time.monotonic() - stopped_at

            # From memory: a good token is valid, a revoked one stays REVOKED, JWKS is served.
            assert validate(token).valid
            assert validate(revoked).reason == auth_pb2.REVOKED
            assert json.loads(server.stub.GetJwks(auth_pb2.GetJwksRequest()).jwks_json)["keys"]

            # Writes: UNAVAILABLE, promptly, also for a wrong secret (no guessing oracle, and a
            # caller's retry logic sees the right code).
            issue_code, issue_s = _code(lambda: server.issue("orders", secret, "billing"))
            wrong_code, _ = _code(lambda: server.issue("orders", "as_wrong" + "0" * 40, "billing"))
            revoke_code, revoke_s = _code(
                lambda: server.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=token), timeout=10
                )
            )
            assert (issue_code, wrong_code, revoke_code) == (grpc.StatusCode.UNAVAILABLE,) * 3
            assert max(issue_s, revoke_s) < 6  # bounded by the connect timeout, never hangs

            # Health: the process and AuthService stay SERVING; the database entry and /readyz
            # say what is wrong.
            assert _health(server, "") == SERVING
            assert _health(server, SERVICE_NAME) == SERVING
            status, body = _readyz(server)
            assert status == 503 and body["checks"]["database"] is False
            assert _database_up(server) == 0
            probe = ("health", "--target", server.address, "--service", DATABASE_HEALTH_SERVICE)
            assert run_cli(env, *probe, check=False).returncode != 0
            assert server.proc.poll() is None

            restarted_at = time.monotonic()
            pg.start()
            recovered = _wait_for(lambda: _health(server, DATABASE_HEALTH_SERVICE) == SERVING)
            recovered_after = time.monotonic() - restarted_at

            fresh = server.issue("orders", secret, "billing").access_token
            assert validate(fresh).valid
            server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=10)
            _wait_for(lambda: validate(token).reason == auth_pb2.REVOKED)
            assert _readyz(server)[0] == 200
            assert _database_up(server) == 1
            assert run_cli(env, *probe, check=False).returncode == 0
            print(
                f"\ndatabase outage: detected {detected_after:.2f} s after stop "
                f"(poll {detected:.2f} s), IssueToken UNAVAILABLE in {issue_s * 1000:.0f} ms, "
                f"RevokeToken in {revoke_s * 1000:.0f} ms, recovered {recovered_after:.2f} s "
                f"after restart (poll {recovered:.2f} s)"
            )
        finally:
            server.stop()
