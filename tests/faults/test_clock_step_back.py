"""A wall-clock step backwards extends nothing (in-process server, injected FakeClock).

What is proven, for a step back of D seconds (D far larger than any TTL here):
- a token that had expired stays EXPIRED; one still valid at the step expires after the same
  elapsed time it had left (validation reads `exp` from the token and a clock that never goes
  back: authsvc.sync.MonotonicClock);
- a token issued after the step gets `iat` = the server's time (not the stepped-back wall) and
  lives at most the maximum TTL from that issue;
- a previous secret whose grace period ended does not work again, and a retired key that left
  the JWK Set is not published again on the next key reload;
- a revoked token whose revocation was dropped once it expired does not validate again after
  a forward jump that is corrected back;
- the clock itself: never decreases, and after a step carries on at the wall clock's rate.
Bounds: time that passes between two readings of the clock and is then stepped back over is not
seen; the server reads it at least every sync interval (0.5 s), far inside the leeway. Not
covered: a restart while the wall clock is behind (the process accepts the clock it finds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from authsvc.server.app import AuthsvcServer
from authsvc.sync import MonotonicClock
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.clock import START, FakeClock
from tests.support.inprocess import in_process_settings, run_in_process

STEP_BACK = 5 * 3600.0  # bigger than max TTL + leeway + any grace period used here
LEEWAY = 30


class World:
    def __init__(
        self,
        server: AuthsvcServer,
        stub: auth_pb2_grpc.AuthServiceStub,
        secrets: dict[str, str],
        clock: FakeClock,
    ) -> None:
        self.server, self.stub, self.secrets, self.clock = server, stub, secrets, clock

    async def issue(self, service: str = "orders", ttl: int = 0) -> auth_pb2.IssueTokenResponse:
        audience = "authsvc" if service == "admin" else "billing"
        return await self.stub.IssueToken(  # type: ignore[no-any-return]
            auth_pb2.IssueTokenRequest(
                service_id=service,
                service_secret=self.secrets[service],
                audience=audience,
                ttl_seconds=ttl,
            )
        )

    async def reason(self, token: str) -> int:
        reply = await self.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience="billing")
        )
        return int(reply.reason)

    async def admin_md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {(await self.issue('admin')).access_token}")]

    async def kids(self) -> set[str]:
        import json

        jwks = json.loads((await self.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)
        return {k["kid"] for k in jwks["keys"]}

    async def synced(self) -> None:
        """Let the sync loop (every 0.05 s of real time) run a few times."""
        await asyncio.sleep(0.3)

    async def step_back(self) -> None:
        # The server reads its clock at least every sync interval and sees only the net change
        # between two readings: let it read the time reached before the step, and the step.
        await self.synced()
        self.clock.advance(-STEP_BACK)
        await self.synced()


def run(tmp_path: Path, body: Callable[[World], Awaitable[None]]) -> None:
    clock = FakeClock()

    async def wrapped(
        server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
    ) -> None:
        await body(World(server, stub, secrets, clock))

    settings = in_process_settings(
        tmp_path, AUTHSVC_SYNC_INTERVAL_SECONDS="0.05", AUTHSVC_LEEWAY_SECONDS=str(LEEWAY)
    )
    run_in_process(settings, clock, {"orders": (["billing"], [])}, wrapped)


class TestTokensAfterAStepBack:
    def test_an_expired_token_stays_expired(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            token = (await w.issue(ttl=60)).access_token
            w.clock.advance(60 + LEEWAY + 1)
            assert await w.reason(token) == auth_pb2.EXPIRED
            await w.step_back()
            assert await w.reason(token) == auth_pb2.EXPIRED
            w.clock.advance(10)
            assert await w.reason(token) == auth_pb2.EXPIRED

        run(tmp_path, body)

    def test_a_valid_token_expires_after_the_time_it_had_left(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            token = (await w.issue(ttl=60)).access_token
            w.clock.advance(20)
            await w.step_back()
            w.clock.advance(40 + LEEWAY - 1)
            assert await w.reason(token) == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
            w.clock.advance(1)
            assert await w.reason(token) == auth_pb2.EXPIRED

        run(tmp_path, body)

    def test_a_token_issued_after_the_step_lives_at_most_max_ttl_from_issue(
        self, tmp_path: Path
    ) -> None:
        async def body(w: World) -> None:
            w.clock.advance(100)
            await w.step_back()
            reply = await w.issue(ttl=10**6)  # clamped to the maximum
            assert reply.expires_in == 3600
            # Stamped with the server's time (START + 100), not the stepped-back wall clock.
            assert reply.expires_at.seconds == int(START + 100) + 3600
            w.clock.advance(3600 + LEEWAY - 1)
            assert await w.reason(reply.access_token) == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
            w.clock.advance(1)
            assert await w.reason(reply.access_token) == auth_pb2.EXPIRED

        run(tmp_path, body)

    def test_a_revocation_dropped_at_expiry_does_not_let_the_token_back(
        self, tmp_path: Path
    ) -> None:
        async def body(w: World) -> None:
            token = (await w.issue(ttl=3600)).access_token
            await w.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token))
            assert await w.reason(token) == auth_pb2.REVOKED
            # A wrong forward jump: the token has expired, its revocation is dropped.
            w.clock.advance(STEP_BACK)
            await w.synced()
            assert await w.reason(token) == auth_pb2.EXPIRED
            # Corrected back: the token must not come back to life.
            await w.step_back()
            await w.synced()
            assert await w.reason(token) == auth_pb2.EXPIRED

        run(tmp_path, body)


class TestSecretsAndKeysAfterAStepBack:
    def test_an_ended_grace_period_does_not_reopen(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            old = w.secrets["orders"]
            reply = await w.stub.RotateServiceSecret(
                auth_pb2.RotateServiceSecretRequest(
                    service_id="orders", current_secret=old, grace_period_seconds=60
                )
            )
            assert reply.previous_secret_expires_at.seconds == int(START) + 60
            await w.issue()  # the old secret works within the grace period
            w.clock.advance(61)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await w.issue()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await w.step_back()
            with pytest.raises(grpc.aio.AioRpcError) as still:
                await w.issue()
            assert still.value.code() == grpc.StatusCode.UNAUTHENTICATED
            w.secrets["orders"] = reply.service_secret
            assert (await w.issue()).access_token

        run(tmp_path, body)

    def test_a_retired_key_is_not_published_again(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            first = await w.kids()
            await w.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=await w.admin_md()
            )
            assert first < await w.kids()  # the retired key stays published for now
            w.clock.advance(3600 + LEEWAY + 1)
            await w.synced()
            assert not first & await w.kids()
            await w.step_back()
            # A key change makes every replica reload its keys at the (stepped-back) time.
            await w.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=await w.admin_md()
            )
            await w.synced()
            assert not first & await w.kids()

        run(tmp_path, body)


class TestMonotonicClock:
    def test_never_decreases_and_carries_on_at_the_wall_rate(self) -> None:
        wall = FakeClock()
        clock = MonotonicClock(wall)
        assert clock.now() == START
        wall.advance(10)
        assert clock.now() == START + 10
        wall.advance(-100)
        assert clock.now() == START + 10
        assert clock.offset == 100
        wall.advance(5)
        assert clock.now() == START + 15
        wall.advance(-1)  # a second, smaller step adds up
        assert clock.now() == START + 15
        wall.advance(2)
        assert clock.now() == START + 17

    def test_reads_the_real_wall_clock_unchanged_when_it_does_not_step(self) -> None:
        from authsvc.clock import SystemClock

        clock = MonotonicClock(SystemClock())
        before = time.time()
        now = clock.now()
        assert before <= now <= time.time()
        assert clock.offset == 0
