"""The server follows the wall clock through its steps; state keeps what must stay ended.

In-process server with an injected FakeClock: `clock.step(s)` moves the wall clock without time
passing (an NTP correction), `clock.advance(s)` lets time pass. What is proven:
- after a step back that corrects a server running ahead, the tokens it issues validate on a
  separate validator reading the true time (they did not before the correction: NOT_YET_VALID),
  and the step is counted in `authsvc_clock_steps_total{direction}`;
- a revoked token stays revoked after a step back, and after a wrong forward jump that is then
  corrected (revocations are kept max TTL + leeway after `exp`, and pruned by the earlier of the
  wall clock and elapsed monotonic time);
- a previous secret whose grace period was seen ended does not work again after a step back,
  and a retired key whose publication was seen ended is not published again;
- the clock itself (authsvc.clock.WallClock): reads the wall clock unchanged, tells steps back
  and forward from time passing, logs each at WARNING.
Bounds (authsvc.clock): a token stamped while the server ran ahead by D validates until its `exp`
by the corrected clock, as on every correct validator; a step back during a grace period
lengthens it by the step. Only steps between two readings are seen (the server reads its clock
at least every sync interval).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from authsvc.clock import SystemClock, WallClock, to_datetime
from authsvc.server.app import AuthsvcServer
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.verifier import TokenVerifier
from tests.storage.helpers import live_secrets
from tests.support.clock import START, FakeClock
from tests.support.inprocess import in_process_settings, run_in_process

STEP = 1800.0  # larger than the leeway and any TTL used here, within the max TTL (3600)
LEEWAY = 30
MAX_TTL = 3600


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

    async def jwks(self) -> str:
        return str((await self.stub.GetJwks(auth_pb2.GetJwksRequest())).jwks_json)

    async def kids(self) -> set[str]:
        return {k["kid"] for k in json.loads(await self.jwks())["keys"]}

    async def synced(self) -> None:
        """Let the sync loop (every 0.05 s of real time) run a few times."""
        await asyncio.sleep(0.3)

    async def step(self, seconds: float) -> None:
        # The server reads its clock at least every sync interval and sees only the net change
        # between two readings: let it read the time reached before the step, and the step.
        await self.synced()
        self.clock.step(seconds)
        await self.synced()

    async def until(self, condition: Callable[[], Awaitable[bool]]) -> None:
        """Poll, with a deadline generous for a loaded machine, for what the sync loop does."""
        deadline = time.monotonic() + 20
        while not await condition():
            assert time.monotonic() < deadline, "the sync loop did not get there in time"
            await asyncio.sleep(0.05)

    def steps(self, direction: str) -> float:
        value = self.server.metrics.registry.get_sample_value(
            "authsvc_clock_steps_total", {"direction": direction}
        )
        return 0.0 if value is None else value


def run(tmp_path: Path, body: Callable[[World], Awaitable[None]], start: float = START) -> None:
    clock = FakeClock(start)

    async def wrapped(
        server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
    ) -> None:
        await body(World(server, stub, secrets, clock))

    settings = in_process_settings(
        tmp_path,
        AUTHSVC_SYNC_INTERVAL_SECONDS="0.05",
        AUTHSVC_LEEWAY_SECONDS=str(LEEWAY),
        AUTHSVC_MAX_TTL_SECONDS=str(MAX_TTL),
    )
    run_in_process(settings, clock, {"orders": (["billing"], [])}, wrapped)


class TestTokensAfterAStepBack:
    def test_tokens_issued_after_a_step_back_validate_at_the_true_time(
        self, tmp_path: Path
    ) -> None:
        # The true time is START; the server's wall clock runs STEP ahead until NTP corrects it.
        true_clock = FakeClock(START)

        async def body(w: World) -> None:
            ring = KeyRing.from_jwks_json(await w.jwks())
            fleet = TokenVerifier(
                keys=lambda: ring,
                revocations=RevocationSet(),
                issuer=w.server.settings.issuer,
                leeway_seconds=LEEWAY,
                clock=true_clock.now,
            )
            ahead = (await w.issue()).access_token
            assert fleet.verify(ahead, audience="billing").reason == auth_pb2.NOT_YET_VALID
            await w.step(-STEP)
            reply = await w.issue()
            assert w.steps("back") == 1
            assert w.steps("forward") == 0
            assert reply.expires_at.seconds == int(START) + reply.expires_in
            result = fleet.verify(reply.access_token, audience="billing")
            assert result.valid, result.reason
            assert await w.reason(reply.access_token) == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
            # Both clocks now agree on when it expires.
            true_clock.advance(reply.expires_in + LEEWAY + 1)
            w.clock.advance(reply.expires_in + LEEWAY + 1)
            assert fleet.verify(reply.access_token, audience="billing").reason == auth_pb2.EXPIRED
            assert await w.reason(reply.access_token) == auth_pb2.EXPIRED

        run(tmp_path, body, start=START + STEP)

    def test_a_revoked_token_stays_revoked_after_a_step_back(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            token = (await w.issue(ttl=60)).access_token
            await w.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token))
            assert await w.reason(token) == auth_pb2.REVOKED
            w.clock.advance(60 + LEEWAY + 1)
            await w.server.run_maintenance()  # prunes what it may
            await w.synced()
            assert await w.reason(token) in (auth_pb2.EXPIRED, auth_pb2.REVOKED)
            # By the stepped-back clock the token has not expired: its revocation must be there.
            await w.step(-STEP)
            await w.server.run_maintenance()
            await w.synced()
            assert await w.reason(token) == auth_pb2.REVOKED

        run(tmp_path, body)

    def test_a_wrong_forward_jump_then_corrected_leaves_revoked_tokens_revoked(
        self, tmp_path: Path
    ) -> None:
        async def body(w: World) -> None:
            token = (await w.issue(ttl=MAX_TTL)).access_token
            await w.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token))
            assert await w.reason(token) == auth_pb2.REVOKED
            # Far beyond exp + leeway + max TTL by the wall clock, but no time has passed.
            await w.step(5 * MAX_TTL)
            await w.server.run_maintenance()
            assert w.steps("forward") == 1
            await w.synced()
            assert await w.reason(token) in (auth_pb2.EXPIRED, auth_pb2.REVOKED)
            await w.step(-5 * MAX_TTL)
            await w.server.run_maintenance()
            assert w.steps("back") == 1
            await w.synced()
            assert await w.reason(token) == auth_pb2.REVOKED

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
            repo = Repository(make_engine(w.server.settings.database_url))
            try:
                # The sync loop records the end: the row is gone, whatever time one asks at.
                async def ended_by_state() -> bool:
                    return len(live_secrets(repo, "orders", to_datetime(START))) == 1

                await w.until(ended_by_state)
            finally:
                repo.engine.dispose()
            await w.step(-STEP)
            with pytest.raises(grpc.aio.AioRpcError) as still:
                await w.issue()
            assert still.value.code() == grpc.StatusCode.UNAUTHENTICATED
            w.secrets["orders"] = reply.service_secret
            assert (await w.issue()).access_token

        run(tmp_path, body)

    def test_a_retired_key_is_not_published_again(self, tmp_path: Path) -> None:
        async def body(w: World) -> None:
            first = {(await w.issue()).key_id}  # the active key, which the rotation retires
            await w.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=await w.admin_md()
            )
            assert first < await w.kids()  # the retired key stays published for now
            w.clock.advance(MAX_TTL + LEEWAY + 1)

            async def unpublished() -> bool:
                return not first & await w.kids()

            await w.until(unpublished)
            await w.step(-STEP)
            # A key change makes every replica reload its keys at the (stepped-back) time.
            await w.stub.RotateSigningKey(
                auth_pb2.RotateSigningKeyRequest(), metadata=await w.admin_md()
            )
            await w.synced()
            assert not first & await w.kids()

        run(tmp_path, body)


class TestWallClock:
    def test_follows_the_wall_clock_and_tells_steps_from_time_passing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        wall = FakeClock()
        seen: list[tuple[str, float]] = []
        clock = WallClock(wall, on_step=lambda direction, s: seen.append((direction, s)))
        assert clock.now() == START
        wall.advance(7200)  # time passing, however much, is no step
        assert clock.now() == START + 7200
        assert seen == []
        with caplog.at_level(logging.WARNING, logger="authsvc.clock"):
            wall.step(-100)
            assert clock.now() == START + 7100
            wall.step(250)
            wall.advance(5)
            assert clock.now() == START + 7355
        assert seen == [("back", 100.0), ("forward", 250.0)]
        assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
        assert "stepped back by 100.0 s" in caplog.records[0].getMessage()
        assert "stepped forward by 250.0 s" in caplog.records[1].getMessage()
        wall.step(0.5)  # below the threshold: ordinary slewing, not reported
        assert clock.now() == START + 7355.5
        assert len(seen) == 2

    def test_a_thread_descheduled_between_its_readings_sees_no_step(self) -> None:
        class Descheduled(FakeClock):
            """Time can pass between reading the monotonic clock and reading the wall clock."""

            delay = 0.0

            def now(self) -> float:
                self.advance(self.delay)
                return self.t

        seen: list[tuple[str, float]] = []
        wall = Descheduled()
        clock = WallClock(wall, on_step=lambda d, s: seen.append((d, s)))
        clock.now()
        wall.delay = 2
        assert clock.now() == START + 2
        wall.delay = 0
        assert clock.now() == START + 2
        assert seen == []

    def test_earliest_now_is_the_lower_of_wall_and_elapsed_time(self) -> None:
        wall = FakeClock()
        clock = WallClock(wall)
        wall.advance(10)
        assert clock.earliest_now() == START + 10
        wall.step(1000)  # forward: elapsed time is the lower
        assert clock.now() == START + 1010
        assert clock.earliest_now() == START + 10
        wall.step(-2000)  # back: the wall clock is the lower
        assert clock.earliest_now() == START - 990

    def test_reads_the_real_wall_clock_unchanged(self) -> None:
        seen: list[tuple[str, float]] = []
        clock = WallClock(SystemClock(), on_step=lambda d, s: seen.append((d, s)))
        before = time.time()
        now = clock.now()
        assert before <= now <= time.time()
        assert seen == []
