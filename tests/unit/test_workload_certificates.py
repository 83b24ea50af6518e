"""authsvc.workload.certificates: SAN extraction, exact matching, x5t#S256, SPIFFE ID syntax."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from authsvc.errors import InvalidArgument
from authsvc.workload.certificates import (
    certificate_thumbprint,
    check_dns_san,
    check_spiffe_id,
    check_tls_san,
    match_certificate,
    peer_identity,
)
from authsvc.workload.errors import Reason, WorkloadAuthError
from tests.support.certs import CertificateAuthority
from tests.support.workload import WorkloadCa

ORDERS = "spiffe://example.org/ns/prod/sa/orders"


@pytest.fixture(scope="module")
def ca() -> WorkloadCa:
    return WorkloadCa.create("workload")


@pytest.fixture(scope="module")
def other_ca() -> WorkloadCa:
    return WorkloadCa.create("other")


def mismatch(cert: bytes, registered: list[str]) -> Reason:
    with pytest.raises(WorkloadAuthError) as caught:
        match_certificate(cert, registered)
    return caught.value.reason


class TestPeerIdentity:
    def test_sans_and_thumbprint(self, ca: WorkloadCa) -> None:
        pem = ca.issue(uris=(ORDERS,), dns=("orders.prod.svc",))
        peer = peer_identity(pem)
        assert peer.uris == (ORDERS,)
        assert peer.dns_names == ("orders.prod.svc",)
        der = x509.load_pem_x509_certificate(pem).public_bytes(
            __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.DER
        )
        expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        assert peer.thumbprint == expected == certificate_thumbprint(pem.decode())
        assert "=" not in expected and len(expected) == 43

    def test_unreadable(self) -> None:
        for pem, expected in ((b"", Reason.NO_CERTIFICATE), (b"junk", Reason.MALFORMED)):
            with pytest.raises(WorkloadAuthError) as caught:
                peer_identity(pem)
            assert caught.value.reason == expected


class TestMatch:
    def test_exact_spiffe_id(self, ca: WorkloadCa) -> None:
        pem = ca.issue(uris=(ORDERS,))
        match = match_certificate(pem, ["spiffe://example.org/ns/prod/sa/billing", ORDERS])
        assert match.identity == ORDERS
        assert match.thumbprint == certificate_thumbprint(pem)

    def test_uri_path_is_case_sensitive_and_never_a_prefix(self, ca: WorkloadCa) -> None:
        for uri in (
            "spiffe://example.org/ns/prod/sa/Orders",
            "spiffe://example.org/ns/prod/sa/orders/extra",
            "spiffe://example.org/ns/prod/sa/order",
            "spiffe://other.org/ns/prod/sa/orders",
        ):
            assert mismatch(ca.issue(uris=(uri,)), [ORDERS]) == Reason.IDENTITY_MISMATCH

    def test_two_uri_sans_are_no_svid(self, ca: WorkloadCa) -> None:
        pem = ca.issue(uris=(ORDERS, "spiffe://example.org/other"))
        assert mismatch(pem, [ORDERS]) == Reason.IDENTITY_MISMATCH

    def test_dns_case_insensitive_no_wildcard(self, ca: WorkloadCa) -> None:
        assert match_certificate(ca.issue(dns=("Orders.Prod.SVC",)), ["orders.prod.svc"])
        wildcard = ca.issue(dns=("*.prod.svc",))
        assert mismatch(wildcard, ["orders.prod.svc"]) == Reason.IDENTITY_MISMATCH
        # a DNS SAN never matches a registered URI and the other way round
        assert mismatch(ca.issue(dns=("example.org",)), [ORDERS]) == Reason.IDENTITY_MISMATCH
        assert mismatch(ca.issue(uris=(ORDERS,)), ["example.org"]) == Reason.IDENTITY_MISMATCH

    def test_only_sans_are_read(self, ca: WorkloadCa, other_ca: WorkloadCa) -> None:
        """The subject CN is not an identity; the issuer is not looked at (gRPC verified the
        chain): a cert with the right SAN from another CA matches HERE, which is why the
        servicer may only pass the auth context's verified `x509_pem_cert` (see TestOverGrpc)."""
        cn_only = ca.issue(common_name=ORDERS)
        assert mismatch(cn_only, [ORDERS]) == Reason.IDENTITY_MISMATCH
        cn_dns = ca.issue(common_name="orders.prod.svc", uris=("spiffe://example.org/x",))
        assert mismatch(cn_dns, ["orders.prod.svc"]) == Reason.IDENTITY_MISMATCH
        assert match_certificate(other_ca.issue(uris=(ORDERS,)), [ORDERS]).identity == ORDERS

    def test_nothing_registered(self, ca: WorkloadCa) -> None:
        assert mismatch(ca.issue(uris=(ORDERS,)), []) == Reason.IDENTITY_MISMATCH


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, ca: WorkloadCa) -> Iterator[tuple[int, bytes]]:
    folder: Path = tmp_path_factory.mktemp("mtls")
    server_ca = CertificateAuthority(folder, "server")
    server_cert = server_ca.issue("server", server=True)

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        pem = context.auth_context().get("x509_pem_cert", [b""])[0]
        try:
            return match_certificate(pem, [ORDERS]).identity.encode()
        except WorkloadAuthError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise

    def context_view(request: bytes, context: grpc.ServicerContext) -> bytes:
        """What gRPC itself says of the peer, beside what peer_identity reads from the PEM."""
        auth = context.auth_context()
        peer = peer_identity(auth["x509_pem_cert"][0])
        view = {
            "grpc_uris": [u.decode() for u in auth.get("peer_uri", [])],
            "grpc_dns": [d.decode() for d in auth.get("peer_dns", [])],
            "grpc_spiffe_id": [i.decode() for i in auth.get("peer_spiffe_id", [])],
            "uris": list(peer.uris),
            "dns": list(peer.dns_names),
        }
        return json.dumps(view).encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Who",
        {
            "Am": grpc.unary_unary_rpc_method_handler(whoami),
            "Context": grpc.unary_unary_rpc_method_handler(context_view),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(server_cert.key_pem, server_cert.cert_pem)],
        root_certificates=ca.cert_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, server_ca.cert_pem
    finally:
        server.stop(None)


