"""WatchRevocations under load (issue 11 finding 3): ValidateToken latency beside many open
authenticated streams while revocations are published, and the cost of a replay from cursor 0.

The streams live in a child process (`python -m bench.watch`), so the latency probe in the
parent shares no interpreter with the stream consumers. The child reads the follower token
from its standard input (never its command line), prints `ready` once every stream has
received a first event (so every stream is open and served), counts events, and prints the
count when its standard input closes.

Opening thousands of streams at once: gRPC core holds a call the server has not yet picked up
in a pending queue, and beyond `grpc.server.max_pending_requests` (1,000 by default) it
cancels some of them at random (the client sees CANCELLED; the servicer never sees the call).
A burst of 2,000 opens lost 28-258 streams that way on this machine, until the server raised
that bound to 1,000 + AUTHSVC_WATCH_STREAMS_MAX. A follower such as `authsvc_client`'s
LocalValidator reconnects with back-off; so does the child, and it reports how many opens it
had to repeat (0 expected now).
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import FOLLOWER_AUDIENCE
from bench.revocations import seed_revocations
from bench.stats import percentile, process_cpu_seconds
from tests.support.server import RunningServer, run_cli, start_server

# The attack test's count (issue 11 finding 3).
STREAMS = 2_000
REPLAYED = 10_500
FOLLOWER = "bench-follower"
ADMIN = "bench-admin"
AUDIENCE = "bench-echo"


# --- child: the followers -----------------------------------------------------------------

# Back-off between two opens of one stream (LocalValidator's shape), and how many opens a
# stream gets before it counts as failed.
_REOPEN_FIRST_S = 0.2
_REOPEN_MAX_S = 2.0
_OPENS = 20


class _Followers:
    """What the child's streams share: event counts, and how opening them went."""

    def __init__(self, streams: int) -> None:
        self.counts = [0] * streams
        self.firsts = [asyncio.Event() for _ in range(streams)]
        # Opens repeated because the call ended before its first event, by status code.
        self.reopened: Counter[str] = Counter()
        self.failed = 0
        # Set before the child cancels its own calls: their CANCELLED is no failure.
        self.stopping = False


async def _follow(
    stub: auth_pb2_grpc.AuthServiceStub,
    md: tuple[tuple[str, str], ...],
    after: int,
    shared: _Followers,
    i: int,
) -> None:
    """One follower: reopened from its cursor while it has had no event (the server may shed
    an open it has not picked up yet); counted as failed if it ends after that."""
    delay = _REOPEN_FIRST_S
    for _ in range(_OPENS):
        call = stub.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(after_cursor=after), metadata=md
        )
        try:
            async for event in call:
                shared.counts[i] += 1
                after = event.cursor
                shared.firsts[i].set()
            code = "OK"  # the server ended the stream (its shutdown)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        if shared.stopping:
            return
        if shared.firsts[i].is_set():
            break
        shared.reopened[code] += 1
        await asyncio.sleep(delay)
        delay = min(_REOPEN_MAX_S, delay * 2)
    print(f"stream {i} ended: {code}", file=sys.stderr, flush=True)
    shared.failed += 1
    shared.firsts[i].set()  # counted as failed rather than waited for


def _reopened(shared: _Followers) -> str:
    detail = ",".join(f"{code}:{n}" for code, n in sorted(shared.reopened.items()))
    return f"reopened {shared.reopened.total()} {detail or '-'}"


