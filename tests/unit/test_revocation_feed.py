"""RevocationFeed: the shared log WatchRevocations streams read by position, and its limits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from authsvc import sync
from authsvc.errors import ResourceExhausted
from authsvc.storage.records import RevocationRecord
from authsvc.sync import RevocationFeed
from authsvc_client.v1 import auth_pb2

T = datetime(2030, 1, 1, tzinfo=UTC)


def record(cursor: int) -> RevocationRecord:
    return RevocationRecord(
        cursor=cursor,
        jti=f"j{cursor}",
        service_id=None,
        revoked_before=None,
        expires_at=T,
        reason="test",
        created_at=T,
    )


def cursors(events: list[auth_pb2.RevocationEvent] | None) -> list[int]:
    assert events is not None
    return [e.cursor for e in events]


class TestLog:
    def test_read_from_a_position_gives_what_follows_in_order(self) -> None:
        feed = RevocationFeed(0)
        feed.publish([record(c) for c in (1, 2, 5, 9)])
        assert feed.position(0) == 0 and feed.position(2) == 2 and feed.position(9) == 4
        assert cursors(feed.read(feed.position(2) or 0, 100)) == [5, 9]
        assert cursors(feed.read(0, 3)) == [1, 2, 5]
        assert feed.read(feed.end, 100) == []

    def test_each_event_is_built_once_however_many_streams_read_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        built: list[int] = []
        real = sync.revocation_event

        def counting(r: RevocationRecord) -> auth_pb2.RevocationEvent:
            built.append(r.cursor)
            return real(r)

        monkeypatch.setattr(sync, "revocation_event", counting)
        feed = RevocationFeed(0)
        positions = [feed.end] * 1000
        feed.publish([record(1), record(2)])
        reads = [feed.read(p, 100) for p in positions]
        assert built == [1, 2]
        first = reads[0]
        assert first is not None
        assert all(r is not None and r[0] is first[0] for r in reads)

    def test_a_stream_at_the_end_of_a_long_log_gets_only_the_new_event(self) -> None:
        feed = RevocationFeed(0, capacity=20_000)
        feed.publish([record(c) for c in range(1, 10_001)])
        position = feed.end
        feed.publish([record(10_001)])
        assert cursors(feed.read(position, 100)) == [10_001]
        assert feed.end == position + 1

    def test_positions_survive_trimming_and_a_trimmed_one_is_none(self) -> None:
        feed = RevocationFeed(0, capacity=10)
        kept = feed.end
        for c in range(1, 6):
            feed.publish([record(c)])
        for c in range(6, 40):
            feed.publish([record(c)])
        # Trimmed past `kept`: the stream must replay from storage.
        assert feed.read(kept, 100) is None
        assert feed.horizon > 0
        assert feed.position(feed.horizon - 1) is None
        # At most 1.5 x capacity held, and what is held reads on by position.
        at = feed.position(feed.horizon)
        assert at is not None
        held = cursors(feed.read(at, 100))
        assert held == list(range(feed.horizon + 1, 40))
        assert len(held) <= 15

    def test_a_cursor_below_the_start_is_only_in_storage(self) -> None:
        feed = RevocationFeed(50)
        assert feed.position(49) is None
        assert feed.position(50) == 0

    def test_publish_wakes_waiting_streams(self) -> None:
        async def scenario() -> list[int]:
            feed = RevocationFeed(0)
            position = feed.end
            waiter = asyncio.ensure_future(feed.wait(timeout=60))
            await asyncio.sleep(0)
            feed.publish([record(1)])
            await asyncio.wait_for(waiter, 10)
            return cursors(feed.read(position, 100))

        assert asyncio.run(scenario()) == [1]

    def test_a_call_arriving_during_a_fan_out_waits_for_one_batch_not_every_stream(
        self,
    ) -> None:
        # Issue 11 finding 3: with 2,000 streams, one revocation woke every stream in one turn
        # of the loop, and a ValidateToken arriving meanwhile waited behind all of them.
        streams = 1_000

        async def scenario() -> tuple[int, int]:
            feed = RevocationFeed(0)
            loop = asyncio.get_running_loop()
            resumed: list[int] = []
            arrived_at: list[int] = []

            def unary_call_arrives() -> None:
                arrived_at.append(len(resumed))

            async def stream(i: int) -> None:
                await feed.wait(timeout=60)
                if not resumed:  # the fan-out has begun: another call comes in
                    loop.call_soon(unary_call_arrives)
                resumed.append(i)

            tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
            await asyncio.sleep(0)
            feed.publish([record(1)])
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            return arrived_at[0], len(set(resumed))

        served_before_the_call, woken = asyncio.run(scenario())
        assert woken == streams  # every stream is still woken, once
        # One batch (sync._WAKE_BATCH, and the next already queued) may go first; not the rest.
        assert served_before_the_call <= 2 * 64 < streams

    def test_a_stream_that_stops_waiting_is_forgotten(self) -> None:
        async def scenario() -> int:
            feed = RevocationFeed(0)
            waiter = asyncio.ensure_future(feed.wait(timeout=60))
            await asyncio.sleep(0)
            await feed.wait(timeout=0.01)  # a timeout ends the wait
            waiter.cancel()  # so does the stream's cancellation
            await asyncio.gather(waiter, return_exceptions=True)
            return len(feed._waiters)

        assert asyncio.run(scenario()) == 0

    def test_close_wakes_every_stream_at_once_and_later_waits_return(self) -> None:
        async def scenario() -> None:
            feed = RevocationFeed(0)
            tasks = [asyncio.ensure_future(feed.wait(timeout=60)) for _ in range(500)]
            await asyncio.sleep(0)
            feed.close()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            await asyncio.wait_for(feed.wait(timeout=60), 10)

        asyncio.run(scenario())


class TestLimits:
    def test_per_peer_limit(self) -> None:
        feed = RevocationFeed(0, streams_per_peer=2, streams_max=10)
        feed.acquire("ipv4:10.0.0.1")
        feed.acquire("ipv4:10.0.0.1")
        with pytest.raises(ResourceExhausted, match="from this peer"):
            feed.acquire("ipv4:10.0.0.1")
        feed.acquire("ipv4:10.0.0.2")  # another peer is not affected
        feed.release("ipv4:10.0.0.1")
        feed.acquire("ipv4:10.0.0.1")
        assert feed.open_streams == 3

    def test_total_limit(self) -> None:
        feed = RevocationFeed(0, streams_per_peer=10, streams_max=2)
        feed.acquire("a")
        feed.acquire("b")
        with pytest.raises(ResourceExhausted, match="limit 2") as exc:
            feed.acquire("c")
        assert exc.value.retry_after > 0
        feed.release("a")
        feed.acquire("c")
        assert feed.open_streams == 2
