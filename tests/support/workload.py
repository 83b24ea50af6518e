"""Workload-identity test parts: real keys, JWTs built by hand, a throwaway CA issuing SPIFFE
certificates, and a real local HTTP(S) server publishing JWK Sets (normal, hanging, huge…)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authsvc_client.assertions import PrivateKey, public_jwk

_DAY = dt.timedelta(days=1)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(part: dict[str, Any]) -> str:
    return b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def jwk_of(key: PrivateKey, **extra: str) -> dict[str, str]:
    """The public JWK of a key, with extra members (kid, alg, use…)."""
    return {**public_jwk(key.public_key()), **extra}


def sign(claims: dict[str, Any], key: PrivateKey, alg: str, **header: Any) -> str:
    """A JWS signed by PyJWT with exactly the header members given (typ only if given)."""
    return jwt.encode(claims, key, algorithm=alg, headers={"typ": None, **header})


def unsigned(claims: dict[str, Any], **header: Any) -> str:
    """An `alg: none` token (RFC 7519 section 6): header.payload. and an empty signature."""
    return f"{segment({'alg': 'none', **header})}.{segment(claims)}."


def hmac_forged(claims: dict[str, Any], secret: bytes, **header: Any) -> str:
    """HS256 keyed with `secret` (the classic confusion: the verifier's PUBLIC key as the HMAC
    key), built by hand: PyJWT itself refuses to sign so."""
    signing_input = f"{segment({'alg': 'HS256', **header})}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def raw_signed(claims: Any, key: PrivateKey, **header: Any) -> str:
    """A JWS over ANY JSON payload (PyJWT refuses claims of the wrong type), RS256 for an RSA
    key, ES256 for a P-256 key, with the header members given."""
    if isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    else:
        alg = "ES256"
    payload = json.dumps(claims, allow_nan=True, separators=(",", ":")).encode("utf-8")
    signing_input = f"{segment({'alg': alg, **header})}.{b64url(payload)}".encode("ascii")
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        raise TypeError("RSA or EC P-256 only")
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def new_rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_ec(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def new_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# --- a throwaway CA issuing workload certificates ---------------------------------------------


@dataclass(frozen=True)
class WorkloadCa:
    name: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> WorkloadCa:
        key = new_ec()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} workload CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(
        self,
        *,
        uris: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        common_name: str = "workload",
    ) -> bytes:
        """A client certificate (PEM) with exactly these URI and DNS SANs (none: no SAN)."""
        return self.issue_pair(uris=uris, dns=dns, common_name=common_name)[0]

    def issue_pair(
        self,
        *,
        uris: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        common_name: str = "workload",
    ) -> tuple[bytes, bytes]:
        """The certificate and its private key, both PEM."""
        now = dt.datetime.now(dt.UTC)
        key = new_ec()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), private_pem(key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


# --- a real JWKS endpoint -----------------------------------------------------------------------


@dataclass
class Route:
    """What one path answers: status, headers and body, or a behaviour."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    hang: bool = False  # accept the request, then never answer until the server stops
    send_length: bool = True
    drip: float = 0.0  # seconds between body bytes (a slow-drip endpoint), 0: all at once


class JwksServer:
    """A ThreadingHTTPServer on 127.0.0.1, over TLS when given a cert and key; routes can be
    changed while it runs. `hits[path]` counts requests."""

    def __init__(self, cert_file: Path | None = None, key_file: Path | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path
                outer.hits[path] = outer.hits.get(path, 0) + 1
                route = outer.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                if route.hang:
                    outer._stop.wait(60)
                    return
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    if route.drip:
                        for i in range(len(route.body)):
                            if outer._stop.wait(route.drip):
                                return
                            self.wfile.write(route.body[i : i + 1])
                            self.wfile.flush()
                    else:
                        self.wfile.write(route.body)
                except OSError:
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if cert_file is not None and key_file is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def jwks_server(
    cert_file: Path | None = None, key_file: Path | None = None
) -> Iterator[JwksServer]:
    server = JwksServer(cert_file, key_file)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def jwk_set(*keys: dict[str, str]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode("utf-8")
