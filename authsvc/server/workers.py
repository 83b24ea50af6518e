"""`authsvc serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

grpcio runs Python handlers under one GIL per process, so the way it recommends to use several
cores is several processes on one port (grpc/examples/python/multiprocessing). This supervisor
starts the workers, reports the port once all of them serve, forwards SIGTERM/SIGINT so each one
drains gracefully, and exits non-zero if a worker dies on its own (let the orchestrator restart
the whole group rather than run with fewer workers than asked for).

Workers are full replicas: they share the database and sync their in-memory state by cursor
exactly as replicas on separate machines do. Worker 0 starts first (it runs migrations, makes
the first key and, in dev mode, prints the bootstrap admin), the others after it serves. Only
worker 0 serves the HTTP side port, so /metrics describes that worker.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

from authsvc.config import split_host_port

READY_PREFIX = "authsvc listening on "


def _reserve_port(host: str, port: int) -> tuple[socket.socket | None, int]:
    """Pick the port once for every worker; the bound (not listening) socket keeps it ours."""
    if port != 0:
        return None, port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, int(sock.getsockname()[1])


def _command() -> list[str]:
    return [sys.executable, "-m", "authsvc.cli"]


class _Worker:
    def __init__(self, index: int, argv: Sequence[str], out: TextIO) -> None:
        self.index = index
        self.ready = threading.Event()
        self.proc = subprocess.Popen(  # noqa: S603 - our own command line
            [*_command(), *argv],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._out = out
        self._pump = threading.Thread(target=self._forward, daemon=True)
        self._pump.start()

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.ready.set()
                continue
            self._out.write(line)
            self._out.flush()
        self.ready.set()  # EOF: the worker ended; the supervisor notices through poll()

    def close(self) -> None:
        self._pump.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def supervise(
    *,
    listen: str,
    workers: int,
    worker_argv: Sequence[str],
    http_argv: Sequence[str] = (),
    tls: bool = False,
    out: TextIO = sys.stdout,
    start_timeout: float = 120.0,
) -> int:
    """Run `workers` copies of `authsvc serve` on one port until SIGTERM/SIGINT.

    `worker_argv` holds the flags every worker gets (configuration comes from the inherited
    environment plus these); `http_argv` goes to worker 0 only.
    """
    host, port = split_host_port(listen)
    reservation, port = _reserve_port(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    address = f"{shown_host}:{port}"
    stopping = threading.Event()
    failed = False
    group: list[_Worker] = []

    def stop_all() -> None:
        for w in group:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        stop_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for index in range(workers):
            argv = [
                "serve",
                *worker_argv,
                "--listen",
                address,
                "--worker-index",
                str(index),
                *(http_argv if index == 0 else ()),
            ]
            worker = _Worker(index, argv, out)
            group.append(worker)
            if index == 0:
                # Worker 0 alone first: it migrates and creates the first key, so the rest
                # start against a ready database instead of racing for it.
                worker.ready.wait(start_timeout)
            if worker.proc.poll() is not None or stopping.is_set():
                break
        for w in group:
            w.ready.wait(start_timeout)
        if len(group) == workers and all(w.ready.is_set() and w.proc.poll() is None for w in group):
            out.write(
                f"{READY_PREFIX}{address} ({'TLS' if tls else 'plaintext'}, {workers} workers)\n"
            )
            out.flush()
        elif not stopping.is_set():
            failed = True
            stop_all()
        # Until a signal, or until a worker ends on its own.
        while not stopping.is_set() and not failed:
            if any(w.proc.poll() is not None for w in group):
                out.write("authsvc: a worker exited; stopping the others\n")
                out.flush()
                failed = True
                stop_all()
                break
            stopping.wait(0.5)
        codes = [w.proc.wait() for w in group]
        for w in group:
            w.close()
        return 1 if failed or any(codes) else 0
    finally:
        if reservation is not None:
            with contextlib.suppress(OSError):
                reservation.close()
