"""`authsvc health`, the container HEALTHCHECK: exit 0 only when the server says SERVING."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ops.conftest import OpsServer
from tests.support.server import base_env, run_cli, start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestHealthCommand:
    def test_serving_server_exits_0(self, ops: OpsServer) -> None:
        proc = run_cli(ops.server.env, "health", "--target", ops.server.address)
        assert proc.returncode == 0
        assert proc.stdout.strip() == "SERVING"

    def test_wildcard_listen_address_is_asked_on_loopback(self, ops: OpsServer) -> None:
        port = ops.server.address.rpartition(":")[2]
        env = {**ops.server.env, "AUTHSVC_LISTEN": f"0.0.0.0:{port}"}
        assert run_cli(env, "health").returncode == 0

    def test_nothing_listening_exits_non_zero(self, ops: OpsServer) -> None:
        target = f"127.0.0.1:{free_port()}"
        proc = run_cli(ops.server.env, "health", "--target", target, "--timeout", "1", check=False)
        assert proc.returncode != 0
        assert "SERVING" not in proc.stdout


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_tls(folder: Path, server_name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `server_name`: (ca, cert, key) files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ops test CA"))
        .issuer_name(_name("ops test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


class TestHealthCommandOverTls:
    def test_tls_server_is_healthy_only_through_its_ca(self, tmp_path: Path) -> None:
        ca, cert, key = write_tls(tmp_path, "authsvc.ops.test")
        env = base_env(
            f"sqlite:///{tmp_path / 'authsvc.db'}",
            AUTHSVC_TLS_CERT=str(cert),
            AUTHSVC_TLS_KEY=str(key),
        )
        server = start_server(env)
        try:
            plain = run_cli(
                env, "health", "--target", server.address, "--timeout", "2", check=False
            )
            assert plain.returncode != 0
            health_env = {
                **env,
                "AUTHSVC_HEALTH_TLS_CA": str(ca),
                "AUTHSVC_HEALTH_TLS_SERVER_NAME": "authsvc.ops.test",
            }
            tls = run_cli(health_env, "health", "--target", server.address)
            assert tls.stdout.strip() == "SERVING"
        finally:
            server.stop()
