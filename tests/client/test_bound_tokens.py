"""Certificate-bound tokens (RFC 8705 section 3) behind the client package's server interceptors.

A real authsvc process publishes the keys and answers ValidateToken; a demo billing service
(grpc.server and grpc.aio.server, local and remote validation) listens on an mTLS port that
requires a client certificate from a throwaway workload CA, and on a TLS port that asks for
none. Bound tokens are signed by authsvc's own active key through the real TokenIssuer, with
`cnf.x5t#S256` of client certificate A: the binding the server's IssueToken gives a token it
issues on a certificate-authenticated call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authsvc.tokens.issuer import TokenIssuer
from authsvc.workload.certificates import certificate_thumbprint as server_thumbprint
from authsvc_client.aio import AsyncAuthServerInterceptor, AsyncRemoteValidator
from authsvc_client.binding import (
    MAX_CERTIFICATE_PEM_BYTES,
    certificate_thumbprint,
    peer_certificate_pem,
)
from authsvc_client.claims import Claims, ValidationResult
from authsvc_client.interceptors import AuthServerInterceptor, current_claims
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import LocalValidator, RemoteCore, RemoteValidator
from authsvc_client.verifier import TokenVerifier
from tests.integration.conftest import World, make_world
from tests.security.forge import own_keys
from tests.support.certs import CertificateAuthority, Issued
from tests.support.server import TEST_ISSUER, RunningServer, base_env, run_cli, start_server
from tests.support.workload import WorkloadCa

AUDIENCE = "billing"
CHARGE = "/demo.Billing/Charge"
SCOPES = {CHARGE: ["billing.write"]}
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MISMATCH = "invalid token: CERTIFICATE_MISMATCH"


@dataclass(frozen=True)
class Pki:
    server: Issued  # the billing service's TLS certificate (its own CA, `server_ca`)
    server_ca: bytes
    workload_ca: WorkloadCa
    a: tuple[bytes, bytes]  # client certificate A and its key (PEM)
    b: tuple[bytes, bytes]  # client certificate B, same CA, same SAN


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder: Path = tmp_path_factory.mktemp("bound-pki")
    server_ca = CertificateAuthority(folder, "billing")
    workload = WorkloadCa.create("example.org")
    orders = ("spiffe://example.org/ns/prod/sa/orders",)
    return Pki(
        server=server_ca.issue("billing", server=True),
        server_ca=server_ca.cert_pem,
        workload_ca=workload,
        a=workload.issue_pair(uris=orders),
        b=workload.issue_pair(uris=orders),
    )


@pytest.fixture(scope="module")
def authsvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    folder = tmp_path_factory.mktemp("bound-authsvc")
    world, server = make_world(folder)
    try:
        yield world, f"sqlite:///{folder / 'authsvc.db'}"
    finally:
        server.stop()


@dataclass(frozen=True)
class Tokens:
    bound_to_a: str
    unbound: str
    thumbprint_a: str
    thumbprint_b: str


@pytest.fixture(scope="module")
def tokens(authsvc: tuple[World, str], pki: Pki) -> Tokens:
    _world, database_url = authsvc
    key = next(k for k in own_keys(database_url) if k.state == "active")
    issuer = TokenIssuer(TEST_ISSUER)

    def issue(thumbprint: str) -> str:
        return issuer.issue(
            private_key=key.private,
            kid=key.kid,
            subject="orders",
            audience=AUDIENCE,
            scopes=["billing.write"],
            ttl_seconds=600,
            now=time.time(),
            cert_thumbprint=thumbprint,
        ).token

    thumbprint_a = certificate_thumbprint(pki.a[0])
    return Tokens(
        bound_to_a=issue(thumbprint_a),
        unbound=issue(""),
        thumbprint_a=thumbprint_a,
        thumbprint_b=certificate_thumbprint(pki.b[0]),
    )


def _charge(_request: bytes, _context: Any) -> bytes:
    claims = current_claims()
    assert claims is not None
    return json.dumps({"sub": claims.subject, "cnf": claims.cert_thumbprint}).encode()


async def _charge_async(request: bytes, context: Any) -> bytes:
    return _charge(request, context)


def _credentials(pki: Pki) -> tuple[grpc.ServerCredentials, grpc.ServerCredentials]:
    pair = [(pki.server.key_pem, pki.server.cert_pem)]
    mtls = grpc.ssl_server_credentials(
        pair, root_certificates=pki.workload_ca.cert_pem, require_client_auth=True
    )
    # grpcio's require_client_auth=False never asks for a certificate: a TLS port for
    # callers without one.
    return mtls, grpc.ssl_server_credentials(pair)


@dataclass
class Ports:
    mtls: int = 0  # requires a client certificate from the workload CA
    tls: int = 0  # asks for none
    plain: int = 0  # no TLS at all


def _serve_sync(interceptor: grpc.ServerInterceptor, pki: Pki) -> tuple[grpc.Server, Ports]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Billing", {"Charge": grpc.unary_unary_rpc_method_handler(_charge)}
            ),
        )
    )
    mtls, tls = _credentials(pki)
    ports = Ports(
        server.add_secure_port("127.0.0.1:0", mtls),
        server.add_secure_port("127.0.0.1:0", tls),
        server.add_insecure_port("127.0.0.1:0"),
    )
    server.start()
    return server, ports


class Billing:
    """The demo service on two ports (mTLS, TLS without client certificates), sync or aio."""

    def __init__(
        self,
        kind: str,
        pki: Pki,
        authsvc_address: str,
        follower: Callable[[], str],
        *,
        tls_terminated_upstream: bool = False,
    ) -> None:
        self.kind = kind
        self._upstream = tls_terminated_upstream
        self._pki = pki
        self.ports = Ports()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cleanup: list[Callable[[], None]] = []
        if kind.startswith("sync"):
            self._start_sync(kind, authsvc_address, follower)
        else:
            self._start_aio(kind, authsvc_address, follower)

    def _local(self, authsvc_address: str, follower: Callable[[], str]) -> LocalValidator:
        channel = grpc.insecure_channel(authsvc_address)
        validator = LocalValidator(channel, AUDIENCE, TEST_ISSUER, token_source=follower)
        assert validator.wait_ready(15)
        self._cleanup += [validator.close, channel.close]
        return validator

    def _start_sync(self, kind: str, authsvc_address: str, follower: Callable[[], str]) -> None:
        validator: Any
        if kind == "sync-local":
            validator = self._local(authsvc_address, follower)
        else:
            channel = grpc.insecure_channel(authsvc_address)
            # "sync-remote" checks over ValidateTokenStream, "sync-remote-unary" with unary calls.
            validator = RemoteValidator(channel, AUDIENCE, streaming=kind == "sync-remote")
            self._cleanup += [validator.close, channel.close]
        interceptor = AuthServerInterceptor(
            validator, SCOPES, tls_terminated_upstream=self._upstream
        )
        server, self.ports = _serve_sync(interceptor, self._pki)
        self._cleanup.insert(0, lambda: server.stop(None).wait(10))

    def _start_aio(self, kind: str, authsvc_address: str, follower: Callable[[], str]) -> None:
        mtls, tls = _credentials(self._pki)
        loop = self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        local = self._local(authsvc_address, follower) if "local" in kind else None
        # grpc.aio runs a plain function handler on an executor thread with its sync context.
        behavior = _charge if kind.endswith("sync-handler") else _charge_async

        async def start() -> grpc.aio.Server:
            validator: Any = local
            if validator is None:
                channel = grpc.aio.insecure_channel(authsvc_address)
                validator = AsyncRemoteValidator(channel, AUDIENCE)
            interceptor = AsyncAuthServerInterceptor(
                validator, SCOPES, tls_terminated_upstream=self._upstream
            )
            server = grpc.aio.server(
                interceptors=[interceptor],
                migration_thread_pool=futures.ThreadPoolExecutor(max_workers=2),
            )
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "demo.Billing",
                        {"Charge": grpc.unary_unary_rpc_method_handler(behavior)},
                    ),
                )
            )
            self.ports = Ports(
                server.add_secure_port("127.0.0.1:0", mtls),
                server.add_secure_port("127.0.0.1:0", tls),
                server.add_insecure_port("127.0.0.1:0"),
            )
            await server.start()
            return server

        server = asyncio.run_coroutine_threadsafe(start(), loop).result(15)

        def stop() -> None:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

        self._cleanup.insert(0, stop)

    def close(self) -> None:
        for step in self._cleanup:
            step()


KINDS = (
    "sync-local",
    "sync-remote",
    "sync-remote-unary",
    "aio-local",
    "aio-remote",
    "aio-local-sync-handler",
)


@pytest.fixture(scope="module", params=KINDS)
def billing(
    request: pytest.FixtureRequest, pki: Pki, authsvc: tuple[World, str]
) -> Iterator[Billing]:
    world, _ = authsvc
    service = Billing(request.param, pki, world.server.address, world.follower_token)
    try:
        yield service
    finally:
        service.close()


def call(service: Billing | Ports, pki: Pki, token: str, cert: tuple[bytes, bytes] | None) -> Any:
    """Charge over mTLS presenting `cert`, or over the TLS port without any certificate."""
    ports = service.ports if isinstance(service, Billing) else service
    if cert is None:
        creds = grpc.ssl_channel_credentials(pki.server_ca)
        port = ports.tls
    else:
        creds = grpc.ssl_channel_credentials(
            pki.server_ca, private_key=cert[1], certificate_chain=cert[0]
        )
        port = ports.mtls
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        answer: bytes = channel.unary_unary(CHARGE)(
            b"", metadata=(("authorization", f"Bearer {token}"),), timeout=15
        )
    return json.loads(answer)


def refusal(
    service: Billing | Ports, pki: Pki, token: str, cert: tuple[bytes, bytes] | None
) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(service, pki, token, cert)
    assert caught.value.code() == UNAUTHENTICATED
    return str(caught.value.details())


class TestBoundTokens:
    def test_accepted_from_the_certificate_it_is_bound_to(
        self, billing: Billing, pki: Pki, tokens: Tokens
    ) -> None:
        caller = call(billing, pki, tokens.bound_to_a, pki.a)
        assert caller == {"sub": "orders", "cnf": tokens.thumbprint_a}

    def test_refused_from_another_certificate_of_the_same_ca_and_san(
        self, billing: Billing, pki: Pki, tokens: Tokens
    ) -> None:
        assert tokens.thumbprint_a != tokens.thumbprint_b
        assert refusal(billing, pki, tokens.bound_to_a, pki.b) == MISMATCH

    def test_refused_over_a_connection_without_a_certificate(
        self, billing: Billing, pki: Pki, tokens: Tokens
    ) -> None:
        assert refusal(billing, pki, tokens.bound_to_a, None) == MISMATCH

    def test_refused_over_plaintext(self, billing: Billing, tokens: Tokens) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{billing.ports.plain}") as channel:
            charge = channel.unary_unary(CHARGE)

            def with_token(token: str) -> bytes:
                return charge(  # type: ignore[no-any-return]
                    b"", metadata=(("authorization", f"Bearer {token}"),), timeout=15
                )

            with pytest.raises(grpc.RpcError) as caught:
                with_token(tokens.bound_to_a)
            assert (caught.value.code(), caught.value.details()) == (UNAUTHENTICATED, MISMATCH)
            # An unbound token still works there: plaintext is the operator's choice.
            unbound = with_token(tokens.unbound)
            assert json.loads(unbound) == {"sub": "orders", "cnf": ""}

    def test_unbound_tokens_are_unaffected(
        self, billing: Billing, pki: Pki, tokens: Tokens
    ) -> None:
        for cert in (pki.a, pki.b, None):
            assert call(billing, pki, tokens.unbound, cert) == {"sub": "orders", "cnf": ""}

    def test_a_refusal_is_not_cached_into_an_acceptance_or_the_reverse(
        self, billing: Billing, pki: Pki, tokens: Tokens
    ) -> None:
        """Verifier cache (local) and positive cache (remote) hold the token's verdict, never
        the binding: the order of callers cannot change any answer."""
        for _ in range(2):
            assert call(billing, pki, tokens.bound_to_a, pki.a)["cnf"] == tokens.thumbprint_a
            assert refusal(billing, pki, tokens.bound_to_a, pki.b) == MISMATCH
            assert refusal(billing, pki, tokens.bound_to_a, None) == MISMATCH


class TestRemoteValidateToken:
    """The RPC itself: `client_cert_thumbprint` decides for bound tokens only."""

    def test_a_bound_token_with_its_thumbprint_is_valid(
        self, authsvc: tuple[World, str], tokens: Tokens
    ) -> None:
        world, _ = authsvc
        response = world.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(
                token=tokens.bound_to_a,
                audience=AUDIENCE,
                client_cert_thumbprint=tokens.thumbprint_a,
            ),
            timeout=10,
        )
        assert response.valid and response.claims.cert_thumbprint == tokens.thumbprint_a

    def test_without_or_with_another_thumbprint_it_is_certificate_mismatch(
        self, authsvc: tuple[World, str], tokens: Tokens
    ) -> None:
        world, _ = authsvc
        for thumbprint in ("", tokens.thumbprint_b):
            response = world.server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(
                    token=tokens.bound_to_a, audience=AUDIENCE, client_cert_thumbprint=thumbprint
                ),
                timeout=10,
            )
            assert not response.valid and response.reason == auth_pb2.CERTIFICATE_MISMATCH

    def test_the_stream_carries_the_thumbprint_too(
        self, authsvc: tuple[World, str], tokens: Tokens
    ) -> None:
        world, _ = authsvc
        stub = auth_pb2_grpc.AuthServiceStub(world.server.channel)
        requests = [
            auth_pb2.ValidateTokenRequest(
                token=tokens.unbound, audience=AUDIENCE, client_cert_thumbprint=tokens.thumbprint_b
            ),
            auth_pb2.ValidateTokenRequest(
                token=tokens.bound_to_a,
                audience=AUDIENCE,
                client_cert_thumbprint=tokens.thumbprint_b,
            ),
        ]
        answers = list(stub.ValidateTokenStream(iter(requests), timeout=10))
        assert [a.valid for a in answers] == [True, False]
        assert answers[1].reason == auth_pb2.CERTIFICATE_MISMATCH


class TestTlsTerminatedUpstream:
    """RFC 8705 section 6.5: where the certificate cannot reach the service, say so at start
    and refuse bound tokens rather than take them as bearer tokens."""

    @pytest.mark.parametrize("interceptor", [AuthServerInterceptor, AsyncAuthServerInterceptor])
    def test_the_interceptor_warns_once_at_construction(
        self, interceptor: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        channel = grpc.insecure_channel("127.0.0.1:1")  # never dialled: nothing is validated
        validator = RemoteValidator(channel, AUDIENCE, streaming=False)
        with caplog.at_level(logging.WARNING, logger="authsvc_client.interceptors"):
            interceptor(validator, SCOPES, tls_terminated_upstream=True)
            interceptor(validator, SCOPES)
        validator.close()
        channel.close()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert "certificate-bound tokens" in message and "REFUSED" in message

    @pytest.mark.parametrize("kind", ["sync-local", "aio-local"])
    def test_bound_tokens_are_refused_even_with_the_right_certificate(
        self, kind: str, pki: Pki, tokens: Tokens, authsvc: tuple[World, str]
    ) -> None:
        """Behind a TLS-terminating proxy the peer certificate is the proxy's own; it is not
        read at all, so even a call that did present certificate A is refused."""
        world, _ = authsvc
        service = Billing(
            kind, pki, world.server.address, world.follower_token, tls_terminated_upstream=True
        )
        try:
            assert refusal(service, pki, tokens.bound_to_a, pki.a) == MISMATCH
            assert call(service, pki, tokens.unbound, pki.a) == {"sub": "orders", "cnf": ""}
        finally:
            service.close()


class LegacyValidator:
    """A validator written before `client_cert_thumbprint` existed, and careless with it: a
    real TokenVerifier over authsvc's published keys that checks every token as if the
    caller had presented certificate A."""

    def __init__(self, jwks_json: str, thumbprint_a: str) -> None:
        ring = KeyRing.from_jwks_json(jwks_json)
        self._verifier = TokenVerifier(
            keys=lambda: ring, revocations=RevocationSet(), issuer=TEST_ISSUER
        )
        self._a = thumbprint_a

    def validate(self, token: str, *, required_scopes: Sequence[str] = ()) -> ValidationResult:
        return self._verifier.verify(
            token,
            audience=AUDIENCE,
            required_scopes=required_scopes,
            client_cert_thumbprint=self._a,
        )


class TestTheInterceptorEnforcesTheBindingItself:
    def test_claims_bound_to_another_certificate_never_reach_the_handler(
        self, pki: Pki, tokens: Tokens, authsvc: tuple[World, str]
    ) -> None:
        world, _ = authsvc
        jwks = world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        # A validator of the older protocol (no client_cert_thumbprint) is still accepted.
        validator: Any = LegacyValidator(jwks, tokens.thumbprint_a)
        server, service = _serve_sync(AuthServerInterceptor(validator, SCOPES), pki)
        try:
            assert call(service, pki, tokens.bound_to_a, pki.a)["cnf"] == tokens.thumbprint_a
            assert refusal(service, pki, tokens.bound_to_a, pki.b) == MISMATCH
            assert refusal(service, pki, tokens.bound_to_a, None) == MISMATCH
            assert call(service, pki, tokens.unbound, None)["cnf"] == ""
        finally:
            server.stop(None).wait(10)


ORDERS_ID = "spiffe://example.org/ns/prod/sa/orders"
BILLING_ID = "spiffe://example.org/ns/prod/sa/billing"


@dataclass
class MtlsAuthsvc:
    """A real authsvc with mTLS on (AUTHSVC_TLS_CLIENT_CA = the workload CA), where orders and
    billing are secretless services known by their SPIFFE IDs."""

    server: RunningServer
    ca: bytes  # authsvc's server CA
    billing: tuple[bytes, bytes]  # billing's own workload certificate and key

    def channel(self, cert: tuple[bytes, bytes]) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            self.ca, private_key=cert[1], certificate_chain=cert[0]
        )
        return self.server.open_channel(creds)

    def issue(self, cert: tuple[bytes, bytes], service_id: str, audience: str) -> str:
        with self.channel(cert) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(service_id=service_id, audience=audience), timeout=10
            )
        return str(reply.access_token)


@pytest.fixture(scope="module")
def mtls_authsvc(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[MtlsAuthsvc]:
    folder = tmp_path_factory.mktemp("bound-mtls-authsvc")
    server_ca = CertificateAuthority(folder, "authsvc")
    served = server_ca.issue("authsvc", server=True)
    bundle = folder / "workload-ca.pem"
    bundle.write_bytes(pki.workload_ca.cert_pem)
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_TLS_CERT=str(served.cert_path),
        AUTHSVC_TLS_KEY=str(served.key_path),
        AUTHSVC_TLS_CLIENT_CA=str(bundle),
    )
    run_cli(env, "db", "upgrade")
    run_cli(
        env, "services", "create", "orders", "--audience", AUDIENCE, "--scope", "billing.write",
        "--tls-san", ORDERS_ID, "--no-secret",
    )  # fmt: skip
    run_cli(
        env, "services", "create", AUDIENCE, "--audience", "orders", "--tls-san", BILLING_ID,
        "--no-secret",
    )  # fmt: skip
    server = start_server(env)
    try:
        yield MtlsAuthsvc(
            server, server_ca.cert_pem, pki.workload_ca.issue_pair(uris=(BILLING_ID,))
        )
    finally:
        server.stop()


class TestIssuedByAuthsvcOverMtls:
    """End to end: orders logs in to authsvc with certificate A alone (no secret), and the
    token authsvc issues works at billing only from certificate A."""

    def test_the_token_of_a_certificate_login_is_bound_and_checked_remotely(
        self, mtls_authsvc: MtlsAuthsvc, pki: Pki
    ) -> None:
        token = mtls_authsvc.issue(pki.a, "orders", AUDIENCE)
        channel = mtls_authsvc.channel(mtls_authsvc.billing)
        validator = RemoteValidator(channel, AUDIENCE)
        server, ports = _serve_sync(AuthServerInterceptor(validator, SCOPES), pki)
        try:
            caller = call(ports, pki, token, pki.a)
            assert caller == {"sub": "orders", "cnf": certificate_thumbprint(pki.a[0])}
            assert refusal(ports, pki, token, pki.b) == MISMATCH
            assert refusal(ports, pki, token, None) == MISMATCH
        finally:
            server.stop(None).wait(10)
            validator.close()
            channel.close()

    def test_a_local_validator_whose_follower_logs_in_by_certificate_gets_its_feed(
        self, mtls_authsvc: MtlsAuthsvc, pki: Pki
    ) -> None:
        channel = mtls_authsvc.channel(mtls_authsvc.billing)
        validator = LocalValidator(
            channel,
            AUDIENCE,
            TEST_ISSUER,
            token_source=lambda: mtls_authsvc.issue(mtls_authsvc.billing, AUDIENCE, "authsvc"),
        )
        try:
            assert validator.wait_ready(5)
            token = mtls_authsvc.issue(pki.a, "orders", AUDIENCE)
            server, ports = _serve_sync(AuthServerInterceptor(validator, SCOPES), pki)
            try:
                assert call(ports, pki, token, pki.a)["sub"] == "orders"
                assert refusal(ports, pki, token, pki.b) == MISMATCH
            finally:
                server.stop(None).wait(10)
        finally:
            validator.close()
            channel.close()


class TestTheInterceptorSaysWhyOnce:
    def test_a_bound_token_without_a_certificate_is_logged_once(
        self, pki: Pki, tokens: Tokens, authsvc: tuple[World, str], caplog: pytest.LogCaptureFixture
    ) -> None:
        world, _ = authsvc
        service = Billing("sync-local", pki, world.server.address, world.follower_token)
        try:
            with caplog.at_level(logging.WARNING, logger="authsvc_client.interceptors"):
                for _ in range(3):
                    assert refusal(service, pki, tokens.bound_to_a, None) == MISMATCH
                assert refusal(service, pki, tokens.bound_to_a, pki.b) == MISMATCH
        finally:
            service.close()
        said = [r.getMessage() for r in caplog.records if r.name == "authsvc_client.interceptors"]
        assert len(said) == 1 and "without a client certificate" in said[0]
        assert tokens.bound_to_a not in said[0]


class TestThumbprintRule:
    """authsvc_client.binding: RFC 8705 section 3.1, and the server computing the same."""

    def test_base64url_of_sha256_over_the_der(self, pki: Pki) -> None:
        der = x509.load_pem_x509_certificate(pki.a[0]).public_bytes(serialization.Encoding.DER)
        expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        assert certificate_thumbprint(pki.a[0]) == expected
        assert certificate_thumbprint(pki.a[0].decode("ascii")) == expected
        assert server_thumbprint(pki.a[0]) == expected

    @pytest.mark.parametrize(
        "pem", [b"", b"  \n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
    )
    def test_what_is_no_certificate_is_a_value_error(self, pem: bytes) -> None:
        with pytest.raises(ValueError):
            certificate_thumbprint(pem)

    def test_an_oversized_pem_is_refused_before_parsing(self, pki: Pki) -> None:
        with pytest.raises(ValueError, match="too large"):
            certificate_thumbprint(pki.a[0] + b"\n" * MAX_CERTIFICATE_PEM_BYTES)

    def test_the_auth_context_gives_one_leaf_or_nothing(self, pki: Pki) -> None:
        assert peer_certificate_pem({"x509_pem_cert": [pki.a[0]]}) == pki.a[0]
        contexts: list[dict[str, list[bytes]] | None] = [
            None,
            {},
            {"x509_pem_cert": []},
            {"x509_pem_cert": [pki.a[0], pki.b[0]]},  # gRPC gives one leaf, never a list of them
        ]
        for context in contexts:
            assert peer_certificate_pem(context) is None


class TestRemoteCacheKey:
    """Network-free: the remote validator's positive cache is keyed by the thumbprint too."""

    CLAIMS = Claims(
        issuer=TEST_ISSUER,
        subject="orders",
        audience=AUDIENCE,
        scopes=("billing.write",),
        issued_at=int(time.time()) - 10,
        not_before=int(time.time()) - 10,
        expires_at=int(time.time()) + 600,
        jti="j1",
        key_id="k1",
        client_id="orders",
        cert_thumbprint="A" * 43,
    )

    def core(self) -> RemoteCore:
        return RemoteCore(
            AUDIENCE,
            cache_ttl_seconds=60,
            cache_size=10,
            timeout_seconds=2,
            clock=time.time,
            revocations=None,
        )

    def test_the_request_carries_the_thumbprint(self) -> None:
        core = self.core()
        assert core.request("t", (), "A" * 43).client_cert_thumbprint == "A" * 43
        assert core.request("t", (), None).client_cert_thumbprint == ""

    def test_an_answer_cached_for_one_certificate_is_not_one_for_another(self) -> None:
        core = self.core()
        now = time.time()
        key, cached = core.lookup("t", (), now, True, "A" * 43)
        assert cached is None and key is not None
        response = ValidationResult.ok(self.CLAIMS).to_proto()
        assert core.answer(key, response, (), now, "A" * 43, token="t").valid
        assert core.lookup("t", (), now, True, "A" * 43)[1] is not None
        for other in (None, "B" * 43):
            assert core.lookup("t", (), now, True, other)[1] is None

    def test_a_valid_answer_bound_elsewhere_is_refused_here(self) -> None:
        """Fail closed against a server that ignored the thumbprint: its valid answer for a
        token bound to A is CERTIFICATE_MISMATCH for a caller presenting B or nothing."""
        core = self.core()
        now = time.time()
        response = ValidationResult.ok(self.CLAIMS).to_proto()
        for other in (None, "B" * 43):
            key, _ = core.lookup("t", (), now, True, other)
            result = core.answer(key, response, (), now, other, token="t")
            assert result.reason == auth_pb2.CERTIFICATE_MISMATCH
            assert core.lookup("t", (), now, True, other)[1] is None
