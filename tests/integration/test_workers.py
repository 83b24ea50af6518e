"""`authsvc serve --workers N`: several processes on one port behave as one server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.integration.conftest import sqlite_env
from tests.support.server import run_cli, start_server


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


class TestWorkers:
    def test_two_workers_share_the_port_and_stop_together(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        server = start_server(env, "--workers", "2")
        try:
            assert "2 workers" in "".join(server.output)
            workers = _workers_of(server.proc.pid)
            assert len(workers) == 2
            secret = server.create_service("orders", ["billing"], [])
            tokens = []
            # A new channel per call: SO_REUSEPORT spreads new connections over both workers.
            for _ in range(12):
                with grpc.insecure_channel(server.address) as channel:
                    stub = auth_pb2_grpc.AuthServiceStub(channel)
                    tokens.append(
                        stub.IssueToken(
                            auth_pb2.IssueTokenRequest(
                                service_id="orders", service_secret=secret, audience="billing"
                            ),
                            timeout=10,
                        ).access_token
                    )
                    health = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=10
                    )
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
            # A revocation through one connection reaches every worker within the sync bound.
            assert server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(token=tokens[0]), timeout=10
            ).revoked
            # Polled, not slept on: a loaded machine may run a worker's sync loop late. Done
            # when eight fresh connections in a row (spread over the workers) all see it.
            deadline = time.monotonic() + 30
            while True:
                seen = []
                for _ in range(8):
                    with grpc.insecure_channel(server.address) as channel:
                        reply = auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(
                            auth_pb2.ValidateTokenRequest(token=tokens[0], audience="billing"),
                            timeout=10,
                        )
                        seen.append(reply.reason)
                        reply = auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(
                            auth_pb2.ValidateTokenRequest(token=tokens[1], audience="billing"),
                            timeout=10,
                        )
                        assert reply.valid
                if seen == [auth_pb2.REVOKED] * 8 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert seen == [auth_pb2.REVOKED] * 8
        finally:
            code = server.stop()
        assert code == 0
        for pid in workers:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
            )

    def test_a_worker_that_dies_stops_the_group(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        server = start_server(env, "--workers", "2")
        workers = _workers_of(server.proc.pid)
        subprocess.run(["kill", "-9", str(workers[1])], check=True)
        assert server.proc.wait(30) == 1
        server.close_output()
