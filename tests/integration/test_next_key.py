"""The next signing key is published before it signs (DESIGN.md "Keys and secrets", issue #12
item 8), shown against real `authsvc serve` processes with a real LocalValidator.

A validator here never refreshes its JWK Set on its own during a test (jwks_refresh_seconds is
an hour), so every kid it knows comes from the one fetch it made at start (or from a refresh the
test makes), and `unknown_kid_refetches` counts exactly the GetJwks calls a token's kid caused.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client.keyring import KeyRing
from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import LocalValidator
from tests.integration.conftest import World, make_world
from tests.support.server import (
    TEST_ISSUER,
    RunningServer,
    base_env,
    run_cli,
    running_server,
    start_server,
)

NEVER = 3600.0  # a JWKS refresh period no test outlives


def _jwks_kids(server: RunningServer) -> set[str]:
    reply = server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
    return set(KeyRing.from_jwks_json(reply.jwks_json).kids)


def _keys(server: RunningServer, md: list[tuple[str, str]]) -> dict[str, auth_pb2.SigningKey]:
    reply = server.stub.ListSigningKeys(auth_pb2.ListSigningKeysRequest(), metadata=md, timeout=10)
    return {k.key_id: k for k in reply.keys}


def _by_state(keys: dict[str, auth_pb2.SigningKey], state: str) -> list[str]:
    return [kid for kid, k in keys.items() if k.state == state]


def _http_address(server: RunningServer) -> str:
    for line in server.output:
        if line.startswith("authsvc http listening on "):
            return line.split()[4]
    raise AssertionError("serve printed no 'authsvc http listening on' line")


def _wait_for(check: Callable[[], bool], timeout: float = 60) -> bool:
    """Progress, not time: poll until `check` holds (the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@contextmanager
def _validator(world: World) -> Iterator[LocalValidator]:
    channel = grpc.insecure_channel(world.server.address)
    validator = LocalValidator(
        channel,
        "billing",
        TEST_ISSUER,
        jwks_refresh_seconds=NEVER,
        unknown_kid_interval_seconds=0,
        token_source=world.follower_token,
    )
    try:
        assert validator.wait_ready(30)
        yield validator
    finally:
        validator.close()
        channel.close()


def _issue(world: World) -> auth_pb2.IssueTokenResponse:
    return world.server.issue("orders", world.orders_secret, "billing", ["billing.read"])


def _signed_by(world: World, kid: str) -> auth_pb2.IssueTokenResponse:
    """A token signed by `kid`, once this replica signs with it (it may still be syncing)."""
    found: list[auth_pb2.IssueTokenResponse] = []

    def signs() -> bool:
        token = _issue(world)
        if token.key_id == kid:
            found.append(token)
        return bool(found)

    assert _wait_for(signs), f"the server never signed with {kid}"
    return found[0]


def _rotated(rotate: Callable[[], auth_pb2.RotateSigningKeyResponse], into: list[str]) -> bool:
    """One on-demand rotation, or False while the next key is younger than the lead."""
    try:
        into.append(rotate().key_id)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return False
    return True


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w, server = make_world(tmp_path, AUTHSVC_HTTP_LISTEN="127.0.0.1:0")
    try:
        yield w
    finally:
        server.stop()


class TestPublishedBeforeItSigns:
    def test_the_next_key_is_in_getjwks_and_the_well_known_jwks_before_it_signs(
        self, world: World
    ) -> None:
        md = world.admin_md()
        keys = _keys(world.server, md)
        (active,) = _by_state(keys, "active")
        (upcoming,) = _by_state(keys, "next")
        assert not keys[upcoming].HasField("activated_at")
        assert {active, upcoming} <= _jwks_kids(world.server)
        url = f"http://{_http_address(world.server)}/.well-known/jwks.json"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert {active, upcoming} <= set(KeyRing.from_jwks_json(reply.read().decode()).kids)
        # Published, but signing nothing yet.
        assert _issue(world).key_id == active
        # `authsvc keys list` shows it with its state.
        listed = json.loads(world.server.cli("keys", "list", "--json").stdout)
        assert {(k["key_id"], k["state"]) for k in listed} >= {
            (active, "active"),
            (upcoming, "next"),
        }
        text = world.server.cli("keys", "list").stdout
        assert f"{upcoming}\tnext\t" in text

    def test_on_demand_rotation_activates_the_published_key_with_zero_unknown_kid_refetches(
        self, world: World
    ) -> None:
        with _validator(world) as validator:
            known = set(validator.keys.ring.kids)
            keys = _keys(world.server, world.admin_md())
            (upcoming,) = _by_state(keys, "next")
            assert upcoming in known
            rotated = world.server.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=world.admin_md(), timeout=30
            )
            assert rotated.key_id == upcoming
            token = _signed_by(world, upcoming)
            result = validator.validate(token.access_token)
            assert result.valid, result.reason_name
            assert validator.unknown_kid_refetches == 0

            # Control (the counter can move): a second rotation at once activates the key
            # prepared by the first, which this validator has never fetched: one refetch.
            following = _by_state(_keys(world.server, world.admin_md()), "next")
            assert following and following[0] not in known
            again = world.server.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=world.admin_md(), timeout=30
            )
            assert again.key_id == following[0]
            token = _signed_by(world, again.key_id)
            result = validator.validate(token.access_token)
            assert result.valid, result.reason_name
            assert validator.unknown_kid_refetches == 1

    def test_an_on_demand_rotation_waits_for_the_next_keys_lead(self, tmp_path: Path) -> None:
        """The next key signs only once it has been published for the lead, on demand too: a
        second rotation within it (or a retry of one whose answer was lost) is refused with
        when it may run, over the RPC and the CLI, and changes nothing; a compromise rotation
        (revoke_previous) does not wait."""
        w, server = make_world(tmp_path, AUTHSVC_KEY_PUBLISH_LEAD_SECONDS="3")
        try:
            md = w.admin_md()

            def rotate(**fields: Any) -> auth_pb2.RotateSigningKeyResponse:
                reply: auth_pb2.RotateSigningKeyResponse = server.stub.RotateSigningKey(
                    auth_pb2.RotateSigningKeyRequest(**fields), metadata=md, timeout=30
                )
                return reply

            # The next key made at start becomes active once 3 s old.
            first: list[str] = []
            assert _wait_for(lambda: _rotated(rotate, first), timeout=20)
            keys = _keys(server, md)
            assert _by_state(keys, "active") == first
            with pytest.raises(grpc.RpcError) as refused:
                rotate()
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "can become active in" in (refused.value.details() or "")
            assert "revoke_previous" in (refused.value.details() or "")
            cli = server.cli("keys", "rotate", check=False)
            assert cli.returncode != 0 and "publish lead" in cli.stderr
            assert _keys(server, md) == keys  # nothing changed
            fresh = rotate(revoke_previous=True)
            # The admin token above was signed by a key now revoked: a new one.
            assert _by_state(_keys(server, w.admin_md()), "active") == [fresh.key_id]
        finally:
            server.stop()

    def test_revoke_previous_stops_old_tokens_at_once_and_discards_the_next_key(
        self, world: World
    ) -> None:
        old = _issue(world)
        keys = _keys(world.server, world.admin_md())
        (upcoming,) = _by_state(keys, "next")
        with _validator(world) as validator:
            assert validator.validate(old.access_token).valid
            rotated = world.server.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(revoke_previous=True),
                metadata=world.admin_md(),
                timeout=30,
            )
            # A fresh key signs: the pre-published one may have leaked with the active one.
            assert rotated.key_id != upcoming
            checked = world.server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=old.access_token, audience="billing"),
                timeout=10,
            )
            assert not checked.valid and checked.reason == auth_pb2.UNKNOWN_KEY
            after = _keys(world.server, world.admin_md())
            assert after[upcoming].state == "revoked" and after[old.key_id].state == "revoked"
            (new_next,) = _by_state(after, "next")
            assert new_next not in (upcoming, rotated.key_id)
            published = _jwks_kids(world.server)
            assert upcoming not in published and old.key_id not in published
            assert {rotated.key_id, new_next} <= published
            # The fresh kid makes the local validator refetch at once, and that refetch is
            # what drops the revoked keys there before its periodic refresh would.
            fresh = _signed_by(world, rotated.key_id)
            assert validator.validate(fresh.access_token).valid
            assert validator.unknown_kid_refetches == 1
            result = validator.validate(old.access_token)
            assert not result.valid and result.reason == auth_pb2.UNKNOWN_KEY

    def test_a_restart_keeps_the_next_key_and_activates_it_next(self, tmp_path: Path) -> None:
        w, server = make_world(tmp_path)
        env = server.env
        try:
            (upcoming,) = _by_state(_keys(server, w.admin_md()), "next")
        finally:
            server.stop()
        again = start_server(env)
        try:
            w.server = again
            keys = _keys(again, w.admin_md())
            assert _by_state(keys, "next") == [upcoming]
            assert upcoming in _jwks_kids(again)
            rotated = again.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=w.admin_md(), timeout=30
            )
            assert rotated.key_id == upcoming
            # Its private part came back from the database through the KEK: it signs.
            token = _signed_by(w, upcoming)
            checked = again.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=token.access_token, audience="billing"),
                timeout=10,
            )
            assert checked.valid
        finally:
            again.stop()


