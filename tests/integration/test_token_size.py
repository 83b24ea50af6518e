"""How long a token may get, against a real `authsvc serve`: AUTHSVC_MAX_TOKEN_BYTES bounds what
is issued as well as what is validated, a scope name has a length limit, and a refusal naming
many scopes still fits in gRPC's trailers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from authsvc.inputs import MAX_SCOPE_LENGTH
from authsvc_client.v1 import auth_pb2
from tests.support.server import RunningServer, base_env, create_service, run_cli, start_server

LIMIT = 1024
# Twelve 60-character scopes: a token carrying them all is about 1.5 KB, over LIMIT.
WIDE = [f"billing.{i:02d}." + "x" * 49 for i in range(12)]


@dataclass
class Fleet:
    server: RunningServer
    secret: str = field(repr=False)

    def issue(self, scopes: list[str]) -> auth_pb2.IssueTokenResponse:
        return self.server.issue("wide", self.secret, "billing", scopes)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder: Path = tmp_path_factory.mktemp("token-size")
    env = base_env(f"sqlite:///{folder / 'authsvc.db'}", AUTHSVC_MAX_TOKEN_BYTES=str(LIMIT))
    run_cli(env, "db", "upgrade")
    secret = create_service(env, "wide", *(f"billing={s}" for s in WIDE))
    server = start_server(env)
    try:
        yield Fleet(server, secret)
    finally:
        server.stop()


def _refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


class TestTokenSize:
    def test_a_token_over_the_configured_limit_is_refused_when_asked_for(
        self, fleet: Fleet
    ) -> None:
        """Not issued and then refused by every validator (the issuer once kept its own 8 KiB
        limit): INVALID_ARGUMENT naming the setting, before anything is signed."""
        details = _refused(lambda: fleet.issue(WIDE), grpc.StatusCode.INVALID_ARGUMENT)
        assert "AUTHSVC_MAX_TOKEN_BYTES" in details and "fewer scopes" in details
        # All granted scopes by default: the same refusal, not INTERNAL.
        _refused(lambda: fleet.issue([]), grpc.StatusCode.INVALID_ARGUMENT)
        issued = fleet.issue(WIDE[:2])
        assert len(issued.access_token) <= LIMIT
        checked = fleet.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=issued.access_token, audience="billing"),
            timeout=10,
        )
        assert checked.valid

    def test_a_scope_name_has_a_length_limit(self, fleet: Fleet) -> None:
        long = "a" * (MAX_SCOPE_LENGTH + 1)
        grant = f"billing={long}"
        cli = fleet.server.cli("services", "create", "long", "--grant", grant, check=False)
        assert cli.returncode != 0 and f"at most {MAX_SCOPE_LENGTH} characters" in cli.stderr
        details = _refused(lambda: fleet.issue([long]), grpc.StatusCode.INVALID_ARGUMENT)
        assert long not in details

    def test_a_refusal_names_a_few_scopes_and_counts_the_rest(self, fleet: Fleet) -> None:
        asked = [f"payroll.{i:02d}." + "y" * 200 for i in range(40)]
        details = _refused(lambda: fleet.issue(asked), grpc.StatusCode.PERMISSION_DENIED)
        assert details.endswith("(and 32 more)")
        assert asked[0] in details and asked[8] not in details
