"""TLS and mTLS on the gRPC port, against real `authsvc serve` processes and a generated PKI.

Plaintext on a non-loopback address without AUTHSVC_TLS_TERMINATED_UPSTREAM is refused at start:
tests/integration/test_lifecycle.py (serve) and tests/unit/test_config.py (settings) cover it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.certs import Issued, Pki, make_pki
from tests.support.server import RunningServer, base_env, run_cli, start_server

AUDIENCE = "billing"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_env(folder: Path, pki: Pki, **extra: str) -> dict[str, str]:
    tls = {
        "AUTHSVC_TLS_CERT": str(pki.server.cert_path),
        "AUTHSVC_TLS_KEY": str(pki.server.key_path),
    }
    return base_env(f"sqlite:///{folder / 'authsvc.db'}", **{**tls, **extra})


def _trusting(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem,
        certificate_chain=client.cert_pem,
    )


class Served:
    """A TLS server with one registered service."""

    def __init__(self, server: RunningServer, secret: str) -> None:
        self.server, self.secret = server, secret

    def issue_with(self, credentials: grpc.ChannelCredentials | None) -> str:
        """IssueToken over a fresh channel with `credentials`; raises grpc.RpcError if refused."""
        with self.server.open_channel(credentials) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                auth_pb2.IssueTokenRequest(
                    service_id="orders", service_secret=self.secret, audience=AUDIENCE
                ),
                timeout=10,
            )
        return str(reply.access_token)

    def assert_refused(self, credentials: grpc.ChannelCredentials | None) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            self.issue_with(credentials)
        # The handshake fails: the call never reaches the servicer.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _serve(folder: Path, pki: Pki, credentials: grpc.ChannelCredentials, **extra: str) -> Served:
    env = _tls_env(folder, pki, **extra)
    run_cli(env, "db", "upgrade")
    created = run_cli(env, "services", "create", "orders", "--audience", AUDIENCE, "--json")
    secret = str(json.loads(created.stdout)["service_secret"])
    return Served(start_server(env, credentials=credentials), secret)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Served]:
    served = _serve(tmp_path_factory.mktemp("tls"), pki, _trusting(pki))
    try:
        yield served
    finally:
        served.server.stop()


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Served]:
    served = _serve(
        tmp_path_factory.mktemp("mtls"),
        pki,
        _trusting(pki, pki.client),
        AUTHSVC_TLS_CLIENT_CA=str(pki.ca.cert_path),
    )
    try:
        yield served
    finally:
        served.server.stop()


class TestTls:
    def test_server_announces_tls(self, tls: Served) -> None:
        assert any(
            line.startswith("authsvc listening on ") and "(TLS)" in line
            for line in tls.server.output
        )

    def test_a_call_over_tls_works_and_the_token_validates(self, tls: Served, pki: Pki) -> None:
        token = tls.issue_with(_trusting(pki))
        reply = tls.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience=AUDIENCE), timeout=10
        )
        assert reply.valid

    def test_the_certificate_names_localhost_too(self, tls: Served, pki: Pki) -> None:
        port = tls.server.address.rpartition(":")[2]
        with grpc.secure_channel(f"localhost:{port}", _trusting(pki)) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
                auth_pb2.GetJwksRequest(), timeout=10
            )
        assert "keys" in reply.jwks_json

    def test_a_plaintext_client_is_refused(self, tls: Served) -> None:
        tls.assert_refused(None)

    def test_a_client_that_does_not_trust_the_ca_refuses_the_server(
        self, tls: Served, pki: Pki
    ) -> None:
        tls.assert_refused(grpc.ssl_channel_credentials(root_certificates=pki.other_ca.cert_pem))

    def test_a_client_cert_is_not_required_without_a_client_ca(self, tls: Served, pki: Pki) -> None:
        # Offering one anyway is harmless: the server does not ask for it.
        assert tls.issue_with(_trusting(pki, pki.client_from_other_ca))

    def test_the_cli_token_commands_speak_tls_with_authsvc_tls_ca(
        self, tls: Served, pki: Pki
    ) -> None:
        env = {
            **tls.server.env,
            "AUTHSVC_TARGET": tls.server.address,
            "AUTHSVC_SERVICE_ID": "orders",
            "AUTHSVC_SERVICE_SECRET": tls.secret,
        }
        plain = run_cli(env, "token", "issue", "--audience", AUDIENCE, check=False)
        assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr
        trusting = {**env, "AUTHSVC_TLS_CA": str(pki.ca.cert_path)}
        token = run_cli(trusting, "token", "issue", "--audience", AUDIENCE).stdout.strip()
        checked = run_cli(trusting, "token", "validate", "--audience", AUDIENCE, input_text=token)
        assert json.loads(checked.stdout)["valid"] is True
        assert token not in plain.stderr + checked.stderr


class TestMutualTls:
    def test_a_client_cert_from_the_client_ca_works(self, mtls: Served, pki: Pki) -> None:
        assert mtls.issue_with(_trusting(pki, pki.client))

    def test_no_client_cert_is_refused(self, mtls: Served, pki: Pki) -> None:
        mtls.assert_refused(_trusting(pki))

    def test_a_client_cert_from_another_ca_is_refused(self, mtls: Served, pki: Pki) -> None:
        mtls.assert_refused(_trusting(pki, pki.client_from_other_ca))

    def test_an_expired_client_cert_is_refused(self, mtls: Served, pki: Pki) -> None:
        mtls.assert_refused(_trusting(pki, pki.client_expired))

    def test_a_not_yet_valid_client_cert_is_refused(self, mtls: Served, pki: Pki) -> None:
        mtls.assert_refused(_trusting(pki, pki.client_not_yet_valid))

    def test_a_plaintext_client_is_refused(self, mtls: Served) -> None:
        mtls.assert_refused(None)

    def test_the_server_keeps_serving_after_refusals(self, mtls: Served, pki: Pki) -> None:
        for client in (pki.client_expired, pki.client_from_other_ca):
            mtls.assert_refused(_trusting(pki, client))
        assert mtls.issue_with(_trusting(pki, pki.client))

    def test_the_cli_token_commands_use_the_client_pair_and_refuse_a_key_others_can_read(
        self, mtls: Served, pki: Pki, tmp_path: Path
    ) -> None:
        # `token validate` sends a bearer token, not a login, but reaches an mTLS server with
        # AUTHSVC_TLS_CLIENT_CERT/_KEY, read by the client package's rules: the key file
        # owner-only, as for every login. The token, issued over mTLS, is bound to the client
        # certificate, which a validation request does not present: the server's answer is
        # CERTIFICATE_MISMATCH, and an answer at all means the handshake passed.
        token = mtls.issue_with(_trusting(pki, pki.client))
        env = {
            **mtls.server.env,
            "AUTHSVC_TARGET": mtls.server.address,
            "AUTHSVC_TLS_CA": str(pki.ca.cert_path),
            "AUTHSVC_TLS_CLIENT_CERT": str(pki.client.cert_path),
            "AUTHSVC_TLS_CLIENT_KEY": str(pki.client.key_path),
        }

        def validate(with_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return run_cli(
                with_env, "token", "validate", "--audience", AUDIENCE, input_text=token, check=False
            )

        checked = validate(env)
        assert json.loads(checked.stdout) == {"valid": False, "reason": "CERTIFICATE_MISMATCH"}
        without_pair = {k: v for k, v in env.items() if not k.startswith("AUTHSVC_TLS_CLIENT_")}
        plain = validate(without_pair)
        assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr

        readable = tmp_path / "client.key"
        readable.write_bytes(pki.client.key_pem)
        readable.chmod(0o644)
        refused = validate({**env, "AUTHSVC_TLS_CLIENT_KEY": str(readable)})
        assert refused.returncode != 0
        assert "AUTHSVC_TLS_CLIENT_KEY" in refused.stderr
        assert "group or others" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert pki.client.key_pem.decode() not in refused.stderr + refused.stdout
        assert token not in refused.stderr + refused.stdout

        half = {k: v for k, v in env.items() if k != "AUTHSVC_TLS_CLIENT_KEY"}
        lone = validate(half)
        assert lone.returncode != 0
        assert "AUTHSVC_TLS_CLIENT_CERT and AUTHSVC_TLS_CLIENT_KEY go together" in lone.stderr


class TestTlsConfiguration:
    def test_a_key_that_does_not_match_the_certificate_stops_the_start(
        self, tmp_path: Path, pki: Pki
    ) -> None:
        env = _tls_env(tmp_path, pki, AUTHSVC_TLS_KEY=str(pki.client.key_path))
        proc = run_cli(env, "serve", "--listen", "127.0.0.1:0", check=False)
        assert proc.returncode != 0
        assert "AUTHSVC_TLS_KEY" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_an_unreadable_certificate_stops_the_start(self, tmp_path: Path, pki: Pki) -> None:
        env = _tls_env(tmp_path, pki, AUTHSVC_TLS_CERT=str(tmp_path / "missing.crt"))
        proc = run_cli(env, "serve", "--listen", "127.0.0.1:0", check=False)
        assert proc.returncode != 0
        assert "AUTHSVC_TLS_CERT" in proc.stderr
        assert "Traceback" not in proc.stderr
