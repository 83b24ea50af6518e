"""The sans-IO cores the sync and asyncio classes share, exercised without any network."""

from __future__ import annotations

import grpc
import pytest

from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.errors import ValidatorUnavailable, status_of
from authsvc_client.interceptors import SHAPES, behavior_of, handler_for, rebuild, shape_of
from authsvc_client.revocations import RevocationEntry, RevocationSet
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
        result = core.answer(key, _valid(_claims()), ("a",), NOW)
        assert result.valid
        assert core.lookup("t", ("a",), NOW + 1, True)[1] is result
        assert core.lookup("t", ("a", "b"), NOW + 1, True)[1] is None  # other scopes
        assert core.lookup("u", ("a",), NOW + 1, True)[1] is None  # other token

    def test_entries_end_at_the_ttl_or_the_token_expiry(self) -> None:
        core = _core(ttl=5)
        key, _ = core.lookup("t", (), NOW, True)
        core.answer(key, _valid(_claims()), (), NOW)
        assert core.lookup("t", (), NOW + 4.9, True)[1] is not None
        assert core.lookup("t", (), NOW + 5, True)[1] is None
        key, _ = core.lookup("soon", (), NOW, True)
        core.answer(key, _valid(_claims(exp=int(NOW) + 2)), (), NOW)
        assert core.lookup("soon", (), NOW + 2, True)[1] is None

    def test_denials_are_not_cached_and_nothing_is_while_the_cache_is_off(self) -> None:
        core = _core()
        key, _ = core.lookup("t", ("c",), NOW, True)
        denied = core.answer(key, _valid(_claims()), ("c",), NOW)  # valid, lacking "c"
        assert denied.reason == auth_pb2.INSUFFICIENT_SCOPE  # the fail-closed backstop
        assert len(core.cache) == 0
        off_key, _ = core.lookup("t", (), NOW, False)
        assert off_key is None
        core.answer(off_key, _valid(_claims()), (), NOW)
        assert len(core.cache) == 0

    def test_a_revoked_entry_is_dropped_on_lookup(self) -> None:
        revocations = RevocationSet()
        core = _core(revocations)
        key, _ = core.lookup("t", (), NOW, True)
        core.answer(key, _valid(_claims(jti="gone")), (), NOW)
        revocations.add(RevocationEntry(1, "gone", None, None, int(NOW) + 600))
        assert core.lookup("t", (), NOW, True)[1] is None
        assert len(core.cache) == 0

    def test_the_cache_holds_at_most_its_size_oldest_out_first(self) -> None:
        core = _core()
        for token in ("t1", "t2", "t3"):
            key, _ = core.lookup(token, (), NOW, True)
            core.answer(key, _valid(_claims(jti=token)), (), NOW)
        assert len(core.cache) == 2
        assert core.lookup("t1", (), NOW, True)[1] is None

    def test_a_malformed_server_answer_fails_closed(self) -> None:
        core = _core()
        key, _ = core.lookup("t", (), NOW, True)
        odd = auth_pb2.ValidateTokenResponse(valid=True)  # valid without claims
        assert core.answer(key, odd, (), NOW).reason == auth_pb2.MALFORMED
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
    def _state(self) -> FeedState:
        return FeedState(initial=0.1, maximum=0.8, settle_seconds=0.25)

    def test_connected_after_settling_on_a_ready_channel_or_after_an_event(self) -> None:
        state = self._state()
        assert not state.connected(0.0)
        assert state.outage_seconds(NOW, 0.0) == float("inf")  # never connected yet
        state.opened(10.0)
        assert not state.connected(10.5)  # channel not ready
        state.channel(True, NOW)
        assert not state.connected(10.1)  # not settled
        assert state.connected(10.25)
        other = self._state()
        other.opened(10.0)
        other.event()  # an event proves the channel too
        assert other.connected(10.0)

    def test_an_outage_counts_from_the_loss(self) -> None:
        state = self._state()
        state.opened(0.0)
        state.event()
        state.closed(NOW)
        assert not state.connected(1.0)
        assert state.outage_seconds(NOW + 3, 1.0) == 3.0
        state.opened(2.0)
        state.event()
        assert state.outage_seconds(NOW + 9, 2.0) == 0.0
        state.channel(False, NOW + 10)
        assert state.outage_seconds(NOW + 12, 3.0) == 2.0

    def test_reconnects_back_off_and_start_over_after_a_good_stream(self) -> None:
        state = self._state()
        assert [state.retry_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.8, 0.8]
        state.opened(0.0)
        state.closed(NOW)  # never confirmed: no reset
        assert state.retry_delay() == 0.8
        state.opened(1.0)
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

