"""Remote checks multiplexed over a few long-lived ValidateTokenStream calls.

A message on an open stream costs authsvc's Python server about a third of a unary call, and
remote validation is the main job of a fleet's authsvc. The server answers every request of a
stream once, in order, so each stream keeps a FIFO of its callers: the n-th answer belongs to
the n-th request. A caller whose deadline passes leaves its slot in the FIFO (its late answer is
dropped), so deadlines stay per check without breaking the pairing.

When a stream cannot serve a check (none open during back-off, every stream full, the stream
ended before answering, or a server without the RPC), `check` returns None and the validator
asks the same question with unary ValidateToken: checks are idempotent, so a retry is safe, and
the unary call fails closed on its own.

A stream can also stop answering without ending (a wedged replica, a half-open connection
without keepalive). It is stalled once it has owed an answer for a whole check timeout and sent
none (`_Fifo.stalled`); the mux then cancels it, which releases its other callers to unary and
counts as an end for back-off, like any failure.

What a stream's end means (a server without the RPC: pause; anything else: back off) is decided
by `_refused` alone, for both the sync and the asyncio streams. grpc.aio can hide the server's
status: when the server refuses the call while a request is being written, the failed write
replaces the status with INTERNAL "Internal error from Core", and the real one is lost. The
asyncio stream then asks the server again with a call that writes nothing (`_status_without_writes`)
and hands that status to the same decision.

The pairing (_Fifo) and the choice of stream (_Pool) are sans-IO and shared; the sync and
asyncio classes below only move messages (threads and events, or tasks and futures).
"""

from __future__ import annotations

import asyncio
import math
import queue
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc

from authsvc_client.errors import ValidatorUnavailable, status_of
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

__all__ = ["AsyncStreamMux", "StreamMux"]

DEFAULT_STREAMS = 2
DEFAULT_MAX_IN_FLIGHT = 128
_BACKOFF_INITIAL = 0.25
_BACKOFF_MAX = 30.0
# A server without the RPC is asked again this much later (it may have been upgraded).
_UNSUPPORTED_RETRY = 300.0
# How long the asyncio stream waits for a server's status when grpc.aio hid the first one.
_STATUS_PROBE_TIMEOUT = 10.0
# What servers and proxies write when they report a missing method as INTERNAL or UNKNOWN
# instead of UNIMPLEMENTED (grpc-python "Method not found!", grpc-go "unknown service ..." /
# "unknown method ...", grpc-java "Method not found: ...").
_NOT_IMPLEMENTED = re.compile(
    r"method not found|unknown (?:method|service)|not implemented|unimplemented", re.IGNORECASE
)
# grpc.aio's details when a write failed locally and replaced the call's status
# (_AioCall.set_internal_error): the server's own status is gone.
_AIO_LOCAL_FAILURE = "Internal error from Core"

Request = auth_pb2.ValidateTokenRequest
Response = auth_pb2.ValidateTokenResponse

T = TypeVar("T")


def _timed_out() -> ValidatorUnavailable:
    return ValidatorUnavailable("authsvc ValidateTokenStream: no answer within the deadline")


def _details_of(exc: BaseException) -> str:
    """A failed call's status details, sync or grpc.aio, "" when it has none (see status_of)."""
    details_of = getattr(exc, "details", None)
    details = details_of() if callable(details_of) else None
    return details if isinstance(details, str) else ""


def _refused(code: grpc.StatusCode | None, details: str, answered: bool) -> bool:
    """Whether a stream's end says the server has no ValidateTokenStream: the one decision the
    sync and asyncio streams share.

    UNIMPLEMENTED says so. INTERNAL or UNKNOWN says so only before the stream answered anything
    and only when the details name a missing method (proxies and some servers report it that
    way); any other INTERNAL is a failure of a server that has the RPC, and gets back-off.
    """
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return True
    if answered or code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return False
    return _NOT_IMPLEMENTED.search(details) is not None


