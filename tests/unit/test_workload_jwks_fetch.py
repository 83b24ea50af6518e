"""authsvc.workload.jwks_fetch against a real local HTTPS server (a throwaway CA)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from authsvc.errors import InvalidArgument
from authsvc.workload.federation import FederationVerifier, TrustedIssuer, usable_for_federation
from authsvc.workload.jwks_fetch import (
    FetchFailure,
    FetchPolicy,
    JwksCache,
    JwksFetchError,
    check_jwks_url,
    fetch_jwk_set,
)
from authsvc.workload.public_keys import JwkSetParse, parse_jwk_set
from tests.support.certs import CertificateAuthority
from tests.support.clock import FakeClock
from tests.support.workload import (
    JwksServer,
    Route,
    jwk_of,
    jwk_set,
    jwks_server,
    new_ec,
    new_ed25519,
    new_rsa,
    sign,
)

RSA = new_rsa()
EC = new_ec()
GOOD = jwk_set(jwk_of(RSA, kid="r1", use="sig"), jwk_of(EC, kid="e1"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("jwks-pki"), "jwks")


@pytest.fixture(scope="module")
def server(ca: CertificateAuthority) -> Iterator[JwksServer]:
    issued = ca.issue("server", server=True)
    with jwks_server(issued.cert_path, issued.key_path) as running:
        running.routes["/jwks"] = Route(GOOD, headers={"Content-Type": "application/jwk-set+json"})
        yield running


def failure(url: str, ca: CertificateAuthority, **kw: object) -> FetchFailure:
    with pytest.raises(JwksFetchError) as caught:
        fetch_jwk_set(url, ca_file=str(ca.cert_path), **kw)  # type: ignore[arg-type]
    return caught.value.reason


class TestFetch:
    def test_normal(self, server: JwksServer, ca: CertificateAuthority) -> None:
        parsed = fetch_jwk_set(server.url("/jwks"), ca_file=str(ca.cert_path))
        assert [k.jwk_kid for k in parsed.keys] == ["r1", "e1"]

    def test_unknown_ca_is_a_tls_failure(self, server: JwksServer) -> None:
        with pytest.raises(JwksFetchError) as caught:
            fetch_jwk_set(server.url("/jwks"))  # the system trust store
        assert caught.value.reason == FetchFailure.TLS

    def test_a_ca_file_gone_or_not_pem_is_a_tls_failure(
        self, server: JwksServer, tmp_path: Path
    ) -> None:
        """A failure JwksCache records (last good keys kept), not an exception that escapes
        the refresh and the maintenance loop with it."""
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate")
        for ca_file in (str(tmp_path / "missing.pem"), str(junk)):
            with pytest.raises(JwksFetchError) as caught:
                fetch_jwk_set(server.url("/jwks"), ca_file=ca_file)
            assert caught.value.reason == FetchFailure.TLS

    def test_hanging_endpoint_times_out(self, server: JwksServer, ca: CertificateAuthority) -> None:
        # The server holds the request for 60 s: only our deadline can end it with TIMEOUT.
        server.routes["/hang"] = Route(hang=True)
        assert failure(server.url("/hang"), ca, timeout=0.5) == FetchFailure.TIMEOUT

    def test_slow_drip_is_bounded_by_one_deadline(
        self, server: JwksServer, ca: CertificateAuthority
    ) -> None:
        """Each byte arrives well within the timeout; the whole body never would."""
        server.routes["/drip"] = Route(GOOD, drip=0.2)
        started = time.monotonic()
        assert failure(server.url("/drip"), ca, timeout=1.0) == FetchFailure.TIMEOUT
        assert time.monotonic() - started <= 1.0 + SLACK

    def test_huge_body(self, server: JwksServer, ca: CertificateAuthority) -> None:
        huge = b'{"keys": [], "pad": "' + b"x" * 70_000 + b'"}'
        server.routes["/huge"] = Route(huge)
        server.routes["/huge-unannounced"] = Route(
            huge,
            send_length=False,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        assert failure(server.url("/huge"), ca) == FetchFailure.TOO_LARGE
        assert failure(server.url("/huge-unannounced"), ca) == FetchFailure.TOO_LARGE
        # the limit is configurable
        assert failure(server.url("/jwks"), ca, max_bytes=100) == FetchFailure.TOO_LARGE

    def test_redirects_are_refused(self, server: JwksServer, ca: CertificateAuthority) -> None:
        server.routes["/to-http"] = Route(
            status=302, headers={"Location": "http://127.0.0.1:9/jwks"}
        )
        server.routes["/to-https"] = Route(status=301, headers={"Location": server.url("/jwks")})
        before = server.hits.get("/jwks", 0)
        assert failure(server.url("/to-http"), ca) == FetchFailure.REDIRECT
        assert failure(server.url("/to-https"), ca) == FetchFailure.REDIRECT
        assert server.hits.get("/jwks", 0) == before  # not followed

    def test_only_a_json_jwk_set(self, server: JwksServer, ca: CertificateAuthority) -> None:
        cases = {
            "/bad-json": (Route(b"{not json"), FetchFailure.NOT_JSON),
            "/no-keys": (Route(b'{"kids": []}'), FetchFailure.NOT_A_JWK_SET),
            "/html": (
                Route(GOOD, headers={"Content-Type": "text/html"}),
                FetchFailure.CONTENT_TYPE,
            ),
            "/gzip": (
                Route(
                    GOOD, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
                ),
                FetchFailure.CONTENT_TYPE,
            ),
            "/error": (Route(GOOD, status=500), FetchFailure.STATUS),
            "/unusable": (Route(jwk_set({"kty": "oct", "k": "AA"})), FetchFailure.NO_USABLE_KEY),
        }
        for path, (route, _) in cases.items():
            server.routes[path] = route
        for path, (_, expected) in cases.items():
            assert failure(server.url(path), ca) == expected, path

    def test_nothing_listening(self, ca: CertificateAuthority) -> None:
        assert failure("https://127.0.0.1:9/jwks", ca) == FetchFailure.CONNECT


# A byte every DRIP seconds, each well within TIMEOUT, the whole drip far beyond it: only a
# deadline for the whole fetch ends it by TIMEOUT + SLACK (socket timeouts are per operation).
TIMEOUT = 0.4
DRIP = 0.25
SLACK = 0.5
STATUS_LINE = b"HTTP/1.1 200 OK\r\n"
JSON_HEAD = STATUS_LINE + b"Content-Type: application/json\r\n"


@contextmanager
def dripping(
    drip: bytes, *, head: bytes = b"", tls: ssl.SSLContext | None = None, http: bool = True
) -> Iterator[int]:
    """A one-connection server on 127.0.0.1 (its port yielded): it reads the request (`http`)
    or whatever the client sends first, sends `head` at once, then `drip` a byte every DRIP
    seconds until done or the client is gone."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            break
        else:
            return
        try:
            conn.settimeout(5)
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
            received = b""
            while (b"\r\n\r\n" not in received) if http else not received:
                data = conn.recv(4096)
                if not data:
                    return
                received += data
            conn.sendall(head)
            for i in range(len(drip)):
                if stop.wait(DRIP):
                    return
                conn.sendall(drip[i : i + 1])
        except OSError:
            pass  # the client hung up: what the deadline is for
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture(scope="module")
def server_tls(ca: CertificateAuthority) -> ssl.SSLContext:
    issued = ca.issue("drip-server", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert_path, issued.key_path)
    return context