class TestOverGrpc:
    """A real gRPC server with mTLS: the chain is verified by gRPC, the SAN by the matcher."""

    def call(
        self, served: tuple[int, bytes], cert: tuple[bytes, bytes], method: str = "Am"
    ) -> bytes:
        port, root = served
        creds = grpc.ssl_channel_credentials(root, private_key=cert[1], certificate_chain=cert[0])
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            result: bytes = channel.unary_unary(f"/test.Who/{method}")(b"", timeout=10)
            return result

    def test_the_pem_says_what_grpc_says(self, served: tuple[int, bytes], ca: WorkloadCa) -> None:
        """x509_pem_cert read by peer_identity gives gRPC's own peer_uri/peer_dns, and gRPC
        also names a SPIFFE ID only when there is exactly one URI SAN (our SVID rule)."""
        one = json.loads(
            self.call(served, ca.issue_pair(uris=(ORDERS,), dns=("o.svc",)), "Context")
        )
        assert one["uris"] == one["grpc_uris"] == one["grpc_spiffe_id"] == [ORDERS]
        assert one["dns"] == one["grpc_dns"] == ["o.svc"]
        two_uris = (ORDERS, "spiffe://example.org/other")
        two = json.loads(self.call(served, ca.issue_pair(uris=two_uris), "Context"))
        assert two["uris"] == two["grpc_uris"] == list(two_uris)
        assert two["grpc_spiffe_id"] == []

    def test_right_san_right_ca(self, served: tuple[int, bytes], ca: WorkloadCa) -> None:
        assert self.call(served, ca.issue_pair(uris=(ORDERS,))) == ORDERS.encode()

    def test_wrong_san_right_ca(self, served: tuple[int, bytes], ca: WorkloadCa) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(served, ca.issue_pair(uris=("spiffe://example.org/ns/prod/sa/billing",)))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def test_right_san_other_ca_never_reaches_the_matcher(
        self, served: tuple[int, bytes], other_ca: WorkloadCa
    ) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            self.call(served, other_ca.issue_pair(uris=(ORDERS,)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed


class TestRegistration:
    def test_valid_spiffe_ids(self) -> None:
        for value in (ORDERS, "spiffe://td/a", "spiffe://my-td.example_1/A.b-c_D/x"):
            assert check_spiffe_id(value) == value
            assert check_tls_san(value) == value

    @pytest.mark.parametrize(
        "value",
        [
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/./b",
            "spiffe://Example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a%20b",
            "SPIFFE://example.org/a",
            "https://example.org/a",
            "spiffe:example.org/a",
            "spiffe://example.org/" + "a" * 2048,
        ],
    )
    def test_invalid_spiffe_ids(self, value: str) -> None:
        with pytest.raises(InvalidArgument, match="SPIFFE ID"):
            check_tls_san(value)

    def test_dns_names(self) -> None:
        assert check_dns_san("Orders.Prod.SVC") == "orders.prod.svc"
        assert check_tls_san("xn--bcher-kva.example") == "xn--bcher-kva.example"
        for value in (
            "*.prod.svc",
            "a..b",
            "-a.b",
            "a-.b",
            "a.b.",
            "",
            "b\u00fccher.example",
            "10.0.0.1",
            "a b",
            "a" * 64 + ".b",
        ):
            with pytest.raises(InvalidArgument, match="DNS SAN"):
                check_dns_san(value)
