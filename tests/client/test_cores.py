"""The sans-IO cores the sync and asyncio classes share, exercised without any network."""

from __future__ import annotations

import base64
import json
import random

import grpc
import pytest

from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.errors import ValidatorUnavailable, status_of
from authsvc_client.interceptors import SHAPES, behavior_of, handler_for, rebuild, shape_of
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.streaming import _Fifo, _Pool
from authsvc_client.tokens import _Core
from authsvc_client.v1 import auth_pb2
from authsvc_client.validation import FeedState, PositiveCache, RemoteCore

NOW = 1_900_000_000.0


def _claims(jti: str = "j1", scopes: tuple[str, ...] = ("a", "b"), exp: int = 0) -> Claims:
    return Claims(
        issuer="https://authsvc.test",
        subject="orders",
        audience="billing",
        scopes=scopes,
        issued_at=int(NOW) - 10,
        not_before=int(NOW) - 10,
        expires_at=exp or int(NOW) + 600,
        jti=jti,
        key_id="k1",
        client_id="orders",
    )


def _valid(claims: Claims) -> auth_pb2.ValidateTokenResponse:
    return ValidationResult.ok(claims).to_proto()


def _core(revocations: RevocationSet | None = None, ttl: float = 5.0) -> RemoteCore:
    return RemoteCore(
        "billing",
        cache_ttl_seconds=ttl,
        cache_size=2,
        timeout_seconds=2.0,
        clock=lambda: NOW,
        revocations=revocations,
    )


