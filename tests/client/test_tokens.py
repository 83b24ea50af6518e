"""Token sources against a real authsvc: reuse, refresh ahead, single flight, backoff, env."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client import (
    AsyncTokenSource,
    CredentialsError,
    TokenSource,
    TokenState,
    TokenUnavailable,
)
from tests.client.conftest import FOLLOWER_AUDIENCE, Counter, FakeClock
from tests.integration.conftest import World


def _source(world: World, channel: grpc.Channel, clock: FakeClock, **kw: object) -> TokenSource:
    return TokenSource(
        channel,
        service_id="orders",
        service_secret=world.orders_secret,
        audience="billing",
        scopes=["billing.read"],
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class TestTokenSource:
    def test_token_is_reused_until_refresh_time(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter
    ) -> None:
        clock = FakeClock()
        source = _source(world, authsvc_channel, clock)
        first = source.token()
        assert all(source.token() == first for _ in range(20))
        assert counter.count() == 1
        assert source.state is TokenState.FRESH

    def test_one_issue_token_for_100_concurrent_callers_when_invalid(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter
    ) -> None:
        clock = FakeClock()
        source = _source(world, authsvc_channel, clock)
        first = source.token()
        clock.advance(3600)  # past expiry: every caller must wait for the refresh
        assert source.state is TokenState.INVALID
        barrier = threading.Barrier(100)
        results: list[str] = []

        def caller() -> None:
            barrier.wait()
            results.append(source.token())

        threads = [threading.Thread(target=caller) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 100 and len(set(results)) == 1
        assert results[0] != first
        assert counter.count() == 2

    def test_stale_token_is_served_while_one_background_refresh_runs(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter
    ) -> None:
        clock = FakeClock()
        source = _source(world, authsvc_channel, clock, jitter_ratio=0.0)
        first = source.token()
        clock.advance(900 * 0.85)  # past 80% of the 15-minute lifetime
        assert source.state is TokenState.STALE
        served = [source.cached_token() for _ in range(100)]
        assert served == [first] * 100  # never blocked, never empty
        def state() -> TokenState:
            return source.state

        for _ in range(200):
            if state() is TokenState.FRESH:
                break
            threading.Event().wait(0.01)
        assert state() is TokenState.FRESH
        assert source.token() != first
        assert counter.count() == 2

    def test_backs_off_when_authsvc_is_unavailable(self, world: World) -> None:
        counter = Counter()
        channel = grpc.intercept_channel(grpc.insecure_channel(_dead_address()), counter)
        clock = FakeClock()
        source = _source(world, channel, clock, backoff_initial_seconds=10.0)
        with pytest.raises(TokenUnavailable) as info:
            source.token()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        for _ in range(20):  # inside the backoff window: fail fast, no new attempt
            with pytest.raises(TokenUnavailable):
                source.token()
        assert counter.count() == 1
        clock.advance(11)
        with pytest.raises(TokenUnavailable):
            source.token()
        assert counter.count() == 2
        channel.close()

    def test_wrong_secret_fails_without_echoing_it(
        self, world: World, authsvc_channel: grpc.Channel
    ) -> None:
        secret = "asvcs_wrong-secret-that-must-not-leak-0123456789"
        source = TokenSource(
            authsvc_channel, service_id="orders", service_secret=secret, audience="billing"
        )
        with pytest.raises(TokenUnavailable) as info:
            source.token()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert secret not in str(info.value) and secret not in repr(info.value)

    def test_repr_hides_secret_and_token(
        self, world: World, authsvc_channel: grpc.Channel
    ) -> None:
        source = _source(world, authsvc_channel, FakeClock())
        token = source.token()
        for text in (repr(source), str(source)):
            assert world.orders_secret not in text
            assert token not in text
            assert "redacted" in text


    def test_a_token_revoked_on_every_arrival_is_never_handed_out(
        self, world: World, authsvc_channel: grpc.Channel, counter: Counter
    ) -> None:
        """A revoke-all cutoff ahead of every token a refresh gets (as when revocations of the
        service keep coming): three tries, each waited out, then an error, not the dead
        token; the caller asks again later."""
        source = _source(world, authsvc_channel, FakeClock())
        source._core.note_cutoff(int(time.time()) + 8)
        with pytest.raises(TokenUnavailable, match="revoked before it arrived"):
            source.token(timeout=20)
        assert counter.count() == 3
        assert source._core.token is None


class TestFromEnv:
    def _env(self, world: World, **extra: str) -> dict[str, str]:
        return {"AUTHSVC_SERVICE_ID": "orders", "AUTHSVC_TARGET": world.server.address, **extra}

    def test_secret_from_variable(self, world: World) -> None:
        env = self._env(world, AUTHSVC_SERVICE_SECRET=world.orders_secret)
        with TokenSource.from_env("billing", ["billing.read"], environ=env) as source:
            assert source.token()

    def test_secret_file_owner_only(self, world: World, tmp_path: Path) -> None:
        path = tmp_path / "secret"
        path.write_text(world.orders_secret + "\n")
        path.chmod(0o600)
        env = self._env(world, AUTHSVC_SERVICE_SECRET_FILE=str(path))
        with TokenSource.from_env("billing", environ=env) as source:
            assert source.token()

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
    def test_secret_file_readable_by_others_is_refused(
        self, world: World, tmp_path: Path, mode: int
    ) -> None:
        path = tmp_path / "secret"
        path.write_text(world.orders_secret)
        path.chmod(mode)
        env = self._env(world, AUTHSVC_SERVICE_SECRET_FILE=str(path))
        with pytest.raises(CredentialsError, match="group or others") as info:
            TokenSource.from_env("billing", environ=env)
        assert world.orders_secret not in str(info.value)

    @pytest.mark.parametrize(
        ("drop", "named"),
        [
            ("AUTHSVC_SERVICE_ID", "AUTHSVC_SERVICE_ID"),
            ("AUTHSVC_SERVICE_SECRET", "AUTHSVC_SERVICE_SECRET"),
            ("AUTHSVC_TARGET", "AUTHSVC_TARGET"),
        ],
    )
    def test_missing_variable_is_named(self, world: World, drop: str, named: str) -> None:
        env = self._env(world, AUTHSVC_SERVICE_SECRET=world.orders_secret)
        del env[drop]
        with pytest.raises(CredentialsError, match=named) as info:
            TokenSource.from_env("billing", environ=env)
        assert world.orders_secret not in str(info.value)

    def test_both_secret_sources_is_ambiguous(self, world: World, tmp_path: Path) -> None:
        path = tmp_path / "secret"
        path.write_text("x")
        os.chmod(path, 0o600)
        env = self._env(
            world, AUTHSVC_SERVICE_SECRET="y", AUTHSVC_SERVICE_SECRET_FILE=str(path)
        )
        with pytest.raises(CredentialsError, match="only one"):
            TokenSource.from_env("billing", environ=env)


class TestAsyncTokenSource:
    def test_one_issue_token_for_100_concurrent_awaiters(self, world: World) -> None:
        async def scenario() -> tuple[int, int, set[str], TokenState]:
            counter = _AioCounter()
            channel = grpc.aio.insecure_channel(world.server.address, interceptors=[counter])
            clock = FakeClock()
            source = AsyncTokenSource(
                channel,
                service_id="orders",
                service_secret=world.orders_secret,
                audience="billing",
                clock=clock,
            )
            tokens = await asyncio.gather(*(source.token() for _ in range(100)))
            first_round = counter.count
            clock.advance(3600)
            state = source.state
            again = await asyncio.gather(*(source.token() for _ in range(100)))
            await channel.close()
            return first_round, counter.count, set(tokens) | set(again), state

        first_round, total, distinct, state = asyncio.run(scenario())
        assert first_round == 1
        assert state is TokenState.INVALID
        assert total == 2
        assert len(distinct) == 2

    def test_a_token_revoked_on_every_arrival_is_never_handed_out(self, world: World) -> None:
        async def scenario() -> tuple[str, int]:
            counter = _AioCounter()
            channel = grpc.aio.insecure_channel(world.server.address, interceptors=[counter])
            source = AsyncTokenSource(
                channel,
                service_id="orders",
                service_secret=world.orders_secret,
                audience="billing",
                clock=FakeClock(),
            )
            source._core.note_cutoff(int(time.time()) + 8)
            try:
                await source.token()
            except TokenUnavailable as exc:
                message = str(exc)
            else:
                message = "a token was handed out"
            await channel.close()
            return message, counter.count

        message, calls = asyncio.run(scenario())
        assert "revoked before it arrived" in message
        assert calls == 3

    def test_from_env_and_repr(self, world: World) -> None:
        async def scenario() -> tuple[str, str]:
            env = {
                "AUTHSVC_SERVICE_ID": "orders",
                "AUTHSVC_SERVICE_SECRET": world.orders_secret,
                "AUTHSVC_TARGET": world.server.address,
            }
            async with AsyncTokenSource.from_env("billing", environ=env) as source:
                return await source.token(), repr(source)

        token, text = asyncio.run(scenario())
        assert token and token not in text and world.orders_secret not in text


class _AioCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.count = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method == "/authsvc.v1.AuthService/IssueToken" and (
            request.audience != FOLLOWER_AUDIENCE
        ):
            self.count += 1
        return await continuation(details, request)
