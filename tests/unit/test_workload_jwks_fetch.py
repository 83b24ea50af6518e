"""authsvc.workload.jwks_fetch against a real local HTTPS server (a throwaway CA)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from authsvc.errors import InvalidArgument
from authsvc.workload.jwks_fetch import (
    FetchFailure,
    FetchPolicy,
    JwksCache,
    JwksFetchError,
    check_jwks_url,
    fetch_jwk_set,
)
from tests.support.certs import CertificateAuthority
from tests.support.clock import FakeClock
from tests.support.workload import JwksServer, Route, jwk_of, jwk_set, jwks_server, new_ec, new_rsa

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

    def test_hanging_endpoint_times_out(self, server: JwksServer, ca: CertificateAuthority) -> None:
        # The server holds the request for 60 s: only our deadline can end it with TIMEOUT.
        server.routes["/hang"] = Route(hang=True)
        assert failure(server.url("/hang"), ca, timeout=0.5) == FetchFailure.TIMEOUT

    def test_slow_drip_is_bounded_by_one_deadline(
        self, server: JwksServer, ca: CertificateAuthority
    ) -> None:
        """Each byte arrives well within the timeout; the whole body never would."""
        server.routes["/drip"] = Route(GOOD, drip=0.2)
        assert failure(server.url("/drip"), ca, timeout=1.0) == FetchFailure.TIMEOUT

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