class TestRemoteCore:
    def test_the_request_carries_the_audience_and_the_required_scopes(self) -> None:
        request = _core().request("t", ("a", "b"))
        assert (request.token, request.audience, list(request.required_scopes)) == (
            "t",
            "billing",
            ["a", "b"],
        )

    def test_an_answer_is_cached_per_token_and_scopes_and_a_hit_is_that_object(self) -> None:
        core = _core()
        key, hit = core.lookup("t", ("a",), NOW, True)
        assert hit is None and key is not None
        result = core.answer(key, _valid(_claims()), ("a",), NOW, token="t")
        assert result.valid
        assert core.lookup("t", ("a",), NOW + 1, True)[1] is result
        assert core.lookup("t", ("a", "b"), NOW + 1, True)[1] is None  # other scopes
        assert core.lookup("u", ("a",), NOW + 1, True)[1] is None  # other token

    def test_entries_end_at_the_ttl_or_the_token_expiry(self) -> None:
        core = _core(ttl=5)
        key, _ = core.lookup("t", (), NOW, True)
        core.answer(key, _valid(_claims()), (), NOW, token="t")
        assert core.lookup("t", (), NOW + 4.9, True)[1] is not None
        assert core.lookup("t", (), NOW + 5, True)[1] is None
        key, _ = core.lookup("soon", (), NOW, True)
        core.answer(key, _valid(_claims(exp=int(NOW) + 2)), (), NOW, token="soon")
        assert core.lookup("soon", (), NOW + 2, True)[1] is None

    def test_denials_are_not_cached_and_nothing_is_while_the_cache_is_off(self) -> None:
        core = _core()
        key, _ = core.lookup("t", ("c",), NOW, True)
        denied = core.answer(key, _valid(_claims()), ("c",), NOW, token="t")  # valid, lacking "c"
        assert denied.reason == auth_pb2.INSUFFICIENT_SCOPE  # the fail-closed backstop
        assert len(core.cache) == 0
        off_key, _ = core.lookup("t", (), NOW, False)
        assert off_key is None
        core.answer(off_key, _valid(_claims()), (), NOW, token="t")
        assert len(core.cache) == 0

    def test_a_revoked_entry_is_dropped_on_lookup(self) -> None:
        revocations = RevocationSet()
        core = _core(revocations)
        key, _ = core.lookup("t", (), NOW, True)
        core.answer(key, _valid(_claims(jti="gone")), (), NOW, token="t")
        revocations.add(RevocationEntry(1, "gone", None, None, int(NOW) + 600))
        assert core.lookup("t", (), NOW, True)[1] is None
        assert len(core.cache) == 0

    @staticmethod
    def _delegated(parents: list[str]) -> tuple[str, Claims]:
        """A token string front -> orders -> billing (its payload as authsvc writes it; the
        cache reads only the chain) and the claims a server's valid answer carries."""
        payload = {
            "sub": "front",
            "act": {"sub": "billing", "act": {"sub": "orders"}},
            "parent_jtis": parents,
        }
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
        claims = Claims(
            issuer="https://authsvc.test",
            subject="front",
            audience="ledger",
            scopes=("a",),
            issued_at=int(NOW) - 10,
            not_before=int(NOW) - 10,
            expires_at=int(NOW) + 600,
            jti="d1",
            key_id="k1",
            client_id="billing",
            actors=("billing", "orders"),
        )
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln", claims

    @pytest.mark.parametrize(
        "revocation",
        [
            RevocationEntry(1, "p-near", None, None, int(NOW) + 600),
            RevocationEntry(1, "p-far", None, None, int(NOW) + 600),
            RevocationEntry(1, None, "orders", int(NOW), int(NOW) + 600, "service_tokens"),
            RevocationEntry(1, None, "billing", int(NOW), int(NOW) + 600, "service_disabled"),
        ],
        ids=["nearest-parent", "first-parent", "actor-revoked", "actor-disabled"],
    )
    def test_a_delegated_entry_is_dropped_when_its_chain_is_revoked(
        self, revocation: RevocationEntry
    ) -> None:
        revocations = RevocationSet()
        core = _core(revocations)
        token, claims = self._delegated(["p-near", "p-far"])
        key, _ = core.lookup(token, (), NOW, True)
        core.answer(key, _valid(claims), (), NOW, token=token)
        assert core.lookup(token, (), NOW, True)[1] is not None
        revocations.add(RevocationEntry(1, "unrelated", "mallory", int(NOW), int(NOW) + 600))
        assert core.lookup(token, (), NOW, True)[1] is not None
        revocations.add(revocation)
        assert core.lookup(token, (), NOW, True)[1] is None
        assert len(core.cache) == 0

    def test_an_actors_cutoff_before_the_token_was_issued_leaves_it(self) -> None:
        revocations = RevocationSet()
        core = _core(revocations)
        token, claims = self._delegated(["p-near", "p-far"])
        key, _ = core.lookup(token, (), NOW, True)
        core.answer(key, _valid(claims), (), NOW, token=token)
        cutoff = claims.issued_at  # tokens issued before this second: not this one
        revocations.add(RevocationEntry(1, None, "orders", cutoff, int(NOW) + 600))
        assert core.lookup(token, (), NOW, True)[1] is not None

    @pytest.mark.parametrize(
        "token",
        ["not-a-jwt", "a.e30.c", None],
        ids=["unreadable", "no-chain", "other-chain"],
    )
    def test_a_delegated_answer_whose_chain_cannot_be_read_is_not_cached(
        self, token: str | None
    ) -> None:
        core = _core(RevocationSet())
        _, claims = self._delegated(["p-near", "p-far"])
        if token is None:  # a chain naming other actors than the server's answer
            token, _ = self._delegated(["p-near"])
            token = token.replace(
                token.split(".")[1],
                base64.urlsafe_b64encode(
                    json.dumps(
                        {"sub": "front", "act": {"sub": "mallory"}, "parent_jtis": ["x"]}
                    ).encode()
                )
                .rstrip(b"=")
                .decode(),
            )
        key, _ = core.lookup(token, (), NOW, True)
        assert core.answer(key, _valid(claims), (), NOW, token=token).valid
        assert len(core.cache) == 0

    def test_the_cache_holds_at_most_its_size_oldest_out_first(self) -> None:
        core = _core()
        for token in ("t1", "t2", "t3"):
            key, _ = core.lookup(token, (), NOW, True)
            core.answer(key, _valid(_claims(jti=token)), (), NOW, token=token)
        assert len(core.cache) == 2
        assert core.lookup("t1", (), NOW, True)[1] is None

    def test_a_malformed_server_answer_fails_closed(self) -> None:
        core = _core()
        key, _ = core.lookup("t", (), NOW, True)
        odd = auth_pb2.ValidateTokenResponse(valid=True)  # valid without claims
        assert core.answer(key, odd, (), NOW, token="t").reason == auth_pb2.MALFORMED
        assert len(core.cache) == 0

    def test_failures_keep_their_status_for_sync_and_asyncio_errors(self) -> None:
        core = _core()
        aio_error = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
        )
        assert not isinstance(aio_error, grpc.Call)
        with pytest.raises(ValidatorUnavailable, match=r"failed: UNAVAILABLE$"):
            core.failed(aio_error)
        bad_input = grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata()
        )
        assert core.failed(bad_input).reason == auth_pb2.MALFORMED
        assert status_of(ValueError()) is grpc.StatusCode.UNKNOWN

    def test_the_unary_fallback_gets_what_the_stream_left_of_the_deadline(self) -> None:
        core = _core()
        assert core.remaining(0.5) == pytest.approx(1.5)
        with pytest.raises(ValidatorUnavailable, match="deadline"):
            core.remaining(2.0)

    def test_a_single_string_of_scopes_is_refused(self) -> None:
        with pytest.raises(TypeError):
            _core().lookup("t", "ab", NOW, True)

    def test_cache_keys_hash_the_token(self) -> None:
        digest, scopes = PositiveCache.key("secret-token", ("a",))
        assert len(digest) == 32 and b"secret" not in digest and scopes == ("a",)