def _status_hidden(code: grpc.StatusCode | None, details: str, answered: bool) -> bool:
    """grpc.aio replaced the server's status by its own INTERNAL before any answer arrived, so
    the end says nothing about the server (after an answer the server has the RPC anyway)."""
    return not answered and code == grpc.StatusCode.INTERNAL and details == _AIO_LOCAL_FAILURE


async def _status_without_writes(
    stub: auth_pb2_grpc.AuthServiceStub, timeout: float = _STATUS_PROBE_TIMEOUT
) -> tuple[grpc.StatusCode, str]:
    """The status of a ValidateTokenStream call that sends no request and half-closes at once.

    Nothing is written, so no failed write can replace the server's status: a server without
    the RPC answers UNIMPLEMENTED, authsvc ends the empty stream with OK.
    """
    call: Any = stub.ValidateTokenStream(timeout=timeout)
    try:
        await call.wait_for_connection()  # the call's headers go out before the half-close
        await call.done_writing()
    except (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError):
        pass  # the call already ended: its status below is the server's
    return await call.code(), await call.details()


class _Reconnect:
    """When the next stream may be opened: exponential back-off after failures, a long pause
    when the server has no ValidateTokenStream (`_refused`), reset once a stream has answered."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._delay = _BACKOFF_INITIAL
        self._not_before = 0.0
        self._clean_reconnect_after = -_BACKOFF_MAX
        self.unsupported = False

    def allowed(self) -> bool:
        return self._clock() >= self._not_before

    @property
    def settled(self) -> bool:
        """Nothing for an answer to reset (see answered)."""
        return not self.unsupported and self._delay == _BACKOFF_INITIAL

    def ended(self, code: grpc.StatusCode | None, answered: bool, details: str = "") -> None:
        """What a stream's end (`code` None: OK) means for the next one.

        - The server has no ValidateTokenStream (`_refused`): pause `_UNSUPPORTED_RETRY`.
        - OK after answers is the server closing the stream on purpose (graceful shutdown, a
          maximum stream age): the next stream may open at once, once per `_BACKOFF_MAX`; more
          clean ends within that window back off as failures, so a server or proxy that ends
          every stream cleanly cannot make every check open one.
        - Anything else is a failure and backs off, growing until a stream answers: CANCELLED
          too (the pool's own cancels come only once it is closed, and its ends are then not
          counted, so CANCELLED is a server or proxy resetting the stream, or a stalled stream
          the mux cancelled), and OK before any answer.
        """
        now = self._clock()
        if _refused(code, details, answered):
            self.unsupported = True
            self._not_before = now + _UNSUPPORTED_RETRY
            return
        if answered:
            self._delay = _BACKOFF_INITIAL
            if code in (None, grpc.StatusCode.OK) and now >= self._clean_reconnect_after:
                self._clean_reconnect_after = now + _BACKOFF_MAX
                return
        # Never shortens a pause: a stream opened before it ended says nothing new.
        self._not_before = max(self._not_before, now + self._delay)
        self._delay = min(self._delay * 2, _BACKOFF_MAX)

    def answered(self) -> None:
        """A stream answered: the server (some replica of it) has ValidateTokenStream, so a
        pause for a refusal ends now (a rolling upgrade: one stream met an old replica, another
        answers), and the back-off starts over. A failure's back-off pause stays."""
        if self.unsupported:
            self.unsupported = False
            self._not_before = min(self._not_before, self._clock())
        self._delay = _BACKOFF_INITIAL