def _next_rotation(world: World, previous: str) -> auth_pb2.IssueTokenResponse:
    """The first token signed by a key other than `previous` (a rotation happened)."""
    found: list[auth_pb2.IssueTokenResponse] = []

    def rotated() -> bool:
        token = _issue(world)
        if token.key_id != previous:
            found.append(token)
        return bool(found)

    assert _wait_for(rotated, 120), "no scheduled rotation happened"
    return found[0]


def _published_next(world: World) -> str | None:
    """The `next` key, once this replica publishes it."""
    nexts = _by_state(_keys(world.server, world.admin_md()), "next")
    return nexts[0] if nexts and nexts[0] in _jwks_kids(world.server) else None


class TestScheduledRotation:
    def test_scheduled_rotations_cause_zero_unknown_kid_refetches(self, tmp_path: Path) -> None:
        """A short schedule: a rotation every 8 s, each next key published for at least 2 s
        before it activates. `fresh` refreshes its JWK Set once the server has published the
        following next key (what its periodic refresh does within the lead); `stale` never
        refreshes, so it is the control: it must refetch once for the second rotation's key."""
        w, server = make_world(
            tmp_path,
            AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS="8",
            AUTHSVC_KEY_PUBLISH_LEAD_SECONDS="2",
        )
        try:
            with _validator(w) as fresh, _validator(w) as stale:
                keys = _keys(server, w.admin_md())
                (first,) = _by_state(keys, "active")
                (second,) = _by_state(keys, "next")
                assert {first, second} <= set(fresh.keys.ring.kids) & set(stale.keys.ring.kids)

                token = _next_rotation(w, first)
                assert token.key_id == second  # the key published at start is the one activated
                for validator in (fresh, stale):
                    result = validator.validate(token.access_token)
                    assert result.valid, result.reason_name
                    assert validator.unknown_kid_refetches == 0

                assert _wait_for(lambda: _published_next(w) is not None)
                third = _published_next(w)
                assert third is not None
                assert fresh.keys.refresh() and third in fresh.keys.ring.kids
                assert third not in stale.keys.ring.kids

                token = _next_rotation(w, second)
                assert token.key_id == third
                result = fresh.validate(token.access_token)
                assert result.valid, result.reason_name
                assert fresh.unknown_kid_refetches == 0
                # Control: the validator that never refreshed meets an unknown kid once.
                result = stale.validate(token.access_token)
                assert result.valid, result.reason_name
                assert stale.unknown_kid_refetches == 1
                print(
                    "unknown-kid refetches over 2 scheduled rotations: "
                    f"refreshing validator {fresh.unknown_kid_refetches}, "
                    f"never-refreshing control {stale.unknown_kid_refetches}"
                )

            keys = _keys(server, w.admin_md())
            for kid in (second, third):
                # Each was published for at least the lead before it signed.
                key = keys[kid]
                assert key.activated_at.ToSeconds() - key.created_at.ToSeconds() >= 2
            # One audit row per scheduled rotation, by the scheduler.
            rows = json.loads(server.cli("audit", "list", "--json", "--limit", "100000").stdout)
            scheduled = [r["target"] for r in rows if r["actor"] == "scheduler"]
            assert {f"key:{second}", f"key:{third}"} <= set(scheduled)
            assert len(scheduled) == len(set(scheduled))
        finally:
            server.stop()