class TestFeedState:
    def _state(self) -> tuple[FeedState, list[float]]:
        mono = [0.0]
        state = FeedState(initial=0.1, maximum=0.8, settle_seconds=0.25, monotonic=lambda: mono[0])
        return state, mono

    def test_connected_after_settling_on_a_ready_channel_or_after_an_event(self) -> None:
        state, mono = self._state()
        assert not state.connected()
        assert state.outage_seconds(NOW) == float("inf")  # never connected yet
        mono[0] = 10.0
        state.opened()
        mono[0] = 10.5
        assert not state.connected()  # channel not ready
        state.channel(True, NOW)
        other, other_mono = self._state()
        other.channel(True, NOW)
        other_mono[0] = 10.0
        other.opened()
        other_mono[0] = 10.1
        assert not other.connected()  # not settled
        other_mono[0] = 10.25
        assert other.connected()
        assert state.connected()
        proved, _ = self._state()
        proved.opened()
        proved.event()  # an event proves the channel too
        assert proved.connected()

    def test_an_outage_counts_from_the_loss(self) -> None:
        state, mono = self._state()
        state.opened()
        state.event()
        state.closed(NOW)
        assert not state.connected()
        assert state.outage_seconds(NOW + 3) == 3.0
        mono[0] = 2.0
        state.opened()
        state.event()
        assert state.outage_seconds(NOW + 9) == 0.0
        state.channel(False, NOW + 10)
        assert state.outage_seconds(NOW + 12) == 2.0

    def test_reconnects_back_off_and_start_over_after_a_good_stream(self) -> None:
        state, _ = self._state()
        assert [state.retry_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.8, 0.8]
        state.opened()
        state.closed(NOW)  # never confirmed: no reset
        assert state.retry_delay() == 0.8
        state.opened()
        state.event()
        state.closed(NOW)
        assert state.retry_delay() == 0.1


class TestShapeTable:
    def test_every_shape_round_trips_through_the_one_table(self) -> None:
        def behavior(request: bytes, _context: object) -> bytes:
            return request

        def other(request: bytes, _context: object) -> bytes:
            return request[::-1]

        for shape in SHAPES:
            handler = handler_for(shape, behavior, request_deserializer=bytes)
            assert shape_of(handler) == shape
            assert behavior_of(handler) is behavior
            rebuilt = rebuild(handler, other)
            assert shape_of(rebuilt) == shape and behavior_of(rebuilt) is other
            assert rebuilt.request_deserializer is bytes
        assert shape_of(None) == (False, False)


