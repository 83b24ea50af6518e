"""Fetch a trusted issuer's JWK Set from the URL an admin configured, and keep the last good one.

The URL comes only from admin configuration (`trust add --jwks-url`), never from a token. The
fetch is deliberately narrow:

- HTTPS only, verified against the system trust store or a configured CA file; plain `http`
  only for a loopback host (tests, a sidecar on the same machine).
- One deadline for the whole fetch (connect, TLS handshake, headers and body): a slow or
  dripping endpoint costs at most `timeout` seconds: a timer shuts the connection down when the
  deadline passes, whatever call is waiting on it. (Name resolution runs before the socket
  exists and follows the resolver's own timeout.)
- Redirects are refused, all of them. The configured URL is the admin's decision; a redirect
  is a change of it nobody made, and the usual path from a fetcher to somewhere it should
  not go (SSRF). Configure the final URL instead.
- At most `max_bytes` of body (64 KiB by default), identity encoding, a JSON media type, and
  a JSON object with a `keys` array; keys authsvc cannot use are skipped, none usable fails.

JwksCache keeps the last key set that passed all of that and holds a key its user can use (its
creator says which: federation takes RS256/ES256 keys only); a set with none counts as a failed
refresh (NO_USABLE_KEY), like any other. A failed refresh is recorded
(`status()`, logged at WARNING with the trust's name and the reason only) and the previous
keys stay in use. Refreshes follow an interval with jitter so replicas do not fetch in step,
and callers read the keys without any I/O.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from urllib.parse import urlsplit

from authsvc.clock import Clock
from authsvc.errors import InvalidArgument
from authsvc.workload.public_keys import JwkSetParse, RegisteredKey, parse_jwk_set

__all__ = [
    "CacheStatus",
    "FetchFailure",
    "FetchPolicy",
    "JwksCache",
    "JwksFetchError",
    "check_jwks_url",
    "fetch_jwk_set",
]

log = logging.getLogger("authsvc.workload.jwks")

_JSON_TYPES = frozenset({"application/json", "application/jwk-set+json"})
_MAX_URL = 2048


class FetchFailure(StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    TLS = "tls"
    STATUS = "status"
    REDIRECT = "redirect"
    TOO_LARGE = "too_large"
    CONTENT_TYPE = "content_type"
    NOT_JSON = "not_json"
    NOT_A_JWK_SET = "not_a_jwk_set"
    NO_USABLE_KEY = "no_usable_key"


class JwksFetchError(Exception):
    """One fetch failed; `reason` is a FetchFailure (fit for a metric label)."""

    def __init__(self, reason: FetchFailure) -> None:
        super().__init__(f"JWK Set fetch failed: {reason.value}")
        self.reason = reason


@dataclass(frozen=True)
class FetchPolicy:
    """How a JWK Set is fetched and refreshed; every bound written out."""

    timeout: float = 5.0  # the whole fetch, connect to last byte
    max_bytes: int = 64 * 1024
    refresh_interval: float = 300.0
    retry_interval: float = 30.0  # after a failed refresh
    jitter: float = 0.1  # each wait is shortened by up to this fraction, at random
    # A token naming an unknown `kid` may mean the issuer rolled its key: refresh early, but
    # not more often than this, so tokens with made-up kids cannot hammer the issuer.
    unknown_kid_interval: float = 30.0
    ca_file: str | None = None  # else the system trust store

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.max_bytes <= 0 or self.refresh_interval <= 0:
            raise InvalidArgument("JWKS fetch: timeout, size limit and interval must be > 0")
        if not 0 <= self.jitter < 1:
            raise InvalidArgument("JWKS fetch: jitter is a fraction in [0, 1)")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_jwks_url(url: str) -> str:
    """A JWKS URL fit to configure, returned unchanged.

    Raises:
        InvalidArgument: not https (http only for a loopback host), user info in the URL,
            a fragment, no host, or longer than 2048 characters.
    """
    if len(url) > _MAX_URL or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidArgument("jwks_url: at most 2048 printable characters, no spaces")
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise InvalidArgument("jwks_url: must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidArgument("jwks_url: must be https (plain http only for a loopback host)")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("jwks_url: no user info in the URL")
    if parts.fragment:
        raise InvalidArgument("jwks_url: no fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError:
        raise InvalidArgument("jwks_url: the port is not valid") from None
    return url


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _connect(host: str, port: int, remaining: Callable[[], float]) -> socket.socket:
    """A TCP connection to host:port; every address is tried within what is left of the
    deadline (socket.create_connection would give each address the whole timeout)."""
    last: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(remaining())
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last if last is not None else OSError(f"no address for {host!r}")


class _Deadline:
    """Ends a connection when the fetch's deadline passes, whatever call is blocked on it.

    Socket timeouts bound each operation, not the fetch: a server that sends one byte of the
    status line, of a header or of a chunk-size line just before each timeout would keep one
    `getresponse()` or `read1()` going for as long as it likes. A timer shuts
    the connection down (on a duplicate of the socket: shutdown acts on the connection, so a
    call blocked on the TLS socket or the raw one returns at once), and `stop()` says whether
    it did, so that whatever error or short read that caused is reported as TIMEOUT.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock.dup()
        self._lock = threading.Lock()
        self._stopped = False
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._fired = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def stop(self) -> bool:
        """Disarm (idempotent); True if the deadline had ended the connection first."""
        with self._lock:
            self._stopped = True
        self._timer.cancel()
        self._sock.close()
        return self._fired


