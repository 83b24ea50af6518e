"""A KEK roll without downtime, on real servers sharing one database (SQLite and PostgreSQL).

The documented order (README, Operations): restart each replica with the new KEK as AUTHSVC_KEK
and the old one as AUTHSVC_KEK_PREVIOUS, run `authsvc kek rotate`, then drop
AUTHSVC_KEK_PREVIOUS. Replicas of every stage read each other's writes while it happens, and a
replica forgotten with the old KEK only can no longer write a key the others could not read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from authsvc.crypto.kek import KeyEncryptionKey
from authsvc_client.v1 import auth_pb2
from tests.support.server import TEST_KEK, RunningServer, base_env, run_cli, start_server

NEW_KEK = KeyEncryptionKey.generate_base64()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('kek') / 'authsvc.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    started: list[RunningServer] = []
    yield started
    for server in started:
        server.stop()


def _admin(server: RunningServer, secret: str) -> list[tuple[str, str]]:
    token = server.issue("ops", secret, "authsvc").access_token
    return [("authorization", f"Bearer {token}")]


def _valid(server: RunningServer, token: str) -> bool:
    reply = server.stub.ValidateToken(
        auth_pb2.ValidateTokenRequest(token=token, audience="api"), timeout=10
    )
    return bool(reply.valid)


def _signs_with(server: RunningServer, secret: str, kid: str) -> None:
    """Poll (generous deadline) until `server` has synced and signs with `kid`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.issue("orders", secret, "api").key_id == kid:
            return
        time.sleep(0.1)
    raise AssertionError("the replica did not pick up the new signing key")


class TestKekRollWithoutDowntime:
    def test_replicas_of_every_stage_serve_through_the_roll(
        self, database_url: str, servers: list[RunningServer]
    ) -> None:
        old_env = base_env(database_url)
        both_env = {**old_env, "AUTHSVC_KEK": NEW_KEK, "AUTHSVC_KEK_PREVIOUS": TEST_KEK}
        run_cli(old_env, "db", "upgrade")
        ops = json.loads(run_cli(old_env, "services", "create", "ops", "--admin", "--json").stdout)
        created = run_cli(old_env, "services", "create", "orders", "--audience", "api", "--json")
        orders = str(json.loads(created.stdout)["service_secret"])
        admin_secret = str(ops["service_secret"])

        old = start_server(old_env)  # a replica not yet restarted
        servers.append(old)
        rolled = start_server(both_env)  # restarted with the new KEK and the old one
        servers.append(rolled)
        before = old.issue("orders", orders, "api").access_token
        assert _valid(rolled, before)

        # Before `kek rotate` the rolled replica still wraps under the old KEK, which the
        # replica not yet restarted reads: it picks the new signing key up and signs with it.
        kid = rolled.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=_admin(rolled, admin_secret), timeout=30
        ).key_id
        _signs_with(old, orders, kid)

        done = run_cli({**old_env, "AUTHSVC_NEW_KEK": NEW_KEK}, "kek", "rotate")
        assert TEST_KEK not in done.stdout + done.stderr and NEW_KEK not in done.stdout

        # Both replicas go on: logins (the secret-hash key is unchanged), cross validation.
        for issuer, checker in ((old, rolled), (rolled, old)):
            token = issuer.issue("orders", orders, "api").access_token
            assert _valid(checker, token) and _valid(checker, before)

        # After the rotation a signing key minted by the rolled replica is wrapped under the new
        # KEK; the replica with the old KEK only refuses to mint one nobody else could read.
        with pytest.raises(grpc.RpcError) as refused:
            old.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=_admin(old, admin_secret), timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "AUTHSVC_KEK" in (refused.value.details() or "")
        newer = rolled.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=_admin(rolled, admin_secret), timeout=30
        ).key_id
        _signs_with(rolled, orders, newer)
        # The replica left on the old KEK says what to fix when it meets that key.
        deadline = time.monotonic() + 30
        while not any("AUTHSVC_KEK_PREVIOUS" in line for line in old.output):
            assert time.monotonic() < deadline, "no warning from the replica on the old KEK"
            time.sleep(0.1)

        # The roll ends: a replica with the new KEK alone serves everything from before.
        for server in servers:
            server.stop()
        servers.clear()
        final = start_server({**old_env, "AUTHSVC_KEK": NEW_KEK})
        servers.append(final)
        assert _valid(final, before)
        assert final.issue("orders", orders, "api").key_id == newer
        for server in (old, rolled, final):
            out = "".join(server.output)
            assert TEST_KEK not in out and NEW_KEK not in out