def timed_failure(url: str, ca: CertificateAuthority) -> tuple[FetchFailure, float]:
    started = time.monotonic()
    reason = failure(url, ca, timeout=TIMEOUT)
    return reason, time.monotonic() - started


class TestOneDeadline:
    """Defeated by per-operation timeouts alone: each of these took the whole drip before."""

    @pytest.mark.parametrize("scheme", ["http", "https"])
    def test_headers_dripped(
        self, scheme: str, ca: CertificateAuthority, server_tls: ssl.SSLContext
    ) -> None:
        drip = b"X-Slow: " + b"." * 12 + b"\r\n"  # 22 bytes: 5.5 s, in one getresponse()
        tls = server_tls if scheme == "https" else None
        with dripping(drip, head=STATUS_LINE, tls=tls) as port:
            reason, elapsed = timed_failure(f"{scheme}://localhost:{port}/jwks", ca)
        assert reason == FetchFailure.TIMEOUT
        assert elapsed <= TIMEOUT + SLACK

    def test_status_line_dripped(self, ca: CertificateAuthority) -> None:
        with dripping(STATUS_LINE) as port:  # 17 bytes: 4.25 s
            reason, elapsed = timed_failure(f"http://127.0.0.1:{port}/jwks", ca)
        assert reason == FetchFailure.TIMEOUT
        assert elapsed <= TIMEOUT + SLACK

    def test_chunked_body_dripped(
        self, ca: CertificateAuthority, server_tls: ssl.SSLContext
    ) -> None:
        # A chunk-size line is read whole by one read1(): 18 bytes, 4.5 s.
        head = JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        with dripping(b"0000000000000002\r\n{}\r\n0\r\n\r\n", head=head, tls=server_tls) as port:
            reason, elapsed = timed_failure(f"https://localhost:{port}/jwks", ca)
        assert reason == FetchFailure.TIMEOUT
        assert elapsed <= TIMEOUT + SLACK

    def test_tls_handshake_dripped(self, ca: CertificateAuthority) -> None:
        # A plain TCP server answering the ClientHello with a well-formed TLS record header
        # (handshake, TLS 1.2, 256 bytes) and then the record's bytes one at a time: the
        # client waits for the whole record before it can judge it. 21 bytes: 5.25 s.
        record = b"\x16\x03\x03\x01\x00" + b"\x02" + b"\x00" * 15
        with dripping(record, http=False) as port:
            reason, elapsed = timed_failure(f"https://localhost:{port}/jwks", ca)
        assert reason == FetchFailure.TIMEOUT
        assert elapsed <= TIMEOUT + SLACK

    def test_a_normal_fetch_is_not_cut_short(
        self, server: JwksServer, ca: CertificateAuthority
    ) -> None:
        # The deadline's timer is disarmed when the fetch ends: nothing fires later.
        for _ in range(3):
            parsed = fetch_jwk_set(server.url("/jwks"), ca_file=str(ca.cert_path), timeout=TIMEOUT)
            assert len(parsed.keys) == 2
        time.sleep(TIMEOUT)
        assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


