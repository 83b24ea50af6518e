"""Closed-loop gRPC load generator, run in its own process: fixed concurrency, warm-up, duration.

Several targets can share one run: after each target's warm-up the generator measures them in
short alternating slices (A B C, C B A, ...), so a burst of load from another tenant of this
shared machine falls on every target alike and ratios compare like with like. Requests are
pre-serialized bytes sent through identity (de)serializers, so the client spends no time in
protobuf. Run as `python -m bench.loadgen --spec FILE --out FILE`; `run_load()` is the
parent's side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.stats import (
    machine_busy_seconds,
    median,
    percentile,
    process_cpu_seconds,
    read_frames,
)


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    method: str
    requests: str  # file of length-prefixed request bytes
    server_pid: int  # whose CPU to sample
    token_file: str | None = None  # send `authorization: Bearer <file content>`
    # A bidirectional streaming method: each of the `concurrency` workers keeps one stream open
    # (spread over the connections) and sends its next request when the answer to its last
    # one has arrived, so a call is one message each way on an open stream.
    stream: bool = False


@dataclass(frozen=True)
class Slice:
    calls: int
    seconds: float
    server_cpu: float
    client_cpu: float
    machine_cpu: float  # every process on the machine, ours included

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


@dataclass
class TargetResult:
    """Every measured slice of one target, and the latency of every successful call."""

    slices: list[Slice] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))

    def summary(self) -> dict[str, Any]:
        calls = sum(s.calls for s in self.slices)
        seconds = sum(s.seconds for s in self.slices)
        server_cpu = sum(s.server_cpu for s in self.slices)
        client_cpu = sum(s.client_cpu for s in self.slices)
        others_cpu = sum(s.machine_cpu - s.server_cpu - s.client_cpu for s in self.slices)
        ordered = sorted(self.latencies_ns)
        slice_rps = sorted(s.rps for s in self.slices)
        return {
            "rps": round(calls / seconds, 1) if seconds else 0.0,
            "slice_rps_median": round(median(slice_rps), 1),
            "slice_rps_p25": round(percentile(slice_rps, 0.25), 1),
            "slice_rps_p75": round(percentile(slice_rps, 0.75), 1),
            "p50_ms": round(percentile(ordered, 0.50) / 1e6, 3),
            "p99_ms": round(percentile(ordered, 0.99) / 1e6, 3),
            "calls": calls,
            "seconds": round(seconds, 3),
            "errors": dict(self.errors),
            "server_cpu_pct": round(100 * server_cpu / seconds, 1) if seconds else 0.0,
            "client_cpu_pct": round(100 * client_cpu / seconds, 1) if seconds else 0.0,
            "others_cpu_pct": round(100 * max(0.0, others_cpu) / seconds, 1) if seconds else 0.0,
            "server_cpu_us_per_call": round(1e6 * server_cpu / calls, 1) if calls else 0.0,
            "client_cpu_us_per_call": round(1e6 * client_cpu / calls, 1) if calls else 0.0,
            "slice_rps": [round(s.rps) for s in self.slices],
        }


class _Driver:
    """The channels and request cycle for one target."""

    def __init__(self, target: Target, channels: list[grpc.aio.Channel]) -> None:
        self.target = target
        self.requests = read_frames(Path(target.requests))
        self.metadata: tuple[tuple[str, str], ...] | None = None
        if target.token_file:
            token = Path(target.token_file).read_text().strip()
            self.metadata = (("authorization", "Bearer " + token),)
        # No serializers: bytes in, bytes out. Worker i uses connection i mod len(channels).
        self.calls = [ch.unary_unary(target.method) for ch in channels]
        self.stream_methods = [ch.stream_stream(target.method) for ch in channels]
        # Worker number -> its open stream; kept from slice to slice (opened in the warm-up).
        self.streams: dict[int, Any] = {}
        self.next_index = 0

    def _stream(self, number: int) -> Any:
        call = self.streams.get(number)
        if call is None:
            method = self.stream_methods[number % len(self.stream_methods)]
            call = self.streams[number] = method(metadata=self.metadata)
        return call

    async def close(self) -> None:
        for call in self.streams.values():
            call.cancel()
        self.streams.clear()

    async def run(
        self, seconds: float, concurrency: int, result: TargetResult | None
    ) -> Slice | None:
        """Keep `concurrency` calls in flight for `seconds`; the slice ends when the last
        call started in it has returned, and every call that returned counts."""
        requests, metadata, calls_by_channel = self.requests, self.metadata, self.calls
        count = len(requests)
        spread = max(1, count // concurrency)
        base = self.next_index
        self.next_index += 1
        perf = time.perf_counter_ns
        calls = 0
        latencies = result.latencies_ns if result is not None else array("q")
        errors = result.errors if result is not None else {}

        async def stream_worker(number: int, offset: int) -> None:
            nonlocal calls
            index = offset
            while perf() < stop_at:
                request = requests[index % count]
                index += 1
                call = self._stream(number)
                t0 = perf()
                try:
                    await call.write(request)
                    answer = await call.read()
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    self.streams.pop(number, None)
                    continue
                if answer is grpc.aio.EOF:
                    errors["EOF"] = errors.get("EOF", 0) + 1
                    self.streams.pop(number, None)
                    continue
                latencies.append(perf() - t0)
                calls += 1

        async def worker(number: int, offset: int) -> None:
            nonlocal calls
            call = calls_by_channel[number % len(calls_by_channel)]
            index = offset
            while perf() < stop_at:
                request = requests[index % count]
                index += 1
                t0 = perf()
                try:
                    await call(request, metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    errors[code] = errors.get(code, 0) + 1
                    continue
                latencies.append(perf() - t0)
                calls += 1

        pid = self.target.server_pid
        cpu0 = time.process_time(), process_cpu_seconds(pid), machine_busy_seconds()
        start = perf()
        stop_at = start + int(seconds * 1e9)
        work = stream_worker if self.target.stream else worker
        await asyncio.gather(*(work(i, base + i * spread) for i in range(concurrency)))
        elapsed = (perf() - start) / 1e9
        cpu1 = time.process_time(), process_cpu_seconds(pid), machine_busy_seconds()
        if result is None:
            return None
        return Slice(calls, elapsed, cpu1[1] - cpu0[1], cpu1[0] - cpu0[0], cpu1[2] - cpu0[2])


async def drive(
    targets: list[Target],
    *,
    concurrency: int,
    connections: int,
    warmup: float,
    slice_seconds: float,
    slices: int,
) -> dict[str, TargetResult]:
    # Separate subchannel pools give each channel its own TCP connection; SO_REUSEPORT spreads
    # connections, not calls, over the processes of `authsvc serve --workers N`.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = {
        t.name: [grpc.aio.insecure_channel(t.address, options=options) for _ in range(connections)]
        for t in targets
    }
    drivers: list[_Driver] = []
    try:
        drivers += [_Driver(t, channels[t.name]) for t in targets]
        for group in channels.values():
            for ch in group:
                await asyncio.wait_for(ch.channel_ready(), 10)
        for d in drivers:
            await d.run(warmup, concurrency, None)
        results = {t.name: TargetResult() for t in targets}
        for i in range(slices):
            for d in drivers if i % 2 == 0 else drivers[::-1]:
                measured = await d.run(slice_seconds, concurrency, results[d.target.name])
                assert measured is not None
                results[d.target.name].slices.append(measured)
        return results
    finally:
        for d in drivers:
            await d.close()
        for group in channels.values():
            for ch in group:
                await ch.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("--spec", required=True, help="JSON: targets and load settings")
    p.add_argument("--out", required=True, help="JSON results; latencies go beside it")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    targets = [Target(**t) for t in spec["targets"]]
    results = asyncio.run(
        drive(
            targets,
            concurrency=int(spec["concurrency"]),
            connections=int(spec["connections"]),
            warmup=float(spec["warmup"]),
            slice_seconds=float(spec["slice_seconds"]),
            slices=int(spec["slices"]),
        )
    )
    out = Path(args.out)
    report: dict[str, Any] = {}
    for name, r in results.items():
        lat_path = out.with_name(f"{out.stem}-{name}.lat")
        with lat_path.open("wb") as f:
            r.latencies_ns.tofile(f)
        report[name] = {
            "slices": [asdict(s) for s in r.slices],
            "errors": r.errors,
            "latencies": str(lat_path),
        }
    out.write_text(json.dumps(report))
    return 0


def run_load(
    targets: list[Target],
    *,
    folder: Path,
    label: str,
    concurrency: int = 16,
    connections: int = 8,
    warmup: float = 1.0,
    slice_seconds: float = 0.5,
    slices: int = 10,
) -> dict[str, TargetResult]:
    """Run one load generator process over `targets` and read back what it measured."""
    spec = folder / f"{label}.spec.json"
    out = folder / f"{label}.out.json"
    spec.write_text(
        json.dumps(
            {
                "targets": [asdict(t) for t in targets],
                "concurrency": concurrency,
                "connections": connections,
                "warmup": warmup,
                "slice_seconds": slice_seconds,
                "slices": slices,
            }
        )
    )
    budget = len(targets) * (warmup + slices * slice_seconds) + 60
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", f"--spec={spec}", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=budget,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(out.read_text())
    results: dict[str, TargetResult] = {}
    for name, r in data.items():
        latencies: array[int] = array("q")
        latencies.frombytes(Path(r["latencies"]).read_bytes())
        results[name] = TargetResult(
            slices=[Slice(**s) for s in r["slices"]],
            errors={str(k): int(v) for k, v in r["errors"].items()},
            latencies_ns=latencies,
        )
    return results


if __name__ == "__main__":
    raise SystemExit(main())