class _Fifo(Generic[T]):
    """One stream's waiting callers, in wire order, each with when it was sent and its
    timeout (not thread-safe: the sync stream holds its lock around it)."""

    def __init__(self, max_in_flight: int) -> None:
        self._pending: deque[tuple[T, float, float]] = deque()
        self._max = max_in_flight
        self._answered_at = -math.inf
        self.alive = True

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, waiter: T, now: float = 0.0, timeout: float = math.inf) -> bool:
        """Queue a caller; False when the stream is gone or full (ask with a unary call)."""
        if not self.alive or len(self._pending) >= self._max:
            return False
        self._pending.append((waiter, now, timeout))
        return True

    def answered(self, now: float = 0.0) -> T:
        """The caller the next answer belongs to.

        Raises:
            IndexError: an answer nobody asked for; the stream is not trustworthy.
        """
        waiter, _sent, _timeout = self._pending.popleft()
        self._answered_at = now
        return waiter

    def stalled(self, now: float) -> bool:
        """Whether the stream stopped answering: its oldest unanswered request has waited
        longer than its check's timeout with no answer since (since it was sent, or since the
        last answer if that came later). A stream that answers slowly but steadily is not
        stalled: each answer starts the wait over."""
        if not self._pending:
            return False
        _waiter, sent, timeout = self._pending[0]
        return now - max(sent, self._answered_at) >= timeout

    def end(self) -> list[T]:
        """The stream ended: the callers left get no answer and ask again unary."""
        self.alive = False
        left = [waiter for waiter, _sent, _timeout in self._pending]
        self._pending.clear()
        return left


class _StreamLike(Protocol):
    @property
    def alive(self) -> bool: ...

    @property
    def load(self) -> int: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=_StreamLike)


class _Pool(Generic[S]):
    """Which stream takes the next check: a new one while fewer than `size` are open and the
    back-off allows, else the least loaded (not thread-safe: StreamMux holds its lock).

    No stream opens while one that ended has not been reported yet (`ended`): what its end
    means (back-off, a pause for a server without the RPC) must apply to the next stream. The
    sync stream reports at once; the asyncio stream may first ask the server for the status
    grpc.aio hid (`_status_without_writes`, up to `_STATUS_PROBE_TIMEOUT`).
    """

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self.streams: list[S] = []
        self.reconnect = _Reconnect(clock)
        self.closed = False

    def pick(self, open_stream: Callable[[], S]) -> S | None:
        if self.closed:
            return None
        live = [s for s in self.streams if s.alive]
        ending = len(live) < len(self.streams)
        if not ending and len(live) < self._size and self.reconnect.allowed():
            stream = open_stream()
            self.streams.append(stream)
            return stream
        return min(live, key=lambda s: s.load, default=None)

    def ended(
        self, stream: S, code: grpc.StatusCode | None, answered: bool, details: str = ""
    ) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.closed:  # the pool's own cancels (close) say nothing about the server
            self.reconnect.ended(code, answered, details)

    def close(self) -> list[S]:
        self.closed = True
        streams, self.streams = self.streams, []
        return streams


class _Mux(Generic[S]):
    """What StreamMux and AsyncStreamMux share: arguments, pool, counters."""

    def __init__(
        self,
        channel: Any,
        *,
        streams: int,
        max_in_flight: int,
        clock: Callable[[], float],
    ) -> None:
        if streams < 1 or max_in_flight < 1:
            raise ValueError("streams and max_in_flight must be at least 1")
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._max = max_in_flight
        self._clock = clock
        self._pool: _Pool[S] = _Pool(streams, clock)
        self.answered = 0

    @property
    def unsupported(self) -> bool:
        """True after the server said it has no ValidateTokenStream (checks go unary for a
        while)."""
        return self._pool.reconnect.unsupported

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self._pool.streams if s.alive)

    def _count(self, response: Response | None) -> Response | None:
        if response is not None:
            self.answered += 1
        return response


# --- sync ------------------------------------------------------------------------------------


class _Slot:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: Response | None = None


