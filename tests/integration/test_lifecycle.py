"""Process lifecycle: start-up checks, dev mode, shutdown, restart, replicas on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import sqlite_env
from tests.support.server import (
    TEST_KEK,
    authsvc_command,
    base_env,
    run_cli,
    running_server,
    start_server,
)


def _serve_fails(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [*authsvc_command(), "serve", "--listen", "127.0.0.1:0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


class TestFailFast:
    def test_refuses_to_start_without_a_kek_and_names_it(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        del env["AUTHSVC_KEK"]
        assert "AUTHSVC_KEK" in _serve_fails(env)

    def test_refuses_to_start_without_an_issuer(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        del env["AUTHSVC_ISSUER"]
        assert "AUTHSVC_ISSUER" in _serve_fails(env)

    @pytest.mark.parametrize(
        "kek",
        [
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  # 32 zero bytes
            "c2hvcnQ=",  # too short
            "not base64 at all!",
            "Y2hhbmdlbWVjaGFuZ2VtZWNoYW5nZW1lY2hhbmdlbWU=",  # "changeme" repeated
        ],
    )
    def test_refuses_a_weak_or_bad_kek_without_echoing_it(self, tmp_path: Path, kek: str) -> None:
        env = sqlite_env(tmp_path, AUTHSVC_KEK=kek)
        out = _serve_fails(env)
        assert "AUTHSVC_KEK" in out
        assert kek not in out

    def test_refuses_plaintext_on_a_public_address(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        proc = subprocess.run(
            [*authsvc_command(), "serve", "--listen", "0.0.0.0:0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode != 0
        assert "plaintext" in proc.stderr

    def test_wrong_kek_refuses_to_start_rather_than_minting_keys(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        with running_server(env) as server:
            first = run_cli(server.env, "keys", "list", "--json").stdout
        other = sqlite_env(tmp_path, AUTHSVC_KEK="3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs=")
        assert "AUTHSVC_KEK" in _serve_fails(other)
        assert run_cli(env, "keys", "list", "--json").stdout == first

    def test_kek_file_must_be_private(self, tmp_path: Path) -> None:
        kek_file = tmp_path / "kek"
        kek_file.write_text(TEST_KEK + "\n")
        kek_file.chmod(0o644)
        env = sqlite_env(tmp_path, AUTHSVC_KEK_FILE=str(kek_file))
        del env["AUTHSVC_KEK"]
        assert "AUTHSVC_KEK_FILE" in _serve_fails(env)
        kek_file.chmod(0o600)
        with running_server(env) as server:
            assert server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json


class TestDevMode:
    def test_dev_mode_is_loud_keeps_state_locally_and_prints_an_admin_once(
        self, tmp_path: Path
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
        env["PYTHONUNBUFFERED"] = "1"
        dev_dir = tmp_path / "dev"
        server = start_server(env, "--dev", "--dev-dir", str(dev_dir))
        try:
            output = "".join(server.output)
            lines = dict(
                line.strip().split("=", 1) for line in server.output if "AUTHSVC_SERVICE_" in line
            )
            token = server.issue(
                lines["AUTHSVC_SERVICE_ID"], lines["AUTHSVC_SERVICE_SECRET"], "authsvc"
            ).access_token
            assert token
        finally:
            assert server.stop() == 0
        assert "DEV MODE" in output
        assert stat.S_IMODE((dev_dir / "kek").stat().st_mode) == 0o600
        assert (dev_dir / "authsvc.db").exists()
        again = start_server(env, "--dev", "--dev-dir", str(dev_dir))
        try:
            # Same KEK and database: the first admin still works and is not printed again.
            server2_output = "".join(again.output)
            assert "AUTHSVC_SERVICE_SECRET" not in server2_output
            assert again.issue(
                lines["AUTHSVC_SERVICE_ID"], lines["AUTHSVC_SERVICE_SECRET"], "authsvc"
            ).access_token
        finally:
            again.stop()

    def test_dev_mode_refuses_a_public_address(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
        proc = subprocess.run(
            [
                *authsvc_command(),
                "serve",
                "--dev",
                "--dev-dir",
                str(tmp_path),
                "--listen",
                "0.0.0.0:0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode != 0 and "loopback" in proc.stderr


class TestEventLoop:
    @pytest.mark.parametrize(("choice", "loop"), [("", "uvloop"), ("asyncio", "asyncio")])
    def test_serves_and_drains_on_the_configured_event_loop(
        self, tmp_path: Path, choice: str, loop: str
    ) -> None:
        server = start_server({**sqlite_env(tmp_path), "AUTHSVC_EVENT_LOOP": choice})
        secret = server.create_service("orders", ["billing"], ["billing.read"])
        token = server.issue("orders", secret, "billing", ["billing.read"]).access_token
        answer = server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
        )
        assert answer.valid
        assert f"event loop {loop}" in "".join(server.output)
        assert server.stop() == 0

    def test_an_unknown_event_loop_is_refused_by_name(self, tmp_path: Path) -> None:
        proc = subprocess.run(
            [*authsvc_command(), "serve", "--listen", "127.0.0.1:0"],
            env={**sqlite_env(tmp_path), "AUTHSVC_EVENT_LOOP": "trio"},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode != 0 and "AUTHSVC_EVENT_LOOP" in proc.stderr


class TestShutdownAndRestart:
    def test_sigterm_drains_in_flight_calls_and_exits_zero(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        server = start_server(env)
        admin = server.create_service("admin", [], [], admin=True)
        token = server.issue("admin", admin, "authsvc").access_token
        results: list[object] = []

        def slow_call() -> None:
            # Revoking by service waits for the next whole second: an in-flight call at SIGTERM.
            try:
                results.append(
                    server.stub.RevokeToken(
                        auth_pb2.RevokeTokenRequest(service_id="admin"),
                        metadata=[("authorization", f"Bearer {token}")],
                        timeout=20,
                    ).revoked
                )
            except grpc.RpcError as exc:  # pragma: no cover - shows in the assertion
                results.append(exc)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        caller.join(30)
        assert server.stop() == 0
        assert results == [True]

    def test_restart_keeps_services_keys_and_revocations(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        with running_server(env) as server:
            secret = server.create_service("orders", ["billing"], [])
            revoked = server.issue("orders", secret, "billing").access_token
            kept = server.issue("orders", secret, "billing")
            assert server.stub.RevokeToken(
                auth_pb2.RevokeTokenRequest(token=revoked), timeout=10
            ).revoked
        with running_server(env) as server:
            v = server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=kept.access_token, audience="billing"),
                timeout=10,
            )
            assert v.valid and v.claims.key_id == kept.key_id
            v = server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=revoked, audience="billing"), timeout=10
            )
            assert v.reason == auth_pb2.REVOKED
            assert server.issue("orders", secret, "billing").key_id == kept.key_id


class TestCli:
    def test_walkthrough_commands(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        with running_server(env) as server:
            creds = run_cli(
                env,
                "services",
                "create",
                "orders",
                "--audience",
                "billing",
                "--scope",
                "billing.read",
                "--format",
                "env",
            ).stdout
            pairs = dict(line.split("=", 1) for line in creds.strip().splitlines())
            assert set(pairs) == {"AUTHSVC_SERVICE_ID", "AUTHSVC_SERVICE_SECRET"}
            client_env = {**env, **pairs, "AUTHSVC_TARGET": server.address}
            token = run_cli(client_env, "token", "issue", "--audience", "billing").stdout.strip()
            ok = run_cli(client_env, "token", "validate", token, "--audience", "billing")
            assert json.loads(ok.stdout)["valid"] is True
            bad = run_cli(client_env, "token", "validate", token, "--audience", "x", check=False)
            assert bad.returncode == 1 and json.loads(bad.stdout)["reason"] == "WRONG_AUDIENCE"
            assert json.loads(run_cli(client_env, "token", "revoke", "--token", token).stdout) == {
                "revoked": True
            }
            out = run_cli(
                client_env,
                "token",
                "validate",
                "-",
                "--audience",
                "billing",
                check=False,
                input_text=token,
            )
            assert json.loads(out.stdout)["reason"] == "REVOKED"
            listed = json.loads(run_cli(env, "services", "list", "--json").stdout)
            assert [s["service_id"] for s in listed] == ["orders"]
            before = json.loads(run_cli(env, "keys", "list", "--json").stdout)
            run_cli(env, "keys", "rotate")
            after = json.loads(run_cli(env, "keys", "list", "--json").stdout)
            assert len(after) == len(before) + 1
            assert [k["state"] for k in after].count("active") == 1
            # The running server picks up a rotation made beside it within its sync interval.
            active = next(k["key_id"] for k in after if k["state"] == "active")
            # Each try starts a CLI process: seconds apiece on a loaded machine.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                issued = run_cli(client_env, "token", "issue", "--audience", "billing", "--json")
                if json.loads(issued.stdout)["key_id"] == active:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("server did not pick up the new key")
            run_cli(env, "services", "disable", "orders")
            denied = run_cli(client_env, "token", "issue", "--audience", "billing", check=False)
            assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr

    def test_duplicate_service_is_a_clear_error(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        run_cli(env, "services", "create", "orders", "--audience", "billing")
        again = run_cli(env, "services", "create", "orders", "--audience", "billing", check=False)
        assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.postgres
class TestPostgresReplicas:
    def test_two_processes_rotating_at_once_leave_one_active_key(self, postgres_url: str) -> None:
        env = base_env(postgres_url)
        run_cli(env, "db", "upgrade")
        run_cli(env, "keys", "rotate")
        for _ in range(3):
            procs = [
                subprocess.Popen(
                    [*authsvc_command(), "keys", "rotate"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            for p in procs:
                p.communicate(timeout=60)
                assert p.returncode == 0
            keys = json.loads(run_cli(env, "keys", "list", "--json").stdout)
            assert [k["state"] for k in keys].count("active") == 1
            assert [k["state"] for k in keys].count("next") == 1

    def test_a_change_on_one_replica_is_seen_by_the_other_within_one_second(
        self, postgres_url: str
    ) -> None:
        """README's bound, measured with the default sync interval (0.5 s): a revocation, a
        disabled service and an emergency key rotation made through replica A reach replica B's
        ValidateToken within 1 s of A's answer."""
        env = base_env(postgres_url)
        env.pop("AUTHSVC_SYNC_INTERVAL_SECONDS")  # the configured default, not the tests' 0.2 s
        run_cli(env, "db", "upgrade")
        with running_server(env) as a, running_server(env) as b:
            admin_secret = a.create_service("ops", [], [], admin=True)
            admin = [
                ("authorization", f"Bearer {a.issue('ops', admin_secret, 'authsvc').access_token}")
            ]
            secret = a.create_service("orders", ["billing"], [])
            other = a.create_service("payments", ["billing"], [])

            def seen_by_b(token: str, reason: int) -> float:
                """Seconds from now until B validates `token` with `reason` (at most 5)."""
                start = time.monotonic()
                while time.monotonic() - start < 5:
                    v = b.stub.ValidateToken(
                        auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
                    )
                    if v.reason == reason:
                        return time.monotonic() - start
                    time.sleep(0.01)
                pytest.fail(f"replica B never answered {auth_pb2.ValidationFailure.Name(reason)}")

            delays = []
            for _ in range(3):
                token = a.issue("orders", secret, "billing").access_token
                assert seen_by_b(token, auth_pb2.VALIDATION_FAILURE_UNSPECIFIED) < 1.0
                assert a.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=token), timeout=10
                ).revoked
                delays.append(seen_by_b(token, auth_pb2.REVOKED))
            token = a.issue("payments", other, "billing").access_token
            a.stub.DisableService(
                auth_pb2.DisableServiceRequest(service_id="payments"), metadata=admin, timeout=10
            )
            delays.append(seen_by_b(token, auth_pb2.SERVICE_DISABLED))
            token = a.issue("orders", secret, "billing").access_token
            a.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(revoke_previous=True), metadata=admin, timeout=30
            )
            delays.append(seen_by_b(token, auth_pb2.UNKNOWN_KEY))
            assert max(delays) < 1.0, delays
