"""WatchRevocations on a real server: who may follow, how many streams, and replays.

The feed is the one stream every local validator holds open, so it is the RPC an anonymous
caller could multiply: it needs a registered service's token, streams are bounded per peer and
in total, and a replay from cursor 0 reads storage page by page.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import insert

from authsvc.storage.engine import make_engine
from authsvc.storage.models import RevocationRow
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from bench.watch import Streamer
from tests.integration.conftest import World, make_world, sqlite_env
from tests.support.server import RunningServer, run_cli, start_server

Stream = Iterator[auth_pb2.RevocationEvent]


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = exc.value.code()  # type: ignore[attr-defined]
    return code


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _follower_token(world: World, service: str = "orders") -> str:
    secret = world.orders_secret if service == "orders" else world.billing_secret
    return world.server.issue(service, secret, "authsvc").access_token


def _watch(
    server: RunningServer, metadata: list[tuple[str, str]] | None, after: int = 0
) -> Stream:
    return server.stub.WatchRevocations(  # type: ignore[no-any-return]
        auth_pb2.WatchRevocationsRequest(after_cursor=after), timeout=60, metadata=metadata
    )


def _revoke_one(world: World) -> str:
    """Revoke a fresh token so every stream from cursor 0 has an event to send at once."""
    token = world.server.issue("orders", world.orders_secret, "billing").access_token
    world.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=10)
    return token


def _open(server: RunningServer, metadata: list[tuple[str, str]]) -> Stream:
    """A stream that holds its slot: its first event has arrived."""
    stream = _watch(server, metadata)
    next(stream)
    return stream


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met within the deadline")


class TestWhoMayFollow:
    def test_anonymous_follower_is_unauthenticated(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            next(_watch(world.server, None))
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED

    def test_scopeless_token_for_authsvc_follows(self, world: World) -> None:
        # billing's audiences do not include authsvc: any registered service may still get
        # a token for authsvc, with no scope, and follow the feed with it.
        issued = world.server.issue("billing", world.billing_secret, "authsvc")
        assert list(issued.scopes) == []
        token = _revoke_one(world)
        stream = _watch(world.server, _bearer(issued.access_token))
        jtis = set()
        for event in stream:
            jtis.add(event.jti)
            if event.jti == _jti(token):
                break
        stream.cancel()  # type: ignore[attr-defined]
        assert _jti(token) in jtis

    def test_scopes_for_authsvc_still_need_a_grant(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.issue("billing", world.billing_secret, "authsvc", ["authsvc.admin"])
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    def test_scopeless_token_is_no_admin_token(self, world: World) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            world.server.stub.ListServices(
                auth_pb2.ListServicesRequest(),
                metadata=_bearer(_follower_token(world)),
                timeout=10,
            )
        assert _code(exc) == grpc.StatusCode.PERMISSION_DENIED

    def test_admin_token_follows(self, world: World) -> None:
        _revoke_one(world)
        stream = _watch(world.server, world.admin_md())
        assert next(stream).cursor > 0
        stream.cancel()  # type: ignore[attr-defined]

    def test_token_for_another_audience_is_refused(self, world: World) -> None:
        token = world.server.issue("orders", world.orders_secret, "billing").access_token
        with pytest.raises(grpc.RpcError) as exc:
            next(_watch(world.server, _bearer(token)))
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        assert "WRONG_AUDIENCE" in exc.value.details()  # type: ignore[attr-defined]


def _jti(token: str) -> str:
    import base64
    import json

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


class TestStreamLimits:
    def _limited(self, tmp_path: Path, per_peer: int, total: int) -> tuple[World, RunningServer]:
        return make_world(
            tmp_path,
            AUTHSVC_WATCH_STREAMS_PER_PEER=str(per_peer),
            AUTHSVC_WATCH_STREAMS_MAX=str(total),
        )

    def _exhausted(self, server: RunningServer, md: list[tuple[str, str]]) -> str:
        with pytest.raises(grpc.RpcError) as exc:
            next(_watch(server, md))
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(exc.value.trailing_metadata())  # type: ignore[attr-defined]
        assert int(trailers["retry-after"]) > 0
        return str(exc.value.details())  # type: ignore[attr-defined]

    def test_per_peer_limit_is_resource_exhausted(self, tmp_path: Path) -> None:
        world, server = self._limited(tmp_path, per_peer=2, total=100)
        try:
            _revoke_one(world)
            md = _bearer(_follower_token(world))
            streams = [_open(server, md), _open(server, md)]
            assert "from this peer" in self._exhausted(server, md)
            # A closed stream gives its slot back.
            streams.pop().cancel()  # type: ignore[attr-defined]
            reopened: list[Stream] = []

            def reopen() -> bool:
                try:
                    reopened.append(_open(server, md))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
                    return False
                return True

            _wait_for(reopen)
            for stream in streams + reopened:
                stream.cancel()  # type: ignore[attr-defined]
        finally:
            server.stop()

    def test_total_limit_is_resource_exhausted(self, tmp_path: Path) -> None:
        world, server = self._limited(tmp_path, per_peer=100, total=3)
        try:
            _revoke_one(world)
            # Different services, one server-wide bound.
            streams = [
                _open(server, _bearer(_follower_token(world, "orders"))),
                _open(server, _bearer(_follower_token(world, "billing"))),
                _open(server, world.admin_md()),
            ]
            details = self._exhausted(server, _bearer(_follower_token(world)))
            assert "limit 3" in details and "from this peer" not in details
            for stream in streams:
                stream.cancel()  # type: ignore[attr-defined]
        finally:
            server.stop()

    def test_many_open_streams_do_not_starve_unary_calls(self, tmp_path: Path) -> None:
        world, server = self._limited(tmp_path, per_peer=64, total=64)
        try:
            _revoke_one(world)
            md = _bearer(_follower_token(world))
            streams = [_open(server, md) for _ in range(40)]
            try:
                token = server.issue("orders", world.orders_secret, "billing").access_token
                for _ in range(20):
                    response = server.stub.ValidateToken(
                        auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
                    )
                    assert response.valid
                # A revocation reaches every open stream.
                revoked = _revoke_one(world)
                for stream in streams:
                    assert next(stream).jti == _jti(revoked)
            finally:
                for stream in streams:
                    stream.cancel()  # type: ignore[attr-defined]
        finally:
            server.stop()


class TestReplay:
    def test_replay_from_zero_is_paged_and_sends_each_event_once_in_order(
        self, tmp_path: Path
    ) -> None:
        # More revocations than three replay pages, all in storage before the server starts,
        # so a stream from cursor 0 must read them from storage, not from the live log.
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        now = datetime.now(UTC)
        engine = make_engine(env["AUTHSVC_DATABASE_URL"])
        try:
            with engine.begin() as conn:
                conn.execute(
                    insert(RevocationRow),
                    [
                        {
                            "jti": f"stored-{i}",
                            "service_id": None,
                            "revoked_before": None,
                            "expires_at": now + timedelta(hours=1),
                            "reason": "test",
                            "created_at": now,
                            "kind": "token",
                        }
                        for i in range(3_100)
                    ],
                )
        finally:
            engine.dispose()
        server = start_server(env)
        try:
            secret = server.create_service("orders", ["billing"], ["billing.read"])
            md = _bearer(server.issue("orders", secret, "authsvc").access_token)
            stream = _watch(server, md)
            replayed = [next(stream) for _ in range(3_100)]
            assert [e.jti for e in replayed] == [f"stored-{i}" for i in range(3_100)]
            cursors = [e.cursor for e in replayed]
            assert cursors == sorted(set(cursors))
            assert all(e.kind == auth_pb2.REVOCATION_KIND_TOKEN for e in replayed)
            # Then live events, strictly after the replay, none repeated.
            token = server.issue("orders", secret, "billing").access_token
            server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=10)
            live = next(stream)
            assert live.jti == _jti(token) and live.cursor > cursors[-1]
            stream.cancel()  # type: ignore[attr-defined]
        finally:
            server.stop()



def _seed_revocations(env: dict[str, str], count: int, jti_chars: int = 16) -> None:
    """`count` live revocations straight into storage (before the server starts)."""
    now = datetime.now(UTC)
    engine = make_engine(env["AUTHSVC_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(RevocationRow),
                [
                    {
                        "jti": f"stored-{i}".ljust(jti_chars, "x"),
                        "service_id": None,
                        "revoked_before": None,
                        "expires_at": now + timedelta(hours=1),
                        "reason": "test",
                        "created_at": now,
                        "kind": "token",
                    }
                    for i in range(count)
                ],
            )
    finally:
        engine.dispose()


class TestShutdown:
    def test_stopping_with_a_stream_stuck_in_a_write_logs_no_task_exception(
        self, tmp_path: Path
    ) -> None:
        # A stream cancelled while gRPC waits to send its next message (the client reads
        # nothing, so HTTP/2 flow control holds the write) leaves its generator suspended;
        # asyncio closes it later in another task. Its per-call log fields were then reset in
        # that task's context, which never set them: "Task exception was never retrieved ...
        # ValueError: <Token var=authsvc_rpc_log_fields> was created in a different Context".
        env = sqlite_env(tmp_path, AUTHSVC_SHUTDOWN_GRACE_SECONDS="0.5")
        run_cli(env, "db", "upgrade")
        # Far more than the client's flow-control window (about 4 MB of events).
        _seed_revocations(env, 20_000, jti_chars=200)
        server = start_server(env)
        try:
            secret = server.create_service("orders", ["billing"], ["billing.read"])
            md = _bearer(server.issue("orders", secret, "authsvc").access_token)
            channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            stream = stub.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after_cursor=0), timeout=60, metadata=md
            )
            assert next(stream).jti.startswith("stored-0")
            # Time for the server to fill the window and wait; the stream stays open until
            # the server stops (its grace ends, the call is cancelled).
            time.sleep(2)
        finally:
            code = server.stop()
        output = "".join(server.output)
        assert code == 0, output[-2000:]
        assert "shutting down" in output  # the server's own lines were captured
        assert "was created in a different Context" not in output, output[-3000:]
        assert "Task exception was never retrieved" not in output, output[-3000:]
        channel.close()


class TestReconnectBurst:
    def test_1500_streams_opened_at_once_are_all_served_first_time(self, tmp_path: Path) -> None:
        # Past 1,000 calls waiting to be picked up, gRPC core cancels new ones at random
        # (`grpc.server.max_pending_requests`); the server raises that bound above its stream
        # limit, so a whole fleet of followers reconnecting after a restart gets in at once.
        world, server = make_world(
            tmp_path, AUTHSVC_WATCH_STREAMS_PER_PEER="1600", AUTHSVC_WATCH_STREAMS_MAX="1600"
        )
        followers: Streamer | None = None
        try:
            followers = Streamer(server.address, _follower_token(world), streams=1500, after=0)
            followers.expect("opened ", 120)
            _revoke_one(world)  # each stream's first event
            # "ready reopened <opens repeated> <by status code>"
            ready = followers.expect("ready", 300).split()
            assert ready[2] == "0", ready
            events, failed, reopened = followers.finish()
            followers = None
            assert (events, failed, reopened) == (1500, 0, 0)
        finally:
            if followers is not None:
                followers.kill()
            server.stop()
