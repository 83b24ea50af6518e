"""The servicer in-process on a real grpc.aio server (port 0) with an injected clock.

grpc_testing drives only synchronous servicers; ours is grpc.aio, so these tests run it on a
real in-process server instead and move time with a FakeClock rather than sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from authsvc.server.app import AuthsvcServer
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.clock import START, FakeClock
from tests.support.inprocess import in_process_settings, run_in_process


class Harness:
    def __init__(
        self,
        server: AuthsvcServer,
        stub: auth_pb2_grpc.AuthServiceStub,
        secrets: dict[str, str],
        clock: FakeClock,
    ) -> None:
        self.server, self.stub, self.secrets, self.clock = server, stub, secrets, clock

    async def issue(self, service: str, audience: str, ttl: int = 0) -> auth_pb2.IssueTokenResponse:
        return await self.stub.IssueToken(  # type: ignore[no-any-return]
            auth_pb2.IssueTokenRequest(
                service_id=service,
                service_secret=self.secrets[service],
                audience=audience,
                ttl_seconds=ttl,
            )
        )

    async def validate(self, token: str, audience: str) -> auth_pb2.ValidateTokenResponse:
        return await self.stub.ValidateToken(  # type: ignore[no-any-return]
            auth_pb2.ValidateTokenRequest(token=token, audience=audience)
        )

    async def admin_md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {(await self.issue('admin', 'authsvc')).access_token}")]

    async def jwks_kids(self) -> list[str]:
        jwks = json.loads((await self.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
        return [k["kid"] for k in jwks["keys"]]


def run(tmp_path: Path, body: Callable[[Harness], Awaitable[None]], **env: str) -> None:
    clock = FakeClock()

    async def wrapped(
        server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
    ) -> None:
        await body(Harness(server, stub, secrets, clock))

    run_in_process(
        in_process_settings(tmp_path, **env),
        clock,
        {"orders": (["billing"], ["billing.read"])},
        wrapped,
    )


class TestTimeWithAFakeClock:
    def test_token_expires_at_exp_plus_leeway(self, tmp_path: Path) -> None:
        async def body(h: Harness) -> None:
            token = (await h.issue("orders", "billing", ttl=60)).access_token
            h.clock.advance(60 + 30 - 1)
            assert (await h.validate(token, "billing")).valid
            h.clock.advance(1)
            assert (await h.validate(token, "billing")).reason == auth_pb2.EXPIRED

        run(tmp_path, body)

    def test_secret_grace_period_ends_on_time(self, tmp_path: Path) -> None:
        async def body(h: Harness) -> None:
            reply = await h.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(
                    service_id="orders",
                    current_secret=h.secrets["orders"],
                    grace_period_seconds=120,
                )
            )
            assert reply.previous_secret_expires_at.seconds == int(START) + 120
            h.clock.advance(119)
            assert (await h.issue("orders", "billing")).access_token
            h.clock.advance(1)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await h.issue("orders", "billing")
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            h.secrets["orders"] = reply.service_secret
            assert (await h.issue("orders", "billing")).access_token

        run(tmp_path, body)

    def test_scheduled_rotation_and_retirement_of_the_old_key(self, tmp_path: Path) -> None:
        async def body(h: Harness) -> None:
            first = await h.issue("orders", "billing", ttl=3600)
            await h.server.run_maintenance()
            # Not due yet; the next key is published beside the active one before it signs.
            kids = await h.jwks_kids()
            assert first.key_id in kids and len(kids) == 2
            (upcoming,) = set(kids) - {first.key_id}
            h.clock.advance(1000)
            await h.server.run_maintenance()
            second = await h.issue("orders", "billing")
            assert second.key_id == upcoming  # the key published ahead is the one activated
            # The old key stays published while tokens it signed may live (max TTL + leeway,
            # plus one sync interval: another replica may sign with it until it syncs), and a
            # new next key is published.
            kids = await h.jwks_kids()
            assert {first.key_id, second.key_id} < set(kids) and len(kids) == 3
            assert (await h.validate(first.access_token, "billing")).valid
            h.clock.advance(3600 + 30)
            await h.server.run_maintenance()
            assert first.key_id in await h.jwks_kids()  # the sync interval's second is left
            h.clock.advance(1)  # ceil(AUTHSVC_SYNC_INTERVAL_SECONDS)
            await h.server.run_maintenance()
            # Past the first key's publication window it leaves the JWK Set; the scheduled
            # rotation in the same round retired the second key, which stays published.
            kids = await h.jwks_kids()
            assert first.key_id not in kids
            assert second.key_id in kids and len(kids) == 3

        run(tmp_path, body, AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS="1000")

    def test_revoke_by_service_cutoff_is_the_next_whole_second(self, tmp_path: Path) -> None:
        async def body(h: Harness) -> None:
            h.clock.advance(0.25)
            before = (await h.issue("orders", "billing")).access_token
            md = await h.admin_md()
            await h.stub.RevokeToken(auth_pb2.RevokeTokenRequest(service_id="orders"), metadata=md)
            # The call returned only once the next second began (the fake clock moved there).
            assert h.clock.now() >= int(START) + 1
            after = (await h.issue("orders", "billing")).access_token
            assert (await h.validate(before, "billing")).reason == auth_pb2.REVOKED
            assert (await h.validate(after, "billing")).valid

        run(tmp_path, body)


class TestOneTranslation:
    """Every RPC reads its bearer token with the client package's parser and maps errors in
    one place, streams included."""

    def test_a_malformed_or_repeated_authorization_value_is_refused_before_any_check(
        self, tmp_path: Path
    ) -> None:
        async def body(h: Harness) -> None:
            token = (await h.issue("admin", "authsvc")).access_token
            cases = {
                "malformed authorization metadata": [("authorization", f"Bearer {token}$")],
                "more than one authorization value": [
                    ("authorization", f"Bearer {token}"),
                    ("authorization", f"Bearer {token}"),
                ],
            }
            cases_basic = [("authorization", f"Basic {token}")]
            for details, md in [*cases.items(), ("malformed authorization metadata", cases_basic)]:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await h.stub.ListServices(auth_pb2.ListServicesRequest(), metadata=md)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert exc.value.details() == details
                assert token not in str(exc.value.details())
            # The same parser guards the stream.
            stream = h.stub.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(), metadata=cases_basic
            )
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stream.read()
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert exc.value.details() == "malformed authorization metadata"

        run(tmp_path, body)

    def test_a_stream_ends_with_the_status_table_code(self, tmp_path: Path) -> None:
        async def body(h: Harness) -> None:
            md = await h.admin_md()
            stream = h.stub.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after_cursor=-1), metadata=md
            )
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stream.read()
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "after_cursor" in str(exc.value.details())

        run(tmp_path, body)