def _failure(exc: BaseException) -> JwksFetchError:
    if isinstance(exc, JwksFetchError):
        return exc
    if isinstance(exc, TimeoutError):
        return JwksFetchError(FetchFailure.TIMEOUT)
    if isinstance(exc, ssl.SSLError):
        return JwksFetchError(FetchFailure.TLS)
    return JwksFetchError(FetchFailure.CONNECT)


def fetch_jwk_set(
    url: str,
    *,
    timeout: float = 5.0,
    max_bytes: int = 64 * 1024,
    ca_file: str | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> JwkSetParse:
    """GET one JWK Set, within one deadline and one size limit, following no redirect.

    Raises:
        InvalidArgument: the URL itself is not acceptable (check_jwks_url).
        JwksFetchError: the fetch failed; `reason` says how.
    """
    check_jwks_url(url)
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    # Explicit: http.client would read "::1" of an IPv6 URL without a port as host ":" port 1.
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = monotonic() + timeout

    def remaining() -> float:
        left = deadline - monotonic()
        if left <= 0:
            raise JwksFetchError(FetchFailure.TIMEOUT)
        return left

    context: ssl.SSLContext | None = None
    conn: http.client.HTTPConnection
    if https:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError):  # a CA file that is gone or not PEM: no TLS possible
            raise JwksFetchError(FetchFailure.TLS) from None
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    watchdog: _Deadline | None = None
    response: http.client.HTTPResponse | None = None
    try:
        try:
            # The connection is made here, not by http.client, so that the deadline can end it.
            raw = _connect(host, port, remaining)
            conn.sock = raw
            watchdog = _Deadline(raw, remaining())
            with contextlib.suppress(OSError):  # as http.client: not every OS has it
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if context is not None:
                raw.settimeout(remaining())
                sock = context.wrap_socket(raw, server_hostname=host)
                conn.sock = sock
            # `sock` kept: http.client drops conn.sock once the response owns the connection.
            conn.request(
                "GET",
                path,
                headers={
                    "Accept": "application/jwk-set+json, application/json",
                    "Accept-Encoding": "identity",
                    "User-Agent": "authsvc-jwks-fetch",
                },
            )
            sock.settimeout(remaining())
            response = conn.getresponse()
            if 300 <= response.status < 400:
                raise JwksFetchError(FetchFailure.REDIRECT)
            if response.status != 200:
                raise JwksFetchError(FetchFailure.STATUS)
            if _media_type(response.getheader("Content-Type")) not in _JSON_TYPES:
                raise JwksFetchError(FetchFailure.CONTENT_TYPE)
            if response.getheader("Content-Encoding", "identity").strip().lower() != "identity":
                raise JwksFetchError(FetchFailure.CONTENT_TYPE)
            declared = response.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit():
                if int(declared) > max_bytes:
                    raise JwksFetchError(FetchFailure.TOO_LARGE)
            body = bytearray()
            while True:
                sock.settimeout(remaining())
                chunk = response.read1(min(16 * 1024, max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
                if len(body) > max_bytes:
                    raise JwksFetchError(FetchFailure.TOO_LARGE)
        except (OSError, http.client.HTTPException, JwksFetchError) as exc:
            # Once the deadline shut the connection down, any error (an EOF mid-handshake, a
            # status line cut short, headers missing) is the deadline's doing.
            if watchdog is not None and watchdog.stop():
                raise JwksFetchError(FetchFailure.TIMEOUT) from None
            raise _failure(exc) from None
        # The end of the body may be the deadline's shutdown, not the server's.
        if watchdog.stop():
            raise JwksFetchError(FetchFailure.TIMEOUT)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if response is not None:  # it owns the socket once the connection handed it over
            response.close()
        conn.close()
    try:
        document = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise JwksFetchError(FetchFailure.NOT_JSON) from None
    try:
        parsed = parse_jwk_set(document)
    except ValueError:
        raise JwksFetchError(FetchFailure.NOT_A_JWK_SET) from None
    if not parsed.keys:
        raise JwksFetchError(FetchFailure.NO_USABLE_KEY)
    return parsed


@dataclass(frozen=True)
class CacheStatus:
    """What a refresher reports: when keys last loaded, the last failure, when to fetch next."""

    loaded_at: float | None
    key_count: int
    last_failure: FetchFailure | None
    last_failure_at: float | None
    consecutive_failures: int
    next_refresh_at: float


class JwksCache:
    """The last good JWK Set of one URL, refreshed on a jittered schedule.

    `current_keys()` never does I/O. `refresh_if_due()` is for a scheduler loop; `ensure_loaded()`
    and `on_unknown_kid()` may fetch on a caller's thread, bounded by the policy's timeout, and
    only one fetch runs at a time (a caller that finds one under way waits at most the timeout
    and then uses what is there).

    `usable` picks the keys worth keeping (federation: `usable_for_federation`); a fetched set
    with none of them is a failed refresh (NO_USABLE_KEY) and the keys loaded before stay.
    Without it, every key fetch_jwk_set parsed is kept.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        policy: FetchPolicy | None = None,
        name: str = "",
        rng: Callable[[], float] = random.random,
        fetch: Callable[..., JwkSetParse] = fetch_jwk_set,
        usable: Callable[[RegisteredKey], bool] | None = None,
    ) -> None:
        self.url = check_jwks_url(url)
        self.name = name
        self._clock = clock
        self._policy = policy or FetchPolicy()
        self._rng = rng
        self._fetch = fetch
        self._usable = usable
        self._fetching = threading.Lock()
        self._keys: tuple[RegisteredKey, ...] = ()
        self._generation = 0
        self._last_unknown_kid_refresh: float | None = None
        self._status = CacheStatus(None, 0, None, None, 0, clock.now())

    def current_keys(self) -> tuple[RegisteredKey, ...]:
        return self._keys

    def status(self) -> CacheStatus:
        return self._status

    def _wait(self, base: float) -> float:
        return base * (1 - self._policy.jitter * self._rng())

    def refresh(self) -> bool:
        """Fetch now. True if the keys were replaced (by this call or one it waited for)."""
        generation = self._generation
        if not self._fetching.acquire(timeout=self._policy.timeout):
            return False
        try:
            if self._generation != generation:  # another caller refreshed while we waited
                return True
            now = self._clock.now()
            try:
                parsed = self._fetch(
                    self.url,
                    timeout=self._policy.timeout,
                    max_bytes=self._policy.max_bytes,
                    ca_file=self._policy.ca_file,
                )
                keys = parsed.keys
                if self._usable is not None:
                    keys = tuple(k for k in keys if self._usable(k))
                if not keys:
                    raise JwksFetchError(FetchFailure.NO_USABLE_KEY)
            except JwksFetchError as exc:
                failures = self._status.consecutive_failures + 1
                self._status = replace(
                    self._status,
                    last_failure=exc.reason,
                    last_failure_at=now,
                    consecutive_failures=failures,
                    next_refresh_at=now
                    + self._wait(min(self._policy.retry_interval, self._policy.refresh_interval)),
                )
                log.warning(
                    "JWK Set refresh failed for trust %r (%s, %d in a row); keeping the %d "
                    "key(s) loaded before",
                    self.name,
                    exc.reason.value,
                    failures,
                    len(self._keys),
                )
                return False
            self._keys = keys
            self._generation += 1
            self._status = CacheStatus(
                now,
                len(keys),
                None,
                None,
                0,
                now + self._wait(self._policy.refresh_interval),
            )
            return True
        finally:
            self._fetching.release()

    def refresh_if_due(self) -> bool:
        """Refresh when the schedule says so; for the server's maintenance loop."""
        if self._clock.now() < self._status.next_refresh_at:
            return False
        return self.refresh()

    def ensure_loaded(self) -> tuple[RegisteredKey, ...]:
        """The keys, fetching first if none was ever loaded (a replica that just started)."""
        if self._status.loaded_at is None and self._clock.now() >= self._status.next_refresh_at:
            self.refresh()
        return self._keys

    def on_unknown_kid(self) -> bool:
        """A token named a kid not in the set: refresh early, at most once per interval."""
        now = self._clock.now()
        last = self._last_unknown_kid_refresh
        if last is not None and now - last < self._policy.unknown_kid_interval:
            return False
        self._last_unknown_kid_refresh = now
        return self.refresh()