# --- token sources ------------------------------------------------------------------------


def _jwt(jti: str, iat: int) -> str:
    payload = json.dumps({"jti": jti, "iat": iat}).encode()
    return "e30." + base64.urlsafe_b64encode(payload).decode().rstrip("=") + ".sig"


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _token_core(clock: _Clock) -> _Core:
    return _Core(
        service_id="orders",
        service_secret="s3cret-value",
        audience="billing",
        scopes=("billing.read",),
        ttl_seconds=0,
        refresh_ratio=0.8,
        jitter_ratio=0.0,
        expiry_margin_seconds=10.0,
        timeout_seconds=5.0,
        backoff_initial_seconds=0.5,
        backoff_max_seconds=30.0,
        clock=clock,
        rng=random.Random(7),
    )


def _issued(core: _Core, now: float, *, jti: str = "j1", lifetime: int = 100) -> None:
    core.accept(
        auth_pb2.IssueTokenResponse(
            access_token=_jwt(jti, int(now)), expires_in=lifetime, key_id="k1"
        ),
        now,
    )


class TestTokenCore:
    def test_no_token_means_one_refresh_then_wait(self) -> None:
        core = _token_core(_Clock())
        first = core.plan(NOW, in_flight=False, closed=False)
        assert (first.token, first.refresh, first.error) == (None, True, None)
        waiting = core.plan(NOW, in_flight=True, closed=False)  # the refresh runs: wait
        assert (waiting.token, waiting.refresh, waiting.error) == (None, False, None)

    def test_fresh_is_served_stale_is_served_while_one_refresh_starts(self) -> None:
        core = _token_core(_Clock())
        _issued(core, NOW)
        token = core.token
        assert token is not None
        fresh = core.plan(NOW + 79, in_flight=False, closed=False)
        assert (fresh.token, fresh.refresh) == (token.value, False)
        stale = core.plan(NOW + 81, in_flight=False, closed=False)
        assert (stale.token, stale.refresh) == (token.value, True)
        assert core.plan(NOW + 81, in_flight=True, closed=False).refresh is False
        # Within the expiry margin it is no longer handed out.
        assert core.plan(NOW + 91, in_flight=True, closed=False).token is None

    def test_after_a_failure_callers_fail_fast_until_the_backoff_ends(self) -> None:
        core = _token_core(_Clock())
        refused = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
        )
        error = core.reject(refused, NOW)
        assert error.code is grpc.StatusCode.UNAVAILABLE  # an asyncio error keeps its code
        held = core.plan(NOW + 0.1, in_flight=False, closed=False)
        assert (held.token, held.refresh, held.error) == (None, False, error)
        assert core.plan(NOW + 0.6, in_flight=False, closed=False).refresh is True

    def test_a_closed_source_starts_nothing(self) -> None:
        plan = _token_core(_Clock()).plan(NOW, in_flight=False, closed=True)
        assert plan.refresh is False and plan.error is not None

    def test_the_follower_source_is_scopeless_for_authsvc_and_follows_nothing(self) -> None:
        options = _token_core(_Clock()).watch_options("authsvc")
        assert options["audience"] == "authsvc" and options["follow_revocations"] is False
        assert options["service_id"] == "orders" and "scopes" not in options

    def test_events_drop_the_token_by_jti_or_by_the_service_cutoff(self) -> None:
        core = _token_core(_Clock())
        _issued(core, NOW, jti="mine")
        assert not core.apply(auth_pb2.RevocationEvent(cursor=1, jti="other"))
        assert core.apply(auth_pb2.RevocationEvent(cursor=2, jti="mine"))
        assert core.token is None
        _issued(core, NOW, jti="next")
        cutoff = auth_pb2.RevocationEvent(cursor=3, service_id="orders")
        cutoff.revoked_before.seconds = int(NOW) + 1
        assert core.apply(cutoff)
        # A token issued before that cutoff is dead on arrival: wait out the second.
        _issued(core, NOW, jti="late")
        token = core.token
        assert token is not None
        assert core.dead_on_arrival(token) == 1.0

    def test_the_follow_loop_resumes_from_the_cursor_and_backs_off(self) -> None:
        follow = _token_core(_Clock()).follow()
        follow.event(auth_pb2.RevocationEvent(cursor=41))
        follow.event(auth_pb2.RevocationEvent(cursor=7))  # a replay: the cursor stays
        assert follow.request().after_cursor == 41
        unauthenticated = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata()
        )
        assert follow.rpc_failed(unauthenticated) is True  # drop the bearer
        first = follow.delay(100.0)
        assert 0.25 <= first <= 0.5
        unavailable = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
        )
        assert follow.rpc_failed(unavailable) is False
        assert 0.5 <= follow.delay(100.0) <= 1.0
        follow.event(auth_pb2.RevocationEvent(cursor=42))
        assert follow.delay(100.0) <= 0.5  # a good event started the pacing over


