"""Remote validators, sync and asyncio, against a real authsvc: the required scopes travel to
the server, a cache hit is the cached result itself (no call, keyed by the scopes too), a
revocation on the feed drops a cached answer at once, and a failure names its status."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client import AsyncTokenSource, LocalValidator, TokenSource, ValidatorUnavailable
from authsvc_client.aio import AsyncRemoteValidator
from authsvc_client.claims import ValidationResult
from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import RemoteValidator
from tests.client.conftest import FOLLOWER_AUDIENCE
from tests.client.test_validation import FAST_RECONNECT, OwnWorld
from tests.integration.conftest import World

VALIDATE = "/authsvc.v1.AuthService/ValidateToken"
READ, WRITE = "billing.read", "billing.write"


def _token(world: World, scopes: list[str] | None = None) -> str:
    return world.server.issue("orders", world.orders_secret, "billing", scopes).access_token


def _revoke(world: World, token: str) -> None:
    world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=5)


class _Recorder:
    """What really went over the wire to authsvc's ValidateToken: each request and the
    server's own answer (before the validator maps it)."""

    def __init__(self) -> None:
        self.requests: list[auth_pb2.ValidateTokenRequest] = []
        self.responses: list[auth_pb2.ValidateTokenResponse] = []
        self._lock = threading.Lock()

    def _is_validate(self, details: Any) -> bool:
        method = details.method
        return (method.decode() if isinstance(method, bytes) else method) == VALIDATE


