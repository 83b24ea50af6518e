"""SIGKILL in the middle of a signing-key rotation: afterwards exactly one key is active, every
stored private key decrypts under the KEK, and a server starts and signs with the active key.

On PostgreSQL the kill is placed for certain: the test holds the advisory lock the rotation
takes last (the change-feed lock), so the rotating process waits inside its transaction with the
old key already retired and the new one inserted (seen in pg_locks), and dies there. On SQLite
(one writer, no such hook) kills land at spread-out moments of a rotation's run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from authsvc.config import load_settings
from authsvc.server.app import Core, build_core
from authsvc.storage import repository
from authsvc_client.v1 import auth_pb2
from tests.support.server import authsvc_command, base_env, run_cli, start_server

# The lock Repository._add_change takes after a rotation's writes (see module docstring).
_CHANGES_LOCK = repository._LOCK_CHANGES


def _key_states(env: Mapping[str, str]) -> dict[str, str]:
    rows = json.loads(run_cli(env, "keys", "list", "--json").stdout)
    return {row["key_id"]: row["state"] for row in rows}


def _active(env: Mapping[str, str]) -> str:
    active = [kid for kid, state in _key_states(env).items() if state == "active"]
    assert len(active) == 1, f"expected exactly one active key, found {len(active)}"
    return active[0]


@contextmanager
def opened_core(env: Mapping[str, str]) -> Iterator[Core]:
    core = build_core(load_settings(dict(env), {}), upgrade=False)
    try:
        yield core
    finally:
        core.dispose()


def check_keys(core: Core) -> str:
    """Exactly one active key; every stored private part decrypts; returns the active kid."""
    records = core.repo.list_signing_keys()
    active = [r.kid for r in records if r.state == "active"]
    assert len(active) == 1, f"expected exactly one active key, found {len(active)}"
    with_private = [r for r in records if r.private_key_enc is not None]
    assert active[0] in {r.kid for r in with_private}
    for record in with_private:
        core.manager.private_key(record)  # a DecryptError fails the test
    return active[0]


def assert_keys_consistent(env: Mapping[str, str]) -> str:
    """check_keys, plus what `authsvc keys list` shows ops."""
    with opened_core(env) as core:
        active = check_keys(core)
    assert _active(env) == active
    return active


def assert_server_signs_with(env: Mapping[str, str], kid: str) -> None:
    """A server starts on this database and signs with `kid`; the token validates."""
    server = start_server(env)
    try:
        name = f"svc-{os.urandom(4).hex()}"
        secret = server.create_service(name, ["billing"])
        reply = server.issue(name, secret, "billing")
        assert reply.key_id == kid
        check = server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=reply.access_token, audience="billing"), timeout=10
        )
        assert check.valid
    finally:
        server.stop()


def _rotate_process(env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*authsvc_command(), "keys", "rotate"],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def _sigkill(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)


class TestSigkillDuringRotationOnSqlite:
    def test_keys_rotate_killed_at_spread_out_moments(self, tmp_path: Path) -> None:
        env = base_env(f"sqlite:///{tmp_path / 'authsvc.db'}")
        run_cli(env, "db", "upgrade")
        started = time.monotonic()
        run_cli(env, "keys", "rotate")
        full_run = time.monotonic() - started
        rng = random.Random(6)
        outcomes = {"completed": 0, "killed after commit": 0, "killed before commit": 0}
        runs = 10
        with opened_core(env) as core:
            before = check_keys(core)
            for i in range(runs):
                # Most of a run is interpreter start-up; aim at its second half and past it.
                delay = full_run * (0.4 + 0.7 * i / (runs - 1)) * rng.uniform(0.9, 1.1)
                proc = _rotate_process(env)
                time.sleep(delay)
                code = _sigkill(proc)
                after = check_keys(core)
                if code == 0:
                    outcomes["completed"] += 1
                else:
                    assert code == -signal.SIGKILL
                    key = "after" if after != before else "before"
                    outcomes[f"killed {key} commit"] += 1
                before = after
        active = assert_keys_consistent(env)
        assert_server_signs_with(env, active)
        print(f"\nkeys rotate ({full_run:.2f} s per run) under SIGKILL, {runs} runs: {outcomes}")

    def test_server_killed_during_rotate_signing_key(self, tmp_path: Path) -> None:
        env = base_env(f"sqlite:///{tmp_path / 'authsvc.db'}")
        run_cli(env, "db", "upgrade")
        created = run_cli(env, "services", "create", "ops", "--admin", "--json")
        admin_secret = str(json.loads(created.stdout)["service_secret"])
        rng = random.Random(66)
        for _ in range(3):
            server = start_server(env)
            token = server.issue("ops", admin_secret, "authsvc").access_token
            call = server.stub.RotateSigningKey.future(
                auth_pb2.RotateSigningKeyRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=30,
            )
            # RSA generation plus one transaction take a few tens of milliseconds.
            time.sleep(rng.uniform(0.0, 0.15))
            server.proc.send_signal(signal.SIGKILL)
            assert server.proc.wait(timeout=30) == -signal.SIGKILL
            server.close_output()
            call.cancel()
            assert_keys_consistent(env)
        assert_server_signs_with(env, assert_keys_consistent(env))


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def holding_change_lock(url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Hold the change-feed advisory lock, so a rotation waits inside its transaction."""
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_CHANGES_LOCK,))
        yield conn


