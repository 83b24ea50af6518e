"""The gRPC port's TLS files, read and checked once when the server starts."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from authsvc.errors import ConfigError

__all__ = ["read_tls_files"]


def read_tls_files(
    key_path: str, cert_path: str, client_ca_path: str | None
) -> tuple[bytes, bytes, bytes | None]:
    """Read and check the TLS files at start, so a bad file fails here, naming the variable.

    gRPC would otherwise accept them and fail every handshake later (or report a bind error).
    """

    def read(path: str, name: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError:
            raise ConfigError(f"cannot read {name}") from None

    key_pem = read(key_path, "AUTHSVC_TLS_KEY")
    cert_pem = read(cert_path, "AUTHSVC_TLS_CERT")
    ca_pem = read(client_ca_path, "AUTHSVC_TLS_CLIENT_CA") if client_ca_path else None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("AUTHSVC_TLS_KEY is not an unencrypted PEM private key") from None
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError("AUTHSVC_TLS_CERT is not a PEM certificate chain") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ConfigError("AUTHSVC_TLS_KEY does not match the certificate in AUTHSVC_TLS_CERT")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ConfigError("AUTHSVC_TLS_CLIENT_CA is not a PEM certificate bundle") from None
    return key_pem, cert_pem, ca_pem