class _SyncRecorder(_Recorder, grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        if self._is_validate(details):
            with self._lock:
                self.requests.append(request)
                self.responses.append(call.result())
        return call


class _AioRecorder(_Recorder, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        if self._is_validate(details):
            self.requests.append(request)
            self.responses.append(await call)
        return call


class _Remote:
    """One remote validator of either kind, driven synchronously, with the calls it makes
    recorded. `streaming=False` so that every check is one recorded unary call."""

    def __init__(self, world: World, kind: str, **options: Any) -> None:
        self.kind = kind
        self._loop: asyncio.AbstractEventLoop | None = None
        self._options = options
        if kind == "sync":
            self.recorder: _Recorder = _SyncRecorder()
            self._channel: Any = grpc.intercept_channel(
                grpc.insecure_channel(world.server.address), self.recorder
            )
            self.source: Any = None
            if options.pop("follow", False):
                self.source = TokenSource(
                    grpc.insecure_channel(world.server.address),
                    service_id="billing",
                    service_secret=world.billing_secret,
                    audience=FOLLOWER_AUDIENCE,
                    follow_revocations=False,
                )
                options.update(follow_revocations=True, token_source=self.source)
            self.validator: Any = RemoteValidator(
                self._channel, "billing", streaming=False, **options
            )
        else:
            self._loop = asyncio.new_event_loop()
            self.recorder = _AioRecorder()
            self.validator, self.source = self.run(self._make_aio(world, options))

    async def _make_aio(self, world: World, options: dict[str, Any]) -> tuple[Any, Any]:
        self._channel = grpc.aio.insecure_channel(
            world.server.address, interceptors=[self.recorder]
        )
        source = None
        if options.pop("follow", False):
            source = AsyncTokenSource(
                grpc.aio.insecure_channel(world.server.address),
                service_id="billing",
                service_secret=world.billing_secret,
                audience=FOLLOWER_AUDIENCE,
                follow_revocations=False,
            )
            options.update(follow_revocations=True, token_source=source)
        return AsyncRemoteValidator(self._channel, "billing", streaming=False, **options), source

    def run(self, awaitable: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(awaitable)

    def validate(self, token: str, scopes: tuple[str, ...] = ()) -> ValidationResult:
        if self._loop is None:
            return self.validator.validate(token, required_scopes=scopes)  # type: ignore[no-any-return]
        return self.run(self.validator.validate(token, required_scopes=scopes))  # type: ignore[no-any-return]

    def connected(self) -> bool:
        feed = self.validator.feed
        if self._loop is None:
            return bool(feed.connected)
        return bool(self.run(_connected_soon(feed)))

    def close(self) -> None:
        self.validator.close()
        if self._loop is None:
            if self.source is not None:
                self.source.close()
            self._channel.close()
            return

        async def shut() -> None:
            if self.validator.feed is not None:
                await self.validator.feed.wait_stopped()
            if self.source is not None:
                await self.source.close()
            await self._channel.close()

        self.run(shut())
        self._loop.close()


async def _connected_soon(feed: Any) -> bool:
    await asyncio.sleep(0.02)  # lets the feed's task run
    return bool(feed.connected)


def _eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


KINDS = ["sync", "aio"]


@pytest.mark.parametrize("kind", KINDS)
class TestRequiredScopes:
    def test_the_scopes_reach_authsvc_which_answers_insufficient_scope_as_local_does(
        self, world: World, local_validator: LocalValidator, kind: str
    ) -> None:
        remote = _Remote(world, kind)
        try:
            read_only = _token(world, [READ])
            result = remote.validate(read_only, (WRITE,))
            assert result.reason == auth_pb2.INSUFFICIENT_SCOPE
            assert [list(r.required_scopes) for r in remote.recorder.requests] == [[WRITE]]
            # authsvc's own answer, not the client's backstop, says INSUFFICIENT_SCOPE ...
            assert remote.recorder.responses[0].reason == auth_pb2.INSUFFICIENT_SCOPE
            # ... which is what a local validator says for the same token and scopes.
            local = local_validator.validate(read_only, required_scopes=(WRITE,))
            assert local.reason == result.reason
            assert remote.validate(read_only, (READ,)).valid
        finally:
            remote.close()


@pytest.mark.parametrize("kind", KINDS)
class TestPositiveCache:
    def test_a_hit_is_the_cached_result_itself_and_keys_include_the_scopes(
        self, world: World, kind: str
    ) -> None:
        remote = _Remote(world, kind, cache_ttl_seconds=60)
        try:
            token = _token(world)
            first = remote.validate(token, (READ,))
            assert first.valid
            again = remote.validate(token, (READ,))
            assert again is first  # no proto built or parsed again
            assert len(remote.recorder.requests) == 1  # and no call
            # Other scopes are another question: asked, answered and cached on their own.
            both = remote.validate(token, (READ, WRITE))
            assert both.valid and both is not first
            assert len(remote.recorder.requests) == 2
            assert remote.validate(token, (READ, WRITE)) is both
            assert len(remote.recorder.requests) == 2
        finally:
            remote.close()

    def test_a_denial_is_asked_again(self, world: World, kind: str) -> None:
        remote = _Remote(world, kind, cache_ttl_seconds=60)
        try:
            read_only = _token(world, [READ])
            for _ in range(2):
                assert remote.validate(read_only, (WRITE,)).reason == auth_pb2.INSUFFICIENT_SCOPE
            assert len(remote.recorder.requests) == 2
        finally:
            remote.close()


@pytest.mark.parametrize("kind", KINDS)
class TestFollowRevocations:
    def test_a_revocation_drops_the_cached_answer_at_once(self, world: World, kind: str) -> None:
        # A 300 s cache: without the feed the revoked token would stay valid here for minutes.
        following = _Remote(world, kind, cache_ttl_seconds=300, follow=True)
        plain = _Remote(world, kind, cache_ttl_seconds=300)
        try:
            assert _eventually(following.connected, 10), "the revocation feed did not connect"
            token = _token(world)
            cached = following.validate(token)
            assert cached.valid and following.validate(token) is cached
            assert plain.validate(token).valid
            asks = len(following.recorder.requests)

            _revoke(world, token)
            started = time.monotonic()
            assert _eventually(lambda: not following.validate(token).valid, 5)
            took = time.monotonic() - started
            assert following.validate(token).reason == auth_pb2.REVOKED
            # The feed dropped the entry, so authsvc was asked again and said REVOKED ...
            assert len(following.recorder.requests) > asks
            assert following.validator.feed.events_applied >= 1
            # ... while the validator without it still answers from its cache.
            assert plain.validate(token).valid
            print(f"\n[{kind}] revoke -> cached answer dropped in {took * 1000:.0f} ms")
        finally:
            following.close()
            plain.close()


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class TestFailures:
    @pytest.mark.parametrize("kind", KINDS)
    def test_an_unreachable_authsvc_fails_closed_naming_the_status(self, kind: str) -> None:
        address = _dead_address()
        if kind == "sync":
            with grpc.insecure_channel(address) as channel:
                validator = RemoteValidator(channel, "billing", streaming=False)
                with pytest.raises(ValidatorUnavailable) as caught:
                    validator.validate("a.b.c")
        else:

            async def check() -> pytest.ExceptionInfo[ValidatorUnavailable]:
                async with grpc.aio.insecure_channel(address) as channel:
                    validator = AsyncRemoteValidator(channel, "billing", streaming=False)
                    with pytest.raises(ValidatorUnavailable) as caught:
                        await validator.validate("a.b.c")
                    return caught

            caught = asyncio.run(check())
        # grpc.aio's errors are no grpc.Call: the status used to be lost as UNKNOWN.
        assert str(caught.value) in (
            "authsvc ValidateToken failed: UNAVAILABLE",
            "authsvc ValidateToken failed: DEADLINE_EXCEEDED",
        )


@pytest.fixture
def outage_world(tmp_path: Path) -> Iterator[OwnWorld]:
    """An authsvc of the test's own, to crash and restart in place."""
    world = OwnWorld(tmp_path)
    try:
        yield world
    finally:
        world.stop()


class TestFeedOutage:
    """While a following validator cannot hear revocations it does not answer from its cache
    (a revocation might be missed); once the feed is back it asks authsvc afresh."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_nothing_is_served_from_the_cache_while_the_feed_is_down(
        self, outage_world: OwnWorld, kind: str
    ) -> None:
        own_world = outage_world
        token = own_world.issue()
        if kind == "sync":
            recorder: _Recorder = _SyncRecorder()
            channel: Any = grpc.intercept_channel(
                grpc.insecure_channel(own_world.address, options=FAST_RECONNECT), recorder
            )
            validator: Any = RemoteValidator(
                channel,
                "billing",
                cache_ttl_seconds=300,
                timeout_seconds=1,
                streaming=False,
                follow_revocations=True,
                token_source=own_world.follower_token,
            )

            def check() -> ValidationResult:
                return validator.validate(token)  # type: ignore[no-any-return]

            def connected() -> bool:
                return bool(validator.feed.connected)

            def close() -> None:
                validator.close()
                channel.close()

        else:
            loop = asyncio.new_event_loop()
            recorder = _AioRecorder()

            async def follower_token() -> str:
                return own_world.follower_token()

            async def make() -> tuple[Any, Any]:
                aio_channel = grpc.aio.insecure_channel(
                    own_world.address, options=FAST_RECONNECT, interceptors=[recorder]
                )
                return aio_channel, AsyncRemoteValidator(
                    aio_channel,
                    "billing",
                    cache_ttl_seconds=300,
                    timeout_seconds=1,
                    streaming=False,
                    follow_revocations=True,
                    token_source=follower_token,
                )

            channel, validator = loop.run_until_complete(make())

            def check() -> ValidationResult:
                return loop.run_until_complete(validator.validate(token))  # type: ignore[no-any-return]

            def connected() -> bool:
                return bool(loop.run_until_complete(_connected_soon(validator.feed)))

            def close() -> None:
                validator.close()
                loop.run_until_complete(validator.feed.wait_stopped())
                loop.run_until_complete(channel.close())
                loop.close()

        try:
            assert _eventually(connected, 10)
            first = check()
            assert first.valid and check() is first
            asked = len(recorder.requests)

            own_world.crash()
            assert _eventually(lambda: not connected(), 10)
            with pytest.raises(ValidatorUnavailable):
                check()  # authsvc is gone: no cached "valid" without the feed

            own_world.start()
            assert _eventually(connected, 30)
            again = check()
            assert again.valid and again is not first  # asked afresh, not the old entry
            assert len(recorder.requests) > asked + 1
        finally:
            close()
