"""The HTTP side port: /metrics, /.well-known/jwks.json, /healthz and /readyz, off the loop."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from authsvc.clock import Clock
from authsvc.config import split_host_port
from authsvc.errors import ConfigError
from authsvc.keys.rotator import jwks_max_age
from authsvc.sync import ServerState

__all__ = ["HttpSidePort", "ReadinessPolicy", "jwks_max_age"]

log = logging.getLogger("authsvc.http")

JWKS_PATH = "/.well-known/jwks.json"
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy\n"
)


@dataclass(frozen=True)
class ReadinessPolicy:
    """The replica is ready when its state is loaded, fresh, and the database answers."""

    max_sync_lag_seconds: float

    @classmethod
    def for_sync_interval(cls, sync_interval_seconds: float) -> ReadinessPolicy:
        # Ten missed syncs, and never less than 5 s so a slow query does not flap readiness.
        return cls(max_sync_lag_seconds=max(5.0, 10 * sync_interval_seconds))


class HttpSidePort:
    """A ThreadingHTTPServer on its own daemon thread; handlers only read swapped-whole state."""

    def __init__(
        self,
        address: str,
        *,
        state: ServerState,
        registry: CollectorRegistry,
        clock: Clock,
        ping: Callable[[], None],
        rotation_interval_seconds: int,
        readiness: ReadinessPolicy,
        read_timeout_seconds: float,
        max_connections: int,
    ) -> None:
        """`read_timeout_seconds` bounds how long a connection may take to send its whole
        request (a slow sender cannot stretch it byte by byte) and to take the answer;
        `max_connections` bounds the connections served at once, each one a thread: a
        further one is answered 503 and closed at once."""
        host, port = split_host_port(address, "AUTHSVC_HTTP_LISTEN")
        self.state = state
        self.registry = registry
        self.clock = clock
        self.ping = ping
        self.jwks_max_age = jwks_max_age(rotation_interval_seconds)
        self.readiness = readiness
        self.stopping = False
        self.read_timeout_seconds = read_timeout_seconds
        try:
            self._httpd = _Server((host, port), _Handler, self, max_connections)
        except OSError:
            raise ConfigError(
                "cannot listen on AUTHSVC_HTTP_LISTEN (address in use or not available)"
            ) from None
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="authsvc-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        last = self.state.last_sync_at
        checks["state_loaded"] = last is not None
        lag = None if last is None else max(0.0, self.clock.now() - last)
        checks["sync_lag_seconds"] = None if lag is None else round(lag, 3)
        checks["sync_recent"] = lag is not None and lag <= self.readiness.max_sync_lag_seconds
        try:
            self.ping()
            checks["database"] = True
        except Exception:  # any failure means not ready; the cause goes to the log, not out
            log.warning("readiness: database ping failed", exc_info=True)
            checks["database"] = False
        checks["shutting_down"] = self.stopping
        ok = (
            checks["state_loaded"]
            and checks["sync_recent"]
            and checks["database"]
            and not self.stopping
        )
        return bool(ok), checks


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # stop() does not wait for connections still open: each ends by its own deadline.
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        port: HttpSidePort,
        max_connections: int,
    ) -> None:
        self.side_port = port
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the accepting thread: a connection over the bound gets no thread of its own.
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(_BUSY)  # a fresh socket's send buffer is empty: never blocks
                # Closing on unread bytes resets the connection, which may drop the answer.
                request.recv(65536)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, each read waiting at most until one deadline for the whole
    request: a per-read timeout alone lets a client send a byte every few seconds forever."""

    def __init__(self, sock: socket.socket, deadline: float, write_timeout: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._write_timeout = write_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._write_timeout)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "authsvc"
    sys_version = ""

    def setup(self) -> None:
        timeout = self.server.side_port.read_timeout_seconds
        super().setup()
        self.rfile.close()  # the socket closes only once every file made from it is closed
        # Bounds the answer too: sendall's timeout covers the whole write, not each chunk.
        self.connection.settimeout(timeout)
        # monotonic() measures an interval, it does not read the wall clock.
        reader = _DeadlineReader(self.connection, time.monotonic() + timeout, timeout)
        self.rfile = io.BufferedReader(reader)

    def do_HEAD(self) -> None:
        self.do_GET()  # `_send` leaves the body out for HEAD

    def do_GET(self) -> None:
        port = self.server.side_port
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, generate_latest(port.registry), CONTENT_TYPE_LATEST)
            elif path == JWKS_PATH:
                self._jwks(port)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                ready, checks = port.ready()
                body = json.dumps({"ready": ready, "checks": checks}).encode() + b"\n"
                self._send(200 if ready else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except Exception:
            log.exception("http handler failed for %r", path)  # repr: the path is the caller's
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _jwks(self, port: HttpSidePort) -> None:
        body = port.state.jwks_json.encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            "Cache-Control": f"public, max-age={port.jwks_max_age}",
            "ETag": etag,
        }
        if self.headers.get("If-None-Match") == etag:
            self._send(304, b"", None, headers)
        else:
            self._send(200, body, "application/json", headers)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes every few seconds: keep them out of the info log.
        log.debug("http %r", format % args)  # repr: the request line is the caller's
