"""Secretless logins against real `authsvc serve` processes: signed assertions (RFC 7523),
client certificates (RFC 8705) and federated workload tokens (ExchangeToken), with the attacks
issue 14 lists. Services and trusts are registered with the CLI, as ops would."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc.crypto.secrets import SECRET_PREFIX
from authsvc_client.assertions import AssertionSigner, PrivateKey
from authsvc_client.binding import certificate_thumbprint
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.certs import CertificateAuthority
from tests.support.postgres import postgres_url  # noqa: F401  (a fixture)
from tests.support.server import TEST_ISSUER, RunningServer, base_env, run_cli, start_server
from tests.support.workload import (
    Route,
    WorkloadCa,
    b64url,
    hmac_forged,
    jwk_of,
    jwk_set,
    jwks_server,
    new_ec,
    new_rsa,
    public_pem,
    sign,
    unsigned,
)

JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
GENERIC = "invalid service credentials"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
OTHER_ISSUER = "https://oidc.other-cluster.test"
SUBJECT = "system:serviceaccount:prod:reports"
SPIFFE_ORDERS = "spiffe://example.org/ns/prod/sa/orders"


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    path.chmod(mode)
    return path


def _refused(call: Any, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


def _validate(server: RunningServer, token: str, audience: str) -> auth_pb2.ValidateTokenResponse:
    reply: auth_pb2.ValidateTokenResponse = server.stub.ValidateToken(
        auth_pb2.ValidateTokenRequest(token=token, audience=audience), timeout=10
    )
    return reply


@dataclass
class Fleet:
    """A plaintext loopback server with secretless services of two kinds registered."""

    server: RunningServer
    folder: Path
    orders_key: PrivateKey = field(repr=False)
    inventory_key: PrivateKey = field(repr=False)
    issuer_key: PrivateKey = field(repr=False)
    other_issuer_key: PrivateKey = field(repr=False)

    def assertion(self, service_id: str = "orders", key: PrivateKey | None = None) -> str:
        return AssertionSigner(service_id, TEST_ISSUER, key or self.orders_key).sign()

    def issue(self, assertion: str, service_id: str = "orders", audience: str = "billing") -> Any:
        return self.server.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                service_id=service_id, client_assertion=assertion, audience=audience
            ),
            timeout=10,
        )

    def k8s_token(
        self,
        *,
        key: PrivateKey | None = None,
        iss: str = K8S_ISSUER,
        sub: str = SUBJECT,
        aud: Any = ("authsvc",),
        lifetime: int = 3600,
        iat: float | None = None,
        kid: str = "k8s-1",
    ) -> str:
        now = int(time.time() if iat is None else iat)
        claims = {
            "iss": iss,
            "sub": sub,
            "aud": list(aud) if isinstance(aud, tuple) else aud,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "reports"}},
        }
        return sign(claims, key or self.issuer_key, "RS256", kid=kid)

    def exchange(self, subject_token: str, audience: str = "billing", **extra: Any) -> Any:
        return self.server.stub.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(
                subject_token=subject_token,
                subject_token_type=extra.pop("subject_token_type", JWT_TYPE),
                audience=audience,
                **extra,
            ),
            timeout=15,
        )


def _register(
    env: dict[str, str], folder: Path
) -> tuple[PrivateKey, PrivateKey, PrivateKey, PrivateKey]:
    orders_key, inventory_key = new_ec(), new_rsa()
    issuer_key, other_issuer_key = new_rsa(), new_rsa()
    orders_jwk = _write(folder / "orders.jwk", json.dumps(jwk_of(orders_key)))
    inventory_pem = _write(folder / "inventory.pem", public_pem(inventory_key))
    run_cli(env, "db", "upgrade")
    run_cli(
        env, "services", "create", "orders", "--audience", "billing", "--scope", "billing.read",
        "--jwk-file", str(orders_jwk), "--no-secret", "--json",
    )  # fmt: skip
    run_cli(
        env, "services", "create", "inventory", "--audience", "billing",
        "--jwk-file", str(inventory_pem), "--json",
    )  # fmt: skip
    run_cli(env, "services", "create", "billing", "--audience", "orders", "--json")
    k8s = _write(folder / "k8s.jwks", jwk_set(jwk_of(issuer_key, kid="k8s-1", alg="RS256")))
    other = _write(folder / "other.jwks", jwk_set(jwk_of(other_issuer_key, kid="k8s-1")))
    run_cli(
        env, "trust", "add", "cluster", "--issuer", K8S_ISSUER, "--audience", "authsvc",
        "--jwks-file", str(k8s),
    )  # fmt: skip
    run_cli(
        env, "trust", "add", "other-cluster", "--issuer", OTHER_ISSUER, "--audience", "authsvc",
        "--jwks-file", str(other),
    )  # fmt: skip
    # The same subject in two clusters: two different services, never confused.
    run_cli(
        env, "services", "create", "reports", "--audience", "billing", "--scope", "billing.read",
        "--federated-subject", f"cluster={SUBJECT}", "--no-secret", "--json",
    )  # fmt: skip
    run_cli(
        env, "services", "create", "reports-staging", "--audience", "billing",
        "--federated-subject", f"other-cluster={SUBJECT}", "--no-secret", "--json",
    )  # fmt: skip
    return orders_key, inventory_key, issuer_key, other_issuer_key


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("workload")
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_THROTTLE_ID_FAILURES="10",
        AUTHSVC_THROTTLE_PEER_FAILURES="100000",
        AUTHSVC_JWKS_FETCH_TIMEOUT_SECONDS="1",
    )
    keys = _register(env, folder)
    server = start_server(env)
    try:
        yield Fleet(server, folder, *keys)
    finally:
        server.stop()


class TestSignedAssertion:
    def test_a_secretless_service_gets_a_token_with_an_assertion(self, fleet: Fleet) -> None:
        reply = fleet.issue(fleet.assertion())
        checked = _validate(fleet.server, reply.access_token, "billing")
        assert checked.valid and checked.claims.subject == "orders"
        assert list(checked.claims.scopes) == ["billing.read"]

    def test_the_service_id_may_come_from_the_assertion(self, fleet: Fleet) -> None:
        reply = fleet.issue(fleet.assertion(), service_id="")
        assert _validate(fleet.server, reply.access_token, "billing").claims.subject == "orders"

    def test_a_pem_key_registered_beside_a_secret_works(self, fleet: Fleet) -> None:
        reply = fleet.issue(fleet.assertion("inventory", fleet.inventory_key), "inventory")
        assert _validate(fleet.server, reply.access_token, "billing").claims.subject == "inventory"

    def test_an_assertion_is_single_use(self, fleet: Fleet) -> None:
        assertion = fleet.assertion()
        fleet.issue(assertion)
        assert _refused(lambda: fleet.issue(assertion)) == GENERIC

    def test_an_audience_list_or_a_token_endpoint_url_is_refused(self, fleet: Fleet) -> None:
        now = int(time.time())
        base = {"iss": "orders", "sub": "orders", "iat": now, "exp": now + 60}
        audiences = ([TEST_ISSUER], [TEST_ISSUER, "https://evil.test"], f"{TEST_ISSUER}/token")
        for aud in audiences:
            jti = b64url(str(aud).encode())
            forged = sign({**base, "aud": aud, "jti": jti}, fleet.orders_key, "ES256")
            assert _refused(lambda forged=forged: fleet.issue(forged)) == GENERIC

    def test_alg_none_and_hmac_with_the_public_key_are_refused(self, fleet: Fleet) -> None:
        now = int(time.time())
        claims = {"iss": "orders", "sub": "orders", "aud": TEST_ISSUER, "iat": now, "exp": now + 60}
        none = unsigned({**claims, "jti": "none-1"}, alg="none")
        hs = hmac_forged({**claims, "jti": "hs-1"}, public_pem(fleet.orders_key), alg="HS256")
        for forged in (none, hs):
            assert _refused(lambda forged=forged: fleet.issue(forged)) == GENERIC

    def test_a_key_registered_for_another_service_is_refused(self, fleet: Fleet) -> None:
        # inventory's own key, signing an assertion that claims to be orders.
        forged = fleet.assertion("orders", fleet.inventory_key)
        assert _refused(lambda: fleet.issue(forged)) == GENERIC

    def test_a_secretless_service_never_logs_in_with_a_secret(self, fleet: Fleet) -> None:
        def with_secret(secret: str) -> Any:
            return fleet.server.issue("orders", secret, "billing")

        assert _refused(lambda: with_secret("authsvc_sk_anything")) == GENERIC
        _refused(lambda: with_secret(""), grpc.StatusCode.INVALID_ARGUMENT)

    def test_the_audit_row_names_the_credential_kind(self, fleet: Fleet) -> None:
        fleet.issue(fleet.assertion())
        rows = json.loads(fleet.server.cli("audit", "list", "--json", "--limit", "500").stdout)
        details = [r["detail"] for r in rows if r["actor"] == "orders" and r["outcome"] == "ok"]
        assert any(d.startswith("credential=assertion key=") for d in details)
        refused = [r["detail"] for r in rows if r["outcome"] == "bad_credentials"]
        assert any("credential=assertion reason=replayed" in d for d in refused)
        assert not any("eyJ" in r["detail"] for r in rows)  # no JWT ever reaches a row


class TestFederatedToken:
    def test_a_bound_subject_exchanges_its_token(self, fleet: Fleet) -> None:
        reply = fleet.exchange(fleet.k8s_token())
        checked = _validate(fleet.server, reply.access_token, "billing")
        assert checked.valid and checked.claims.subject == "reports"
        assert list(reply.scopes) == ["billing.read"]
        # RFC 8693 section 2.2.1: a JWT went in, an access token came out.
        assert reply.issued_token_type == "urn:ietf:params:oauth:token-type:access_token"

    def test_the_same_subject_of_another_issuer_is_another_service(self, fleet: Fleet) -> None:
        token = fleet.k8s_token(key=fleet.other_issuer_key, iss=OTHER_ISSUER)
        reply = fleet.exchange(token)
        assert _validate(fleet.server, reply.access_token, "billing").claims.subject == (
            "reports-staging"
        )
        # And the first cluster's key never verifies the second's issuer (nor the reverse).
        swapped = fleet.k8s_token(key=fleet.issuer_key, iss=OTHER_ISSUER)
        assert _refused(lambda: fleet.exchange(swapped)) == GENERIC

    def test_a_named_service_must_be_the_bound_one(self, fleet: Fleet) -> None:
        token = fleet.k8s_token()
        assert _refused(lambda: fleet.exchange(token, service_id="orders")) == GENERIC
        reply = fleet.exchange(token, service_id="reports")
        assert _validate(fleet.server, reply.access_token, "billing").claims.subject == "reports"

    def test_a_kubernetes_token_is_reused_until_it_expires(self, fleet: Fleet) -> None:
        token = fleet.k8s_token()
        for _ in range(3):
            fleet.exchange(token)

    @pytest.mark.parametrize(
        "change",
        [
            {"iat": time.time() - 7200, "lifetime": 3600},  # expired an hour ago
            {"lifetime": 25 * 3600},  # beyond the 24 h ceiling
            {"aud": ("another-audience",)},
            {"aud": "authsvc-not"},
            {"iss": "https://unknown-issuer.test"},
            {"sub": "system:serviceaccount:prod:unbound"},
        ],
        ids=[
            "expired",
            "too-long",
            "wrong-aud",
            "wrong-aud-string",
            "unknown-iss",
            "unbound",
        ],
    )
    def test_a_bad_federated_token_is_refused(self, fleet: Fleet, change: dict[str, Any]) -> None:
        token = fleet.k8s_token(**change)
        assert _refused(lambda: fleet.exchange(token)) == GENERIC

    def test_a_kid_is_a_hint_the_trusted_keys_still_decide(self, fleet: Fleet) -> None:
        # A kid the JWK Set lacks makes authsvc try each trusted key (bounded), as RFC 7515
        # allows: the signature decides, never the header.
        assert fleet.exchange(fleet.k8s_token(kid="not-in-the-set")).access_token
        forged = fleet.k8s_token(key=new_rsa(), kid="k8s-1")
        assert _refused(lambda: fleet.exchange(forged)) == GENERIC

    def test_a_tampered_or_foreign_token_is_refused(self, fleet: Fleet) -> None:
        header, payload, sig = fleet.k8s_token().split(".")
        claims = json.loads(__import__("base64").urlsafe_b64decode(payload + "=="))
        claims["sub"] = "system:serviceaccount:prod:admin"
        tampered = f"{header}.{b64url(json.dumps(claims).encode())}.{sig}"
        foreign = fleet.k8s_token(key=new_rsa())
        for token in (tampered, foreign):
            assert _refused(lambda token=token: fleet.exchange(token)) == GENERIC

    def test_request_errors_are_invalid_argument(self, fleet: Fleet) -> None:
        token = fleet.k8s_token()
        bad = grpc.StatusCode.INVALID_ARGUMENT
        _refused(lambda: fleet.exchange(token, subject_token_type="urn:x:unknown"), bad)
        _refused(lambda: fleet.exchange(""), bad)
        _refused(lambda: fleet.exchange(token, audience=""), bad)


class TestJwksUrl:
    """A trust whose keys come from a URL: fetched by the server, bounded, last good kept."""

    def test_keys_from_a_url_and_hostile_endpoints(self, fleet: Fleet) -> None:
        key = new_rsa()
        with jwks_server() as jwks:
            jwks.routes["/keys"] = Route(jwk_set(jwk_of(key, kid="url-1")))
            jwks.routes["/hang"] = Route(hang=True)
            jwks.routes["/huge"] = Route(b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}")
            jwks.routes["/redirect"] = Route(status=302, headers={"Location": "file:///etc/passwd"})
            env = fleet.server.env
            for name, path in (
                ("url", "/keys"),
                ("hang", "/hang"),
                ("huge", "/huge"),
                ("redir", "/redirect"),
            ):
                issuer = f"https://{name}.issuer.test"
                run_cli(
                    env, "trust", "add", f"{name}-trust", "--issuer", issuer,
                    "--audience", "authsvc", "--jwks-url", jwks.url(path, "127.0.0.1"),
                )  # fmt: skip
                run_cli(
                    env, "services", "create", f"{name}-svc", "--audience", "billing",
                    "--federated-subject", f"{name}-trust=wl", "--no-secret",
                )  # fmt: skip
            time.sleep(1.0)  # replicas see trust changes within a sync interval (0.2 s here)
            token = fleet.k8s_token(key=key, iss="https://url.issuer.test", sub="wl", kid="url-1")
            reply = fleet.exchange(token)
            assert (
                _validate(fleet.server, reply.access_token, "billing").claims.subject == "url-svc"
            )
            for name in ("hang", "huge", "redir"):
                forged = fleet.k8s_token(key=key, iss=f"https://{name}.issuer.test", sub="wl")
                started = time.monotonic()
                assert _refused(lambda forged=forged: fleet.exchange(forged)) == GENERIC
                assert time.monotonic() - started < 5  # the 1 s fetch timeout bounds it
            # The server stayed healthy throughout.
            fleet.exchange(token)
        # The endpoint is gone: the last good keys still verify.
        fleet.exchange(token)


def _assert_impossible_subjects_are_unknown_ids(fleet: Fleet) -> None:
    now = int(time.time())
    # Too long, a pasted secret (the real prefix: the check that refuses it must run), unprintable.
    for sub in ("o" * 600, SECRET_PREFIX + "A" * 43, "bad\nid"):
        claims = {"iss": sub, "sub": sub, "aud": TEST_ISSUER, "iat": now, "exp": now + 60}
        forged = sign({**claims, "jti": f"j-{len(sub)}-{sub[:3]}"}, new_ec(), "ES256")
        outcomes: list[Any] = []

        def login(assertion: str, service_id: str) -> None:
            try:
                issued = bool(fleet.issue(assertion, service_id).access_token)
                outcomes.append("issued" if issued else "empty")  # never the token itself
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

        threads = [
            threading.Thread(target=login, args=(forged, "")),
            threading.Thread(target=login, args=(fleet.assertion("orders"), "")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert grpc.StatusCode.UNAUTHENTICATED in outcomes, outcomes
        assert "issued" in outcomes, outcomes  # orders, batched beside it, got its token


class TestThrottle:
    def test_an_assertion_naming_an_impossible_service_is_unauthenticated(
        self, fleet: Fleet
    ) -> None:
        _assert_impossible_subjects_are_unknown_ids(fleet)

    def test_failed_assertions_count_like_wrong_secrets(self, fleet: Fleet, tmp_path: Path) -> None:
        key = new_ec()
        jwk = _write(tmp_path / "k.jwk", json.dumps(jwk_of(key)))
        fleet.server.cli(
            "services", "create", "batch", "--audience", "billing", "--jwk-file", str(jwk),
            "--no-secret",
        )  # fmt: skip
        wrong = new_ec()
        for _ in range(10):  # AUTHSVC_THROTTLE_ID_FAILURES=10
            _refused(lambda: fleet.issue(fleet.assertion("batch", wrong), "batch"))
        good = fleet.assertion("batch", key)
        _refused(lambda: fleet.issue(good, "batch"), grpc.StatusCode.RESOURCE_EXHAUSTED)


# --- client certificates -----------------------------------------------------------------------


@dataclass
class MtlsFleet:
    server: RunningServer
    server_ca: CertificateAuthority
    workload_ca: WorkloadCa
    other_ca: WorkloadCa

    def channel(
        self, ca: WorkloadCa, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()
    ) -> grpc.Channel:
        return self.channel_and_cert(ca, uris, dns)[0]

    def channel_and_cert(
        self, ca: WorkloadCa, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()
    ) -> tuple[grpc.Channel, bytes]:
        cert, key = ca.issue_pair(uris=uris, dns=dns)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.server_ca.cert_pem, private_key=key, certificate_chain=cert
        )
        return self.server.open_channel(creds), cert

    def issue(self, channel: grpc.Channel, service_id: str = "orders") -> Any:
        return auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb2.IssueTokenRequest(service_id=service_id, audience="billing"), timeout=10
        )


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsFleet]:
    folder = tmp_path_factory.mktemp("mtls")
    server_ca = CertificateAuthority(folder, "server")
    served = server_ca.issue("server", server=True)
    workload_ca, other_ca = WorkloadCa.create("prod"), WorkloadCa.create("rogue")
    bundle = _write(folder / "workload-ca.pem", workload_ca.cert_pem)
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_TLS_CERT=str(served.cert_path),
        AUTHSVC_TLS_KEY=str(served.key_path),
        AUTHSVC_TLS_CLIENT_CA=str(bundle),
    )
    run_cli(env, "db", "upgrade")
    run_cli(
        env, "services", "create", "orders", "--audience", "billing", "--tls-san", SPIFFE_ORDERS,
        "--no-secret",
    )  # fmt: skip
    run_cli(
        env, "services", "create", "search", "--audience", "billing", "--audience", "orders",
        "--tls-san", "search.prod.svc.cluster.local", "--no-secret",
    )  # fmt: skip
    server = start_server(env)
    fleet = MtlsFleet(server, server_ca, workload_ca, other_ca)
    try:
        yield fleet
    finally:
        server.stop()


class TestClientCertificate:
    def test_a_spiffe_id_logs_in_without_a_secret_and_its_token_is_bound(
        self, mtls: MtlsFleet
    ) -> None:
        channel, cert = mtls.channel_and_cert(mtls.workload_ca, uris=(SPIFFE_ORDERS,))
        other = mtls.workload_ca.issue(uris=(SPIFFE_ORDERS,))
        with channel:
            reply = mtls.issue(channel)
            stub = auth_pb2_grpc.AuthServiceStub(channel)

            def check(thumbprint: str) -> auth_pb2.ValidateTokenResponse:
                return stub.ValidateToken(  # type: ignore[no-any-return]
                    auth_pb2.ValidateTokenRequest(
                        token=reply.access_token,
                        audience="billing",
                        client_cert_thumbprint=thumbprint,
                    ),
                    timeout=10,
                )

            checked = check(certificate_thumbprint(cert))
            assert checked.valid and checked.claims.subject == "orders"
            assert checked.claims.cert_thumbprint == certificate_thumbprint(cert)
            # RFC 8705 section 3: the stolen token is useless without the certificate's key,
            # even beside another certificate with the very same SAN.
            for presented in ("", certificate_thumbprint(other)):
                assert check(presented).reason == auth_pb2.CERTIFICATE_MISMATCH

    def test_a_bound_token_is_revoked_by_its_holder_not_by_a_thief(self, mtls: MtlsFleet) -> None:
        holder, cert = mtls.channel_and_cert(mtls.workload_ca, uris=(SPIFFE_ORDERS,))
        thief = mtls.channel(mtls.workload_ca, uris=(SPIFFE_ORDERS,))
        with holder, thief:
            token = mtls.issue(holder).access_token

            def revoke(channel: grpc.Channel) -> bool:
                return bool(
                    auth_pb2_grpc.AuthServiceStub(channel)
                    .RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=10)
                    .revoked
                )

            # Replayed from another certificate (same SAN, same CA) it revokes nothing ...
            assert revoke(thief) is False
            check = auth_pb2.ValidateTokenRequest(
                token=token, audience="billing", client_cert_thumbprint=certificate_thumbprint(cert)
            )
            stub = auth_pb2_grpc.AuthServiceStub(holder)
            assert stub.ValidateToken(check, timeout=10).valid
            # ... while its holder, over its own mTLS connection, revokes it (RFC 7009).
            assert revoke(holder) is True
            assert stub.ValidateToken(check, timeout=10).reason == auth_pb2.REVOKED

    def test_a_dns_san_logs_in(self, mtls: MtlsFleet) -> None:
        with mtls.channel(mtls.workload_ca, dns=("search.prod.svc.cluster.local",)) as channel:
            assert mtls.issue(channel, "search").access_token

    def test_another_san_or_two_uri_sans_are_refused(self, mtls: MtlsFleet) -> None:
        cases: list[dict[str, tuple[str, ...]]] = [
            {"uris": ("spiffe://example.org/ns/prod/sa/billing",)},
            {"uris": (SPIFFE_ORDERS, "spiffe://example.org/ns/prod/sa/billing")},
            {"dns": ("orders.prod.svc",)},
            {},
        ]
        for case in cases:
            with mtls.channel(mtls.workload_ca, **case) as channel:
                assert _refused(lambda channel=channel: mtls.issue(channel)) == GENERIC
        # The right certificate, for another service id.
        with mtls.channel(mtls.workload_ca, uris=(SPIFFE_ORDERS,)) as channel:
            assert _refused(lambda: mtls.issue(channel, "search")) == GENERIC

    def test_a_bound_token_is_exchanged_by_its_audience_and_rebound_to_the_actor(
        self, mtls: MtlsFleet
    ) -> None:
        # search calls orders with a token bound to search's certificate; orders (logging in
        # with its own certificate) exchanges it to call billing on search's behalf.
        dns = ("search.prod.svc.cluster.local",)
        with mtls.channel(mtls.workload_ca, dns=dns) as channel:
            subject = auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(service_id="search", audience="orders"), timeout=10
            )
        orders, cert = mtls.channel_and_cert(mtls.workload_ca, uris=(SPIFFE_ORDERS,))
        with orders:
            stub = auth_pb2_grpc.AuthServiceStub(orders)
            derived = stub.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(
                    subject_token=subject.access_token,
                    subject_token_type="urn:ietf:params:oauth:token-type:access_token",
                    audience="billing",
                    service_id="orders",
                ),
                timeout=10,
            )
            checked = stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(
                    token=derived.access_token,
                    audience="billing",
                    client_cert_thumbprint=certificate_thumbprint(cert),
                ),
                timeout=10,
            )
        assert checked.valid, auth_pb2.ValidationFailure.Name(checked.reason)
        assert (checked.claims.subject, list(checked.claims.actors)) == ("search", ["orders"])
        assert checked.claims.cert_thumbprint == certificate_thumbprint(cert)

    def test_the_right_san_from_another_ca_never_gets_through_tls(self, mtls: MtlsFleet) -> None:
        with mtls.channel(mtls.other_ca, uris=(SPIFFE_ORDERS,)) as channel:
            _refused(lambda: mtls.issue(channel), grpc.StatusCode.UNAVAILABLE)


# --- PostgreSQL: many replicas -------------------------------------------------------------------


class TestPostgresReplicas:
    def test_an_assertion_replayed_across_replicas_logs_in_once_and_federation_works(
        self,
        postgres_url: str,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        env = base_env(postgres_url)
        key, issuer_key = new_ec(), new_rsa()
        jwk = _write(tmp_path / "orders.jwk", json.dumps(jwk_of(key)))
        jwks = _write(tmp_path / "k8s.jwks", jwk_set(jwk_of(issuer_key, kid="k8s-1")))
        run_cli(env, "db", "upgrade")
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--jwk-file", str(jwk),
            "--no-secret",
        )  # fmt: skip
        run_cli(
            env, "trust", "add", "cluster", "--issuer", K8S_ISSUER, "--audience", "authsvc",
            "--jwks-file", str(jwks),
        )  # fmt: skip
        run_cli(
            env, "services", "create", "reports", "--audience", "billing", "--no-secret",
            "--federated-subject", f"cluster={SUBJECT}",
        )  # fmt: skip
        a = start_server(env)
        try:
            b = start_server(env)
            try:
                fleets = [Fleet(r, tmp_path, key, key, issuer_key, issuer_key) for r in (a, b)]
                for _ in range(5):
                    assertion = fleets[0].assertion()
                    outcomes: list[grpc.StatusCode] = []

                    def attempt(fleet: Fleet, assertion: str = assertion) -> None:
                        try:
                            fleet.issue(assertion)
                            outcomes.append(grpc.StatusCode.OK)
                        except grpc.RpcError as exc:
                            outcomes.append(exc.code())

                    threads = [threading.Thread(target=attempt, args=(f,)) for f in fleets]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(timeout=30)
                    assert sorted(outcomes, key=str) == sorted(
                        [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED], key=str
                    )
                # A federated token exchanges on either replica (both read the stored trust).
                token = fleets[0].k8s_token()
                for fleet in fleets:
                    reply = fleet.exchange(token)
                    checked = _validate(fleet.server, reply.access_token, "billing")
                    assert checked.claims.subject == "reports"
            finally:
                b.stop()
        finally:
            a.stop()

    def test_an_assertion_naming_an_impossible_service_is_unauthenticated(
        self,
        postgres_url: str,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        """The request names no service, so the unverified `sub` says whose keys to try: one
        no service id could be (600 characters, longer than a throttle key's column) is an
        unknown id, UNAUTHENTICATED and counted, and the logins batched beside it still
        succeed (it once failed the batch's transaction on PostgreSQL: INTERNAL for all)."""
        env = base_env(postgres_url)
        key = new_ec()
        jwk = _write(tmp_path / "orders.jwk", json.dumps(jwk_of(key)))
        run_cli(env, "db", "upgrade")
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--jwk-file", str(jwk),
            "--no-secret",
        )  # fmt: skip
        server = start_server(env)
        try:
            fleet = Fleet(server, tmp_path, key, key, key, key)
            _assert_impossible_subjects_are_unknown_ids(fleet)
        finally:
            server.stop()

    def test_a_certificate_login_works_on_postgresql(
        self,
        postgres_url: str,  # noqa: F811
        tmp_path: Path,
    ) -> None:
        server_ca = CertificateAuthority(tmp_path, "server")
        served = server_ca.issue("server", server=True)
        workload_ca = WorkloadCa.create("pg")
        bundle = _write(tmp_path / "workload-ca.pem", workload_ca.cert_pem)
        env = base_env(
            postgres_url,
            AUTHSVC_TLS_CERT=str(served.cert_path),
            AUTHSVC_TLS_KEY=str(served.key_path),
            AUTHSVC_TLS_CLIENT_CA=str(bundle),
        )
        run_cli(env, "db", "upgrade")
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--tls-san",
            SPIFFE_ORDERS, "--no-secret",
        )  # fmt: skip
        server = start_server(env)
        try:
            fleet = MtlsFleet(server, server_ca, workload_ca, workload_ca)
            with fleet.channel(workload_ca, uris=(SPIFFE_ORDERS,)) as channel:
                assert fleet.issue(channel).access_token
        finally:
            server.stop()