def _wait_for_backend_blocked_after_writes(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The pid of a backend waiting for the advisory lock with signing_keys rows written."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "JOIN pg_class c ON c.oid = l.relation "
            "WHERE a.datname = current_database() AND a.wait_event_type = 'Lock' "
            "AND a.wait_event = 'advisory' AND c.relname = 'signing_keys' "
            "AND l.mode = 'RowExclusiveLock' AND l.granted"
        ).fetchone()
        if row is not None:
            return int(str(row[0]))
        time.sleep(0.02)
    raise AssertionError("no rotation reached the waiting point")


def _wait_for_backend_gone(conn: psycopg.Connection[tuple[object, ...]], pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None:
            return
        time.sleep(0.02)
    raise AssertionError("the killed client's backend did not end")


@pytest.mark.postgres
class TestSigkillInsideTheRotationTransactionOnPostgres:
    def test_keys_rotate_killed_with_uncommitted_writes(self, postgres_url: str) -> None:
        env = base_env(postgres_url)
        run_cli(env, "db", "upgrade")
        run_cli(env, "keys", "rotate")
        old = assert_keys_consistent(env)
        with holding_change_lock(postgres_url) as conn:
            proc = _rotate_process(env)
            try:
                pid = _wait_for_backend_blocked_after_writes(conn)
            finally:
                code = _sigkill(proc)
            assert code == -signal.SIGKILL
            conn.execute("SELECT pg_advisory_unlock(%s)", (_CHANGES_LOCK,))
            _wait_for_backend_gone(conn, pid)
        assert assert_keys_consistent(env) == old  # the half-done rotation left no trace
        run_cli(env, "keys", "rotate")  # and nothing is left locked
        new = assert_keys_consistent(env)
        assert new != old
        assert_server_signs_with(env, new)

    def test_server_killed_inside_rotate_signing_key(self, postgres_url: str) -> None:
        env = base_env(postgres_url)
        run_cli(env, "db", "upgrade")
        created = run_cli(env, "services", "create", "ops", "--admin", "--json")
        admin_secret = str(json.loads(created.stdout)["service_secret"])
        server = start_server(env)
        old = assert_keys_consistent(env)
        token = server.issue("ops", admin_secret, "authsvc").access_token
        with holding_change_lock(postgres_url) as conn:
            call = server.stub.RotateSigningKey.future(
                auth_pb2.RotateSigningKeyRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=60,
            )
            try:
                pid = _wait_for_backend_blocked_after_writes(conn)
            finally:
                server.proc.send_signal(signal.SIGKILL)
                assert server.proc.wait(timeout=30) == -signal.SIGKILL
                server.close_output()
                call.cancel()
            conn.execute("SELECT pg_advisory_unlock(%s)", (_CHANGES_LOCK,))
            _wait_for_backend_gone(conn, pid)
        assert assert_keys_consistent(env) == old
        assert_server_signs_with(env, old)
