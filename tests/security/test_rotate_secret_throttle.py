"""A failed RotateServiceSecret (by the service itself, with a wrong `current_secret`) is a failed
login: it counts toward the same throttle as a failed IssueToken, per service id and per peer.

Were it not counted, anyone could guess a service's secret through RotateServiceSecret without
ever meeting the throttle that guards IssueToken (and a right guess would also hand them a
fresh secret while locking the service out of its own).

Against a real `authsvc serve`. The caller's address never logs in as the service before the
failures: a peer that did is exempt from the id limit (the known-peer rule, tested in
tests/security/test_abuse_limits.py::TestVictimLockout), which is not what is tested here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc.usecases.logins import BAD_CREDENTIALS
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.server import RunningServer, base_env, run_cli, running_server

# Throttle window of the servers here: long enough for a handful of calls, short enough to wait.
WINDOW = 5


class Secret:
    """A service secret that never shows in a test report (pytest prints an assertion's
    operands): its repr names no value."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"


WRONG = Secret("asvcs_" + "A" * 43)


def _refusal(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a refused call; a throttle's must carry `retry-after`."""
    code: grpc.StatusCode = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = dict(exc.trailing_metadata())
        assert 0 < int(trailers["retry-after"]) <= WINDOW, trailers.get("retry-after")
    return code, str(exc.details())


def _issue(stub: auth_pb2_grpc.AuthServiceStub, sid: str, secret: Secret) -> grpc.StatusCode:
    """IssueToken for audience billing; OK when a token came back."""
    try:
        response = stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                service_id=sid, service_secret=secret.value, audience="billing"
            ),
            timeout=30,
        )
    except grpc.RpcError as exc:
        return _refusal(exc)[0]
    assert response.access_token  # never printed: only its presence is asserted
    return grpc.StatusCode.OK


def _rotate(
    stub: auth_pb2_grpc.AuthServiceStub, sid: str, current: Secret
) -> tuple[grpc.StatusCode, str, Secret | None]:
    """RotateServiceSecret by the service itself (no bearer token): the status, its details,
    and the new secret when it rotated."""
    try:
        response = stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id=sid, current_secret=current.value),
            timeout=30,
        )
    except grpc.RpcError as exc:
        return (*_refusal(exc), None)
    return grpc.StatusCode.OK, "", Secret(response.service_secret)


def _rotations(server: RunningServer) -> list[tuple[str, str, int]]:
    """The rotate_secret audit rows, oldest first: (actor, outcome, attempts counted)."""
    rows: list[dict[str, Any]] = json.loads(
        server.cli("audit", "list", "--json", "--limit", "1000").stdout
    )
    return [
        (r["actor"], r["outcome"], r["count"])
        for r in reversed(rows)
        if r["action"] == "rotate_secret"
    ]


@contextmanager
def _server(tmp_path: Path, **limits: str) -> Iterator[RunningServer]:
    env = base_env(
        f"sqlite:///{tmp_path / 'authsvc.db'}",
        AUTHSVC_THROTTLE_WINDOW_SECONDS=str(WINDOW),
        **limits,
    )
    run_cli(env, "db", "upgrade")
    with running_server(env) as server:
        yield server


class TestFailedSelfRotationsAreThrottled:
    def test_failed_rotations_count_toward_the_id_limit(self, tmp_path: Path) -> None:
        with _server(
            tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="3", AUTHSVC_THROTTLE_PEER_FAILURES="1000"
        ) as server:
            victim = Secret(server.create_service("victim", ["billing"]))
            bystander = Secret(server.create_service("bystander", ["billing"]))
            stub = server.stub

            # Three wrong current secrets: each the generic refusal a wrong IssueToken gets.
            answers = [_rotate(stub, "victim", WRONG)]
            window_opened = time.monotonic()  # the id's window starts at its first failure
            answers += [_rotate(stub, "victim", WRONG) for _ in range(2)]
            assert answers == [(grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS, None)] * 3

            # The id is now throttled: the right secret gets no token, and cannot rotate.
            assert _issue(stub, "victim", victim) == grpc.StatusCode.RESOURCE_EXHAUSTED
            code, _, rotated = _rotate(stub, "victim", victim)
            assert (code, rotated) == (grpc.StatusCode.RESOURCE_EXHAUSTED, None)
            # It was the id's limit, not the peer's: another service still logs in from here.
            assert _issue(stub, "bystander", bystander) == grpc.StatusCode.OK
            assert time.monotonic() - window_opened < WINDOW, "too slow to test the window"
            assert _rotations(server) == [
                ("victim", "bad_credentials", 1),
                ("victim", "bad_credentials", 1),
                ("victim", "bad_credentials", 1),
                ("victim", "throttled", 1),
            ]

            # After the window the secret works again: nothing rotated it meanwhile...
            time.sleep(max(0.0, window_opened + WINDOW + 1 - time.monotonic()))
            assert _issue(stub, "victim", victim) == grpc.StatusCode.OK
            # ...and it is still the current one (a previous secret may not rotate itself).
            code, _, rotated = _rotate(stub, "victim", victim)
            assert code == grpc.StatusCode.OK and rotated is not None
            assert _issue(stub, "victim", rotated) == grpc.StatusCode.OK
            assert _rotations(server)[-1] == ("victim", "ok", 1)

    def test_failed_rotations_count_toward_the_peer_limit(self, tmp_path: Path) -> None:
        with _server(
            tmp_path, AUTHSVC_THROTTLE_ID_FAILURES="100", AUTHSVC_THROTTLE_PEER_FAILURES="3"
        ) as server:
            bystander = Secret(server.create_service("bystander", ["billing"]))
            server.create_service("victim", ["billing"])
            stub = server.stub
            for sid in ("victim", "victim", "ghost"):
                code, details, _ = _rotate(stub, sid, WRONG)
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS)
            # This address spent its budget on rotations: no other login from it either.
            assert _issue(stub, "bystander", bystander) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_wrong_current_secret_answers_as_a_wrong_issue_token_secret(tmp_path: Path) -> None:
    """One answer for a wrong secret and an unknown id, through either RPC."""
    with _server(tmp_path) as server:
        server.create_service("victim", ["billing"])
        for sid in ("victim", "ghost"):
            code, details, rotated = _rotate(server.stub, sid, WRONG)
            assert (code, details, rotated) == (
                grpc.StatusCode.UNAUTHENTICATED,
                BAD_CREDENTIALS,
                None,
            )
            with pytest.raises(grpc.RpcError) as issued:
                server.stub.IssueToken(
                    auth_pb2.IssueTokenRequest(
                        service_id=sid, service_secret=WRONG.value, audience="billing"
                    ),
                    timeout=30,
                )
            assert _refusal(issued.value) == (code, details)