# --- ValidateTokenStream multiplexing ------------------------------------------------------


class TestStreamFifo:
    def test_answers_pair_with_callers_in_wire_order_and_the_rest_ask_again(self) -> None:
        fifo: _Fifo[str] = _Fifo(max_in_flight=2)
        assert fifo.admit("first") and fifo.admit("second")
        assert not fifo.admit("third")  # full: that caller goes unary
        assert fifo.answered() == "first"
        assert fifo.admit("third")
        assert fifo.end() == ["second", "third"]
        assert not fifo.alive and not fifo.admit("late")

    def test_an_answer_nobody_asked_for_is_refused(self) -> None:
        with pytest.raises(IndexError):
            _Fifo[str](max_in_flight=1).answered()


class _FakeStream:
    """Only the three members the pool reads (a stand-in for the stream's bookkeeping, not
    for any network)."""

    def __init__(self, load: int = 0) -> None:
        self.alive = True
        self.load = load

    def close(self) -> None:
        self.alive = False


class TestStreamPool:
    def test_opens_up_to_its_size_then_picks_the_least_loaded(self) -> None:
        pool: _Pool[_FakeStream] = _Pool(2, clock=lambda: 0.0)
        loads = iter([5, 1])
        first = pool.pick(lambda: _FakeStream(next(loads)))
        second = pool.pick(lambda: _FakeStream(next(loads)))
        assert first is not None and second is not None and first is not second
        assert pool.pick(lambda: pytest.fail("a third stream")) is second

    def test_a_failed_stream_backs_off_and_unimplemented_pauses_long(self) -> None:
        now = [0.0]
        pool: _Pool[_FakeStream] = _Pool(1, clock=lambda: now[0])
        stream = pool.pick(_FakeStream)
        assert stream is not None
        stream.alive = False
        pool.ended(stream, grpc.StatusCode.UNAVAILABLE, answered=False)
        assert pool.pick(lambda: pytest.fail("opened during back-off")) is None
        now[0] = 0.3
        again = pool.pick(_FakeStream)
        assert again is not None
        again.alive = False
        pool.ended(again, grpc.StatusCode.UNIMPLEMENTED, answered=False)
        assert pool.reconnect.unsupported
        now[0] = 299.0
        assert pool.pick(lambda: pytest.fail("asked an old server again")) is None
        now[0] = 301.0
        assert pool.pick(_FakeStream) is not None

    def test_closing_hands_back_every_stream_and_picks_nothing_after(self) -> None:
        pool: _Pool[_FakeStream] = _Pool(2, clock=lambda: 0.0)
        opened = [pool.pick(_FakeStream), pool.pick(_FakeStream)]
        assert pool.close() == opened
        assert pool.pick(_FakeStream) is None
