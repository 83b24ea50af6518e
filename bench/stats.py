"""Percentiles, CPU accounting and framing shared by the benchmark processes."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

_LEN = struct.Struct(">I")
_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: Sequence[int] | Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # Fields 14 and 15 of proc(5) are utime and stime; the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of a process and of its live child processes (a
    server started with several workers), from /proc; 0.0 once it is gone."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += _own_cpu_seconds(current)
        pending += _children(current)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), to tell how much of the
    machine other tenants took during a measurement."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    values = [int(v) for v in fields[:8]]
    return (sum(values) - values[3] - values[4]) / _TICKS


def write_frames(path: Path, frames: Iterable[bytes]) -> None:
    """Length-prefixed byte strings: serialized requests, read back by the load generator.
    Created 0600, since requests may carry a service secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for frame in frames:
            out.write(_LEN.pack(len(frame)))
            out.write(frame)


def read_frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    frames: list[bytes] = []
    offset = 0
    while offset < len(data):
        (size,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        frames.append(data[offset : offset + size])
        offset += size
    return frames
