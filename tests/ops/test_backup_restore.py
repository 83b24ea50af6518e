"""Backup and restore into a fresh deployment with the same KEK: tokens issued before the backup
validate, revocations hold, secrets log in; under another KEK the restored copy refuses to start.

SQLite: `authsvc db backup PATH` (the online backup API) beside a server that keeps writing.
PostgreSQL: pg_dump / pg_restore as README documents them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from authsvc_client.v1 import auth_pb2
from tests.support.postgres import fresh_postgres_database, postgres_url  # noqa: F401
from tests.support.server import (
    TEST_KEK,
    RunningServer,
    authsvc_command,
    base_env,
    run_cli,
    start_server,
)

OTHER_KEK = "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs="
REVOKED = auth_pb2.ValidationFailure.Value("REVOKED")


@dataclass
class Before:
    """What the deployment held when the backup was taken."""

    secret: str = field(repr=False)
    kept: str
    revoked: str


def _populate(server: RunningServer) -> Before:
    secret = server.create_service("orders", ["api"])
    kept = server.issue("orders", secret, "api").access_token
    revoked = server.issue("orders", secret, "api").access_token
    assert server.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token=revoked, reason="test"), timeout=10
    ).revoked
    return Before(secret=secret, kept=kept, revoked=revoked)


def _while_writing(server: RunningServer, secret: str, backup: Callable[[], object]) -> None:
    """Run `backup` while another thread keeps logging in (each login writes audit rows)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def login_loop() -> None:
        for _ in range(5000):  # bounded; ends at once when the backup is done
            if done.is_set():
                return
            try:
                server.issue("orders", secret, "api")
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=login_loop)
    thread.start()
    try:
        backup()
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors


def _check_restored(env: dict[str, str], before: Before) -> None:
    server = start_server(env)
    try:
        for token, valid in ((before.kept, True), (before.revoked, False)):
            reply = server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=token, audience="api"), timeout=10
            )
            assert reply.valid is valid
            if not valid:
                assert reply.reason == REVOKED
        assert server.issue("orders", before.secret, "api").access_token
    finally:
        server.stop()
    proc = subprocess.run(
        [*authsvc_command(), "serve", "--listen", "127.0.0.1:0"],
        env={**env, "AUTHSVC_KEK": OTHER_KEK},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "AUTHSVC_KEK" in out and OTHER_KEK not in out and TEST_KEK not in out


class TestSqliteBackup:
    def test_backup_beside_a_running_server_restores_into_a_fresh_deployment(
        self, tmp_path: Path
    ) -> None:
        live = tmp_path / "live"
        live.mkdir()
        env = base_env(f"sqlite:///{live / 'authsvc.db'}")
        run_cli(env, "db", "upgrade")
        server = start_server(env)
        backup = tmp_path / "backup.db"
        try:
            before = _populate(server)
            _while_writing(server, before.secret, lambda: run_cli(env, "db", "backup", str(backup)))
        finally:
            server.stop()
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
        # Restore (README): the backup file becomes the new deployment's database.
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        shutil.copy2(backup, fresh / "authsvc.db")
        _check_restored(base_env(f"sqlite:///{fresh / 'authsvc.db'}"), before)

    def test_backup_refuses_to_overwrite_and_points_postgres_to_pg_dump(
        self, tmp_path: Path
    ) -> None:
        env = base_env(f"sqlite:///{tmp_path / 'authsvc.db'}")
        run_cli(env, "db", "upgrade")
        taken = tmp_path / "taken.db"
        taken.write_text("keep me")
        refused = run_cli(env, "db", "backup", str(taken), check=False)
        assert refused.returncode != 0 and "exists" in refused.stderr
        assert taken.read_text() == "keep me"
        pg = base_env("postgresql+psycopg://postgres@127.0.0.1:5432/none")
        refused = run_cli(pg, "db", "backup", str(tmp_path / "x.db"), check=False)
        assert refused.returncode != 0 and "pg_dump" in refused.stderr
        assert not (tmp_path / "x.db").exists()


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not found (CI is set, so the PostgreSQL tests must run)")
        pytest.skip(f"{name} not found")
    return path


@pytest.mark.postgres
class TestPostgresDumpAndRestore:
    def test_pg_dump_restores_into_a_fresh_database(
        self, postgres_url: str, tmp_path: Path  # noqa: F811 - the fixture
    ) -> None:
        env = base_env(postgres_url)
        run_cli(env, "db", "upgrade")
        server = start_server(env)
        dump = tmp_path / "authsvc.dump"
        try:
            before = _populate(server)

            def pg_dump() -> None:
                subprocess.run(
                    [_pg_tool("pg_dump"), "--format=custom", "--file", str(dump),
                     _libpq(postgres_url)],
                    check=True, capture_output=True, timeout=120,
                )  # fmt: skip

            _while_writing(server, before.secret, pg_dump)
        finally:
            server.stop()
        with fresh_postgres_database() as restored:
            subprocess.run(
                [_pg_tool("pg_restore"), "--no-owner", "--exit-on-error", "--dbname",
                 _libpq(restored), str(dump)],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            _check_restored(base_env(restored), before)