class TestUrl:
    def test_accepted(self) -> None:
        for url in (
            "https://kubernetes.default.svc/openid/v1/jwks",
            "https://issuer.example:8443/keys?x=1",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:80/jwks",
        ):
            assert check_jwks_url(url) == url

    def test_refused(self) -> None:
        for url in (
            "http://issuer.example/jwks",
            "http://10.0.0.1/jwks",
            "ftp://issuer.example/jwks",
            "file:///etc/passwd",
            "https://user:pw@issuer.example/jwks",
            "https://issuer.example/jwks#frag",
            "https:///jwks",
            "https://issuer.example:99999/jwks",
            "https://issuer.example/a b",
        ):
            with pytest.raises(InvalidArgument, match="jwks_url"):
                check_jwks_url(url)


def cache_for(
    server: JwksServer, ca: CertificateAuthority, path: str, clock: FakeClock
) -> JwksCache:
    return JwksCache(
        server.url(path),
        clock=clock,
        policy=FetchPolicy(
            timeout=10.0, refresh_interval=300, retry_interval=30, ca_file=str(ca.cert_path)
        ),
        name="cluster",
        rng=lambda: 0.5,
    )


class TestCache:
    def test_last_good_keys_survive_a_bad_refresh(
        self, server: JwksServer, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
    ) -> None:
        server.routes["/rolling"] = Route(GOOD)
        clock = FakeClock()
        cache = cache_for(server, ca, "/rolling", clock)
        assert cache.refresh()
        good = cache.current_keys()
        assert len(good) == 2

        server.routes["/rolling"] = Route(b"{not json")
        clock.advance(300)
        assert not cache.refresh()
        assert cache.current_keys() == good
        status = cache.status()
        assert status.last_failure == FetchFailure.NOT_JSON
        assert status.consecutive_failures == 1 and status.key_count == 2
        assert status.next_refresh_at == clock.now() + 30 * 0.95  # retry, jittered
        assert "cluster" in caplog.text and "not_json" in caplog.text

        server.routes["/rolling"] = Route(jwk_set(jwk_of(EC, kid="e2")))
        assert cache.refresh()
        assert [k.jwk_kid for k in cache.current_keys()] == ["e2"]
        assert cache.status().last_failure is None

    def test_schedule_with_jitter(self, server: JwksServer, ca: CertificateAuthority) -> None:
        server.routes["/sched"] = Route(GOOD)
        clock = FakeClock()
        cache = cache_for(server, ca, "/sched", clock)
        assert cache.refresh_if_due()  # due at once
        assert cache.status().next_refresh_at == clock.now() + 300 * 0.95
        clock.advance(284)
        assert not cache.refresh_if_due()
        assert server.hits["/sched"] == 1
        clock.advance(1)
        assert cache.refresh_if_due()
        assert server.hits["/sched"] == 2

    def test_jitter_spreads_replicas(self, server: JwksServer, ca: CertificateAuthority) -> None:
        server.routes["/spread"] = Route(GOOD)
        clock = FakeClock()
        waits = set()
        for draw in (0.0, 0.5, 0.99):
            cache = JwksCache(
                server.url("/spread"),
                clock=clock,
                policy=FetchPolicy(refresh_interval=300, jitter=0.1, ca_file=str(ca.cert_path)),
                rng=lambda d=draw: d,  # type: ignore[misc]
            )
            cache.refresh()
            waits.add(round(cache.status().next_refresh_at - clock.now(), 3))
        assert waits == {300.0, 285.0, 270.3}

    def test_unknown_kid_refresh_is_rate_limited(
        self, server: JwksServer, ca: CertificateAuthority
    ) -> None:
        server.routes["/kid"] = Route(GOOD)
        clock = FakeClock()
        cache = cache_for(server, ca, "/kid", clock)
        cache.ensure_loaded()
        assert server.hits["/kid"] == 1
        assert cache.on_unknown_kid()
        for _ in range(5):
            assert not cache.on_unknown_kid()
        assert server.hits["/kid"] == 2
        clock.advance(30)
        assert cache.on_unknown_kid()
        assert server.hits["/kid"] == 3

    def test_first_load_failure_is_not_retried_on_every_call(
        self, server: JwksServer, ca: CertificateAuthority
    ) -> None:
        server.routes["/down"] = Route(status=503)
        clock = FakeClock()
        cache = cache_for(server, ca, "/down", clock)
        for _ in range(3):
            assert cache.ensure_loaded() == ()
        assert server.hits["/down"] == 1
        clock.advance(30)
        server.routes["/down"] = Route(GOOD)
        assert len(cache.ensure_loaded()) == 2

    def test_policy_bounds(self) -> None:
        for kw in ({"timeout": 0}, {"max_bytes": 0}, {"jitter": 1.0}, {"refresh_interval": -1}):
            with pytest.raises(InvalidArgument):
                FetchPolicy(**kw)

    def test_http_only_on_loopback(self) -> None:
        with pytest.raises(InvalidArgument):
            JwksCache("http://issuer.example/jwks", clock=FakeClock())