class TestPostgresReplicasRotatingAtOnce:
    def test_two_replicas_rotating_at_once_leave_one_active_and_one_next_key(
        self, postgres_url: str
    ) -> None:
        env = base_env(postgres_url)
        run_cli(env, "db", "upgrade")
        with running_server(env) as a, running_server(env) as b:
            secret = a.create_service("ops", [], [], admin=True)
            md = [("authorization", f"Bearer {a.issue('ops', secret, 'authsvc').access_token}")]
            for _ in range(3):
                (upcoming,) = _by_state(_keys(a, md), "next")
                barrier = threading.Barrier(2)
                replies: list[str] = []

                def rotate(server: RunningServer) -> None:
                    barrier.wait(timeout=30)
                    reply = server.stub.RotateSigningKey(
                        auth_pb2.RotateSigningKeyRequest(), metadata=md, timeout=30
                    )
                    replies.append(reply.key_id)

                threads = [threading.Thread(target=rotate, args=(s,)) for s in (a, b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
                keys = _keys(b, md)
                assert len(_by_state(keys, "active")) == 1
                assert len(_by_state(keys, "next")) == 1
                # Whoever raced, the active key is one that was published ahead, and each
                # replica answered with a key that really became active.
                assert len(replies) == 2
                assert set(replies) <= {k for k in keys if keys[k].HasField("activated_at")}
                assert upcoming in keys and keys[upcoming].HasField("activated_at")
            rows = json.loads(a.cli("audit", "list", "--json", "--limit", "100000").stdout)
            outcomes = [r["outcome"] for r in rows if r["action"] == "rotate_signing_key"]
            assert len(outcomes) == 6 and set(outcomes) <= {"ok", "already_rotated"}
