"""SIGKILL in the middle of `authsvc kek rotate`: afterwards every stored key is wrapped under one
KEK (the old one or the new one, never a mix), everything unwraps, every service secret still
logs in, and a server started with the KEK the database names starts and signs.

As in test_kill_during_rotation.py: on PostgreSQL the kill lands for certain inside the rotation's
transaction (the test holds the change-feed lock the re-wrap takes after rewriting signing_keys);
on SQLite kills land at spread-out moments of a run.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from authsvc.clock import to_datetime
from authsvc.config import load_settings
from authsvc.crypto.kek import KeyEncryptionKey
from authsvc.server.app import build_core
from authsvc.storage.engine import make_engine
from authsvc.storage.records import SECRET_HASH_KEY
from authsvc.storage.repository import Repository
from tests.faults.test_kill_during_rotation import (
    _CHANGES_LOCK,
    _sigkill,
    _wait_for_backend_blocked_after_writes,
    _wait_for_backend_gone,
    assert_server_signs_with,
    holding_change_lock,
)
from tests.storage.helpers import live_secrets
from tests.support.server import TEST_KEK, authsvc_command, base_env, run_cli, start_server

NEW_KEK = KeyEncryptionKey.generate_base64()


def _kek_ids(url: str) -> set[str | None]:
    """The kek id beside every stored wrapped item (signing keys and the secret-hash key)."""
    repo = Repository(make_engine(url))
    try:
        ids: set[str | None] = {
            k.kek_id for k in repo.list_signing_keys() if k.private_key_enc is not None
        }
        hash_key = repo.fetch_wrapped_key(SECRET_HASH_KEY)
        assert hash_key is not None
        ids.add(hash_key.kek_id)
        return ids
    finally:
        repo.engine.dispose()


def _check_consistent(env: Mapping[str, str], secrets: Mapping[str, str]) -> str:
    """One KEK wraps everything; with both KEKs held it all unwraps; every secret still matches.

    Returns the kek id that wraps it all.
    """
    ids = _kek_ids(env["AUTHSVC_DATABASE_URL"])
    assert len(ids) == 1, f"stored keys wrapped under {len(ids)} KEKs at once"
    both = {**env, "AUTHSVC_KEK": NEW_KEK, "AUTHSVC_KEK_PREVIOUS": TEST_KEK}
    core = build_core(load_settings(both, {}), upgrade=False)
    try:
        for record in core.repo.list_signing_keys():
            if record.private_key_enc is not None:
                core.manager.private_key(record)  # a DecryptError fails the test
        for service_id, secret in secrets.items():
            stored = live_secrets(core.repo, service_id, to_datetime(time.time()))
            assert any(core.hasher.verify(secret, h) for _, h in stored)
    finally:
        core.dispose()
    kek_id = ids.pop()
    assert kek_id is not None
    return kek_id


def _setup(env: Mapping[str, str]) -> dict[str, str]:
    run_cli(env, "db", "upgrade")
    secrets = {}
    for name in ("orders", "billing"):
        created = run_cli(env, "services", "create", name, "--audience", "api", "--json")
        secrets[name] = str(json.loads(created.stdout)["service_secret"])
    run_cli(env, "keys", "rotate")
    run_cli(env, "keys", "rotate")
    return secrets


def _rotate_process(env: Mapping[str, str], new: str = NEW_KEK) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*authsvc_command(), "kek", "rotate"],
        env={**env, "AUTHSVC_NEW_KEK": new},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def _after_rotation(env: Mapping[str, str], secrets: Mapping[str, str]) -> None:
    """The new KEK alone serves every old secret; the old KEK alone refuses, naming the
    variables and showing neither KEK."""
    new_env = {**env, "AUTHSVC_KEK": NEW_KEK}
    server = start_server(new_env)
    try:
        for name, secret in secrets.items():
            assert server.issue(name, secret, "api").access_token
    finally:
        server.stop()
    assert TEST_KEK not in "".join(server.output) and NEW_KEK not in "".join(server.output)
    proc = subprocess.run(
        [*authsvc_command(), "serve", "--listen", "127.0.0.1:0"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "AUTHSVC_KEK_PREVIOUS" in out and "kek rotate" in out
    assert TEST_KEK not in out and NEW_KEK not in out


class TestSigkillDuringKekRotationOnSqlite:
    def test_kek_rotate_killed_at_spread_out_moments(self, tmp_path: Path) -> None:
        env = base_env(f"sqlite:///{tmp_path / 'authsvc.db'}")
        secrets = _setup(env)
        # Each run rotates to the other KEK, so every run has the whole re-wrap to do.
        keks = {_check_consistent(env, secrets): TEST_KEK}
        keks[KeyEncryptionKey.from_base64(NEW_KEK).kek_id] = NEW_KEK
        started = time.monotonic()
        run_cli({**env, "AUTHSVC_NEW_KEK": NEW_KEK}, "kek", "rotate")
        full_run = time.monotonic() - started
        rng = random.Random(17)
        outcomes = {"completed": 0, "killed after commit": 0, "killed before commit": 0}
        runs = 10
        for i in range(runs):
            before = _check_consistent(env, secrets)
            (other,) = (text for kek_id, text in keks.items() if kek_id != before)
            proc = _rotate_process({**env, "AUTHSVC_KEK": keks[before]}, other)
            # Most of a run is interpreter start-up: aim at its second half and past its end.
            time.sleep(full_run * (0.5 + 0.8 * i / (runs - 1)) * rng.uniform(0.9, 1.1))
            code = _sigkill(proc)
            after = _check_consistent(env, secrets)
            if code == 0:
                outcomes["completed"] += 1
            else:
                assert code == -signal.SIGKILL
                outcomes[f"killed {'after' if after != before else 'before'} commit"] += 1
        current = _check_consistent(env, secrets)
        if keks[current] == TEST_KEK:
            run_cli({**env, "AUTHSVC_NEW_KEK": NEW_KEK}, "kek", "rotate")
        _after_rotation(env, secrets)
        print(f"\nkek rotate ({full_run:.2f} s per run) under SIGKILL, {runs} runs: {outcomes}")


@pytest.mark.postgres
class TestSigkillInsideTheKekRotationTransactionOnPostgres:
    def test_kek_rotate_killed_with_uncommitted_writes(self, postgres_url: str) -> None:
        env = base_env(postgres_url)
        secrets = _setup(env)
        old_id = _check_consistent(env, secrets)
        active = [
            k["key_id"]
            for k in json.loads(run_cli(env, "keys", "list", "--json").stdout)
            if k["state"] == "active"
        ]
        with holding_change_lock(postgres_url) as conn:
            proc = _rotate_process(env)
            try:
                pid = _wait_for_backend_blocked_after_writes(conn)
            finally:
                code = _sigkill(proc)
            assert code == -signal.SIGKILL
            conn.execute("SELECT pg_advisory_unlock(%s)", (_CHANGES_LOCK,))
            _wait_for_backend_gone(conn, pid)
        assert _check_consistent(env, secrets) == old_id  # the half-done re-wrap left no trace
        run_cli({**env, "AUTHSVC_NEW_KEK": NEW_KEK}, "kek", "rotate")  # and nothing is locked
        assert _check_consistent(env, secrets) != old_id
        _after_rotation(env, secrets)
        assert_server_signs_with({**env, "AUTHSVC_KEK": NEW_KEK}, active[0])