class TestPlainLoopback:
    def test_http_on_loopback(self) -> None:
        with jwks_server() as plain:
            plain.routes["/jwks"] = Route(GOOD)
            assert len(fetch_jwk_set(plain.url("/jwks", host="127.0.0.1")).keys) == 2


# --- only keys the cache's user can use ---------------------------------------------------------

ISSUER = "https://oidc.cluster.example"
P256 = jwk_set(jwk_of(EC, kid="p256"))
ED25519_ONLY = jwk_set(jwk_of(new_ed25519(), kid="ed"))
PS256_ONLY = jwk_set(jwk_of(RSA, kid="ps", alg="PS256"))


class ScriptedFetch:
    """A fetch_jwk_set stand-in answering with the given documents, one per call."""

    def __init__(self, *documents: bytes) -> None:
        self.documents = list(documents)

    def __call__(self, url: str, **_: Any) -> JwkSetParse:
        return parse_jwk_set(json.loads(self.documents.pop(0)))


def federation_cache(clock: FakeClock, *documents: bytes) -> JwksCache:
    return JwksCache(
        "https://oidc.cluster.example/keys",
        clock=clock,
        policy=FetchPolicy(refresh_interval=300, retry_interval=30),
        name="cluster",
        rng=lambda: 0.5,
        fetch=ScriptedFetch(*documents),
        usable=usable_for_federation,
    )


class TestUsableKeys:
    @pytest.mark.parametrize("unusable", [ED25519_ONLY, PS256_ONLY], ids=["ed25519", "ps256"])
    def test_a_set_with_no_federation_key_keeps_the_last_good_one(
        self, unusable: bytes, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Both parse (fetch_jwk_set would return them), neither verifies RS256 or ES256.
        assert parse_jwk_set(json.loads(unusable)).keys
        clock = FakeClock()
        cache = federation_cache(clock, P256, unusable)
        assert cache.refresh()
        good = cache.current_keys()
        assert [k.jwk_kid for k in good] == ["p256"]

        clock.advance(300)
        assert cache.refresh_if_due() is False
        assert cache.current_keys() == good
        status = cache.status()
        assert status.last_failure == FetchFailure.NO_USABLE_KEY
        assert status.consecutive_failures == 1 and status.key_count == 1
        assert status.next_refresh_at == clock.now() + 30 * 0.95  # retried as any failure
        assert "cluster" in caplog.text and "no_usable_key" in caplog.text

        # ExchangeToken's path: an ES256 token of the issuer still verifies.
        verifier = FederationVerifier([TrustedIssuer("cluster", ISSUER, "authsvc", cache)])
        now = clock.now()
        claims = {"iss": ISSUER, "sub": "system:serviceaccount:prod:orders", "aud": "authsvc"}
        token = sign({**claims, "iat": now, "exp": now + 600}, EC, "ES256", kid="p256")
        assert verifier.verify(token, now=now).subject == "system:serviceaccount:prod:orders"

    def test_only_the_usable_keys_of_a_mixed_set_are_kept(self) -> None:
        mixed = jwk_set(
            jwk_of(new_ed25519(), kid="ed"),
            jwk_of(RSA, kid="ps", alg="PS256"),
            jwk_of(RSA, kid="rs", alg="RS256"),
            jwk_of(EC, kid="p256"),
        )
        cache = federation_cache(FakeClock(), mixed)
        assert cache.refresh()
        assert [k.jwk_kid for k in cache.current_keys()] == ["rs", "p256"]
        assert cache.status().key_count == 2
