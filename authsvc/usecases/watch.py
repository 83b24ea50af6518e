"""WatchRevocations: who may follow, from which cursor, and what a follower gets.

A follower gets every revocation after its cursor, in cursor order, once: from storage while
it is behind the shared log (`RevocationFeed`), then from the log by position. Nothing here
knows gRPC; the servicer turns each event into a stream message as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

from authsvc.clock import Clock, to_datetime
from authsvc.errors import InvalidArgument
from authsvc.storage.repository import Repository
from authsvc.sync import RevocationFeed, held_event
from authsvc.usecases.callers import Callers
from authsvc_client.v1 import auth_pb2

__all__ = ["RevocationWatch"]

# A replay reads storage this many revocations at a time, in a worker thread; a live stream
# sends at most WATCH_BATCH events before it lets other calls run.
WATCH_PAGE = 1000
WATCH_BATCH = 100


class RevocationWatch:
    def __init__(
        self, *, repo: Repository, clock: Clock, feed: RevocationFeed, callers: Callers
    ) -> None:
        self._repo = repo
        self._clock = clock
        self._feed = feed
        self._callers = callers

    async def follow(
        self, token: str | None, after_cursor: int, peer: str, thumbprint: str = ""
    ) -> AsyncGenerator[auth_pb2.RevocationEvent, None]:
        """Every revocation after `after_cursor`, until the feed closes; holds one of `peer`'s
        stream slots while it runs (close the generator to give it back at once).

        Raises:
            Unauthenticated: see `Callers.follower`.
            InvalidArgument: a negative cursor.
            ResourceExhausted: the peer or the server has as many streams as allowed.
        """
        self._callers.follower(token, thumbprint)
        if after_cursor < 0:
            raise InvalidArgument("after_cursor must be >= 0")
        self._feed.acquire(peer)
        try:
            async for event in self._follow(after_cursor):
                yield event
        finally:
            self._feed.release(peer)

    async def _follow(self, cursor: int) -> AsyncIterator[auth_pb2.RevocationEvent]:
        feed = self._feed
        position: int | None = None
        while True:
            if position is None:
                position = feed.position(cursor)
            if position is None:
                horizon = feed.horizon
                async for event in self._replay(cursor):
                    yield event
                    cursor = event.cursor
                # Everything up to the horizon was in storage when the replay ran; what it did
                # not return had expired.
                cursor = max(cursor, horizon)
                continue
            batch = feed.read(position, WATCH_BATCH)
            if batch is None:
                position = None  # the log moved past this stream: catch up from storage
                continue
            for event in batch:
                yield event
                cursor = event.cursor
            position += len(batch)
            if len(batch) == WATCH_BATCH:
                await asyncio.sleep(0)  # a long backlog must not hold the loop
                continue
            if feed.closed:
                return
            if position == feed.end:
                await feed.wait(timeout=30.0)

    async def _replay(self, cursor: int) -> AsyncIterator[auth_pb2.RevocationEvent]:
        """Page by page from storage; each page is read and turned into messages in a worker
        thread, and the loop runs other calls between pages."""

        def page_after(after: int) -> list[auth_pb2.RevocationEvent]:
            held = self._repo.list_held_revocations(
                after, to_datetime(self._clock.now()), WATCH_PAGE
            )
            return [held_event(h) for h in held]

        while True:
            page = await asyncio.to_thread(page_after, cursor)
            for i, event in enumerate(page):
                yield event
                if i % WATCH_BATCH == WATCH_BATCH - 1:
                    await asyncio.sleep(0)
            if len(page) < WATCH_PAGE:
                return
            cursor = page[-1].cursor