async def _streamer(
    target: str, streams: int, channels: int, after: int, expect: int, token: str
) -> None:
    md = (("authorization", f"Bearer {token}"),)
    chans = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs = [auth_pb2_grpc.AuthServiceStub(c) for c in chans]
    shared = _Followers(streams)
    tasks = [
        asyncio.ensure_future(_follow(stubs[i % channels], md, after, shared, i))
        for i in range(streams)
    ]
    print(f"opened {streams}", flush=True)
    await asyncio.gather(*(f.wait() for f in shared.firsts))
    print(f"ready {_reopened(shared)}", flush=True)
    if expect:
        while sum(shared.counts) < expect:
            await asyncio.sleep(0.01)
        print(f"got {sum(shared.counts)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(f"events {sum(shared.counts)} failed {shared.failed} {_reopened(shared)}", flush=True)
    shared.stopping = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in chans:
        await c.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class Streamer:
    """The parent's side of `python -m bench.watch`."""

    def __init__(
        self, target: str, token: str, *, streams: int, after: int, expect: int = 0
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.watch",
                f"--target={target}",
                f"--streams={streams}",
                f"--channels={max(1, streams // 100)}",
                f"--after={after}",
                f"--expect={expect}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # A thread reads the child's lines: select() on the pipe would miss lines that an
        # earlier readline() already pulled into the file object's buffer.
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(
            target=_pump, args=(self.proc.stdout, self._lines), daemon=True
        )
        self._reader.start()
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"bench.watch child exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line.strip()
        raise RuntimeError(f"bench.watch child did not print {prefix!r} within {timeout:g} s")

    def finish(self) -> tuple[int, int, int]:
        """Close the child's stdin; returns (events received, streams that failed, opens
        repeated)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        line = self.expect("events ", 120).split()
        self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(line[1]), int(line[3]), int(line[5])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- parent: the scenario -----------------------------------------------------------------


def _probe(stub: auth_pb2_grpc.AuthServiceStub, token: str, seconds: float) -> list[float]:
    """Sequential ValidateToken calls for `seconds`: the latency of each, in ms."""
    request = auth_pb2.ValidateTokenRequest(token=token, audience=AUDIENCE)
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        if not stub.ValidateToken(request, timeout=30).valid:
            raise RuntimeError("the probe token did not validate")
        out.append((time.perf_counter() - began) * 1000)
    return out


def _latency(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "calls": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50), 2),
        "p99_ms": round(percentile(ordered, 0.99), 2),
        "max_ms": round(ordered[-1], 2),
    }


def _publisher(
    stub: auth_pb2_grpc.AuthServiceStub,
    admin_md: list[tuple[str, str]],
    every: float,
    stop: threading.Event,
    done: list[int],
) -> None:
    """Revoke a random jti every `every` seconds (an admin call: no token signed per event)."""
    while not stop.wait(every):
        stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(jti=secrets.token_urlsafe(16), reason="bench"),
            metadata=admin_md,
            timeout=30,
        )
        done[0] += 1


def run_watch(
    env: dict[str, str],
    folder: Path,
    *,
    streams: int = STREAMS,
    replayed: int = REPLAYED,
    probe_seconds: float = 4.0,
    revoke_every: float = 0.25,
) -> dict[str, Any]:
    database = folder / "watch.db"
    watch_env = {
        **env,
        "AUTHSVC_DATABASE_URL": f"sqlite:///{database}",
        # The bench's own limits: one peer (loopback) holds every stream.
        "AUTHSVC_WATCH_STREAMS_PER_PEER": str(streams + 10),
        "AUTHSVC_WATCH_STREAMS_MAX": str(streams + 10),
    }
    run_cli(watch_env, "db", "upgrade")
    seed_revocations(database, replayed)
    server: RunningServer = start_server(watch_env, timeout=300)
    streamer: Streamer | None = None
    out: dict[str, Any] = {"streams": streams, "replayed": replayed, "revoke_every_s": revoke_every}
    try:
        secret = server.create_service(FOLLOWER, [AUDIENCE], ["bench.call"])
        admin_secret = server.create_service(ADMIN, [], [], admin=True)
        stub = server.stub
        probe_token = server.issue(FOLLOWER, secret, AUDIENCE).access_token
        follower = server.issue(FOLLOWER, secret, FOLLOWER_AUDIENCE, ttl=3600).access_token
        admin_md = [
            ("authorization", f"Bearer {server.issue(ADMIN, admin_secret, 'authsvc').access_token}")
        ]
        pid = server.proc.pid
        _probe(stub, probe_token, 1.0)  # warm-up
        out["no_streams"] = _latency(_probe(stub, probe_token, probe_seconds))

        # Replay from cursor 0: one stream reads every stored revocation; alone, for its CPU.
        cpu0, began = process_cpu_seconds(pid), time.monotonic()
        alone = Streamer(server.address, follower, streams=1, after=0, expect=replayed)
        alone.expect("got ", 300)
        replay_cpu, replay_wall = process_cpu_seconds(pid) - cpu0, time.monotonic() - began
        alone.finish()
        # Then again beside the probe, for ValidateToken's latency during a replay.
        cpu0, began = process_cpu_seconds(pid), time.monotonic()
        replay = Streamer(server.address, follower, streams=1, after=0, expect=replayed)
        probed: list[float] = []
        probe_stop = threading.Event()

        def probe_during() -> None:
            while not probe_stop.is_set():
                probed.extend(_probe(stub, probe_token, 0.2))

        prober = threading.Thread(target=probe_during, daemon=True)
        prober.start()
        replay.expect("got ", 300)
        cpu, wall = process_cpu_seconds(pid) - cpu0, time.monotonic() - began
        probe_stop.set()
        prober.join(30)
        events, failed, _ = replay.finish()
        out["replay"] = {
            "events": events,
            "failed": failed,
            # Alone: the replay's own cost (the child's process start-up included in wall).
            "server_cpu_s": round(replay_cpu, 2),
            "wall_s": round(replay_wall, 2),
            # Beside the probe: its CPU includes the probe's ValidateToken calls.
            "with_probe_server_cpu_s": round(cpu, 2),
            "with_probe_wall_s": round(wall, 2),
            "validate_during": _latency(probed) if probed else None,
        }

        # 2,000 streams, idle, then with revocations published.
        cursor = max(replayed, 1)
        began = time.monotonic()
        streamer = Streamer(server.address, follower, streams=streams, after=cursor)
        streamer.expect("opened ", 300)
        # Each stream proves it is open by receiving this one event.
        stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(jti=secrets.token_urlsafe(16), reason="bench"),
            metadata=admin_md,
            timeout=30,
        )
        ready = streamer.expect("ready", 300).split()
        out["open_seconds"] = round(time.monotonic() - began, 1)
        # Opens the server shed before serving them (see the module docstring), by status.
        out["reopened"] = {"count": int(ready[2]), "by_code": ready[3]}
        out["idle_streams"] = _latency(_probe(stub, probe_token, probe_seconds))
        stop, published = threading.Event(), [0]
        pub = threading.Thread(
            target=_publisher, args=(stub, admin_md, revoke_every, stop, published), daemon=True
        )
        cpu0 = process_cpu_seconds(pid)
        pub.start()
        samples = _probe(stub, probe_token, probe_seconds)
        stop.set()
        pub.join(30)
        out["server_cpu_s_while_publishing"] = round(process_cpu_seconds(pid) - cpu0, 2)
        time.sleep(2)  # let the last events reach every stream
        events, failed, _ = streamer.finish()
        streamer = None
        out["publishing"] = _latency(samples)
        out["published"] = published[0]
        out["delivered"] = events
        out["expected"] = streams * (published[0] + 1)
        out["failed_streams"] = failed
    finally:
        if streamer is not None:
            streamer.kill()
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    """Without --target: run the whole scenario alone and print its JSON (make bench runs it
    too); with it: be the streams' child process."""
    p = argparse.ArgumentParser(prog="python -m bench.watch")
    p.add_argument("--target")
    p.add_argument("--streams", type=int, default=STREAMS)
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--expect", type=int, default=0)
    args = p.parse_args(argv)
    if args.target is None:
        import json
        import tempfile

        from tests.support.server import base_env

        with tempfile.TemporaryDirectory(prefix="authsvc-bench-watch-") as tmp:
            env = base_env(
                f"sqlite:///{Path(tmp) / 'unused.db'}", AUTHSVC_SYNC_INTERVAL_SECONDS="0.5"
            )
            print(json.dumps(run_watch(env, Path(tmp), streams=args.streams), indent=2))
        return 0
    token = sys.stdin.readline().strip()
    asyncio.run(
        _streamer(args.target, args.streams, args.channels, args.after, args.expect, token)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