class _Stream:
    def __init__(
        self,
        stub: auth_pb2_grpc.AuthServiceStub,
        max_in_flight: int,
        clock: Callable[[], float],
        on_end: Callable[[_Stream, grpc.StatusCode | None, bool, str], None],
        on_answer: Callable[[], None],
    ) -> None:
        self._requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._fifo: _Fifo[_Slot] = _Fifo(max_in_flight)
        self._lock = threading.Lock()
        self._clock = clock
        self._on_end = on_end
        self._on_answer = on_answer
        self._call: Any = stub.ValidateTokenStream(self._feed())
        threading.Thread(target=self._read, name="authsvc-validate-stream", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._fifo.alive

    @property
    def load(self) -> int:
        return len(self._fifo)

    def _feed(self) -> Iterator[Request]:
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def submit(self, request: Request, now: float, timeout: float) -> _Slot | None:
        """Send a check at `now`; None when it should go unary (the stream is gone, full, or
        stalled: a stalled stream is cancelled here)."""
        slot = _Slot()
        with self._lock:
            stalled = self._stalled(now)
            if not stalled:
                if not self._fifo.admit(slot, now, timeout):
                    return None
                # Queued under the same lock: the FIFO's order is the wire's order.
                self._requests.put(request)
                return slot
        self._call.cancel()
        return None

    def timed_out(self, deadline: float) -> None:
        """A caller's deadline passed without an answer: cancel the stream if it is stalled.
        The caller keeps its place in the FIFO; the others are released to unary."""
        with self._lock:
            stalled = self._stalled(max(self._clock(), deadline))
        if stalled:
            self._call.cancel()

    def _stalled(self, now: float) -> bool:
        """Under the lock: whether the stream is stalled (`_Fifo.stalled`); a stalled stream
        takes no more checks, and the caller cancels it."""
        if not self._fifo.alive or not self._fifo.stalled(now):
            return False
        self._fifo.alive = False
        return True

    def _read(self) -> None:
        code: grpc.StatusCode | None = None
        details = ""
        answered = False
        try:
            for response in self._call:
                with self._lock:
                    slot = self._fifo.answered(self._clock())
                slot.response = response
                slot.done.set()
                answered = True
                self._on_answer()
        except grpc.RpcError as exc:
            code, details = status_of(exc), _details_of(exc)
        except IndexError:  # an answer nobody asked for: the stream is not trustworthy
            code = grpc.StatusCode.INTERNAL
            self._call.cancel()
        finally:
            with self._lock:
                left = self._fifo.end()
            self._requests.put(None)
            for slot in left:
                slot.done.set()  # no response: the caller asks again with a unary call
            self._on_end(self, code, answered, details)

    def close(self) -> None:
        with self._lock:
            self._fifo.alive = False
        self._requests.put(None)
        self._call.cancel()


class StreamMux(_Mux[_Stream]):
    """Up to `streams` ValidateTokenStream calls on one grpc.Channel, shared by every thread."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        streams: int = DEFAULT_STREAMS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(channel, streams=streams, max_in_flight=max_in_flight, clock=clock)
        self._lock = threading.Lock()

    def _ended(
        self, stream: _Stream, code: grpc.StatusCode | None, answered: bool, details: str
    ) -> None:
        with self._lock:
            self._pool.ended(stream, code, answered, details)

    def _answered(self) -> None:
        # Every answer, from the stream's reader thread: the lock only when there is
        # something to reset.
        if not self._pool.reconnect.settled:
            with self._lock:
                self._pool.reconnect.answered()

    def _open(self) -> _Stream:
        return _Stream(self._stub, self._max, self._clock, self._ended, self._answered)

    def check(self, request: Request, timeout: float) -> Response | None:
        """The stream's answer, or None when the caller should ask with a unary call.

        Raises:
            ValidatorUnavailable: the stream took the request but did not answer in time.
        """
        now = self._clock()
        with self._lock:
            stream = self._pool.pick(self._open)
        slot = stream.submit(request, now, timeout) if stream is not None else None
        if stream is None or slot is None:
            return None
        if not slot.done.wait(timeout):
            stream.timed_out(now + timeout)
            raise _timed_out()
        return self._count(slot.response)

    def close(self) -> None:
        with self._lock:
            streams = self._pool.close()
        for stream in streams:
            stream.close()


# --- asyncio ---------------------------------------------------------------------------------


class _AsyncStream:
    def __init__(
        self,
        stub: auth_pb2_grpc.AuthServiceStub,
        max_in_flight: int,
        clock: Callable[[], float],
        on_end: Callable[[_AsyncStream, grpc.StatusCode | None, bool, str], None],
        on_answer: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._stub = stub
        self._requests: asyncio.Queue[Request | None] = asyncio.Queue()
        self._fifo: _Fifo[asyncio.Future[Response | None]] = _Fifo(max_in_flight)
        self._clock = clock
        self._on_end = on_end
        self._on_answer = on_answer
        self._call: Any = stub.ValidateTokenStream(self._feed())
        self._reader = self._loop.create_task(self._read())

    @property
    def alive(self) -> bool:
        return self._fifo.alive

    @property
    def load(self) -> int:
        return len(self._fifo)

    async def _feed(self) -> AsyncIterator[Request]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    def submit(
        self, request: Request, now: float, timeout: float
    ) -> asyncio.Future[Response | None] | None:
        """_Stream.submit."""
        if self._stalled(now):
            return None
        future: asyncio.Future[Response | None] = self._loop.create_future()
        if not self._fifo.admit(future, now, timeout):
            return None
        # No await between the two: the FIFO's order is the wire's order.
        self._requests.put_nowait(request)
        return future

    def timed_out(self, deadline: float) -> None:
        """_Stream.timed_out."""
        self._stalled(max(self._clock(), deadline))

    def _stalled(self, now: float) -> bool:
        """Whether the stream is stalled (`_Fifo.stalled`); a stalled stream is cancelled."""
        if not self._fifo.alive or not self._fifo.stalled(now):
            return False
        self._fifo.alive = False
        self._call.cancel()
        return True

    async def _read(self) -> None:
        code: grpc.StatusCode | None = None
        details = ""
        answered = False
        try:
            try:
                async for response in self._call:
                    future = self._fifo.answered(self._clock())
                    if not future.done():
                        future.set_result(response)
                    answered = True
                    self._on_answer()
            except grpc.RpcError as exc:
                code, details = status_of(exc), _details_of(exc)
            except IndexError:
                code = grpc.StatusCode.INTERNAL
                self._call.cancel()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
            finally:
                left = self._fifo.end()
                self._requests.put_nowait(None)
                for future in left:
                    if not future.done():
                        future.set_result(None)  # released now: they ask unary, not after a probe
            if _status_hidden(code, details, answered):
                # Until on_end below, the pool opens no stream (_Pool.pick).
                probed = await _status_without_writes(self._stub)
                if _refused(*probed, answered=False):
                    code, details = probed
        finally:
            self._on_end(self, code, answered, details)

    def close(self) -> None:
        self._fifo.alive = False
        self._requests.put_nowait(None)
        self._call.cancel()


class AsyncStreamMux(_Mux[_AsyncStream]):
    """StreamMux for a grpc.aio channel; streams open lazily inside the caller's event loop."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        streams: int = DEFAULT_STREAMS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(channel, streams=streams, max_in_flight=max_in_flight, clock=clock)

    def _open(self) -> _AsyncStream:
        return _AsyncStream(
            self._stub, self._max, self._clock, self._pool.ended, self._pool.reconnect.answered
        )

    async def check(self, request: Request, timeout: float) -> Response | None:
        """StreamMux.check, awaitable."""
        now = self._clock()
        stream = self._pool.pick(self._open)
        future = stream.submit(request, now, timeout) if stream is not None else None
        if stream is None or future is None:
            return None
        try:
            response = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            stream.timed_out(now + timeout)
            raise _timed_out() from None
        return self._count(response)

    def close(self) -> None:
        for stream in self._pool.close():
            stream.close()
