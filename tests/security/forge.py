"""Attack tooling: tokens built byte by byte, signed with attacker keys or authsvc's own keys."""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc.crypto.kek import KeyEncryptionKey, load_private_key
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import World
from tests.support.server import TEST_ISSUER, TEST_KEK

DROP = object()  # a member to leave out of a header or claim set
AUDIENCE = "billing"  # the validating service in every attack
SUBJECT = "orders"  # allowed to call billing with billing.read / billing.write


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def segment(part: dict[str, Any] | bytes | str) -> str:
    """A JSON object compactly encoded, or raw bytes/text exactly as given."""
    if isinstance(part, str):
        part = part.encode("utf-8")
    if isinstance(part, bytes):
        return b64url(part)
    return b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))


def _apply(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**base, **over}.items() if v is not DROP}


def header(kid: str, /, **over: Any) -> dict[str, Any]:
    return _apply({"alg": "RS256", "typ": "at+jwt", "kid": kid}, over)


def claims(now: int | None = None, /, **over: Any) -> dict[str, Any]:
    """A claim set authsvc would issue to orders for billing, with members replaced or dropped."""
    now = int(time.time()) if now is None else now
    base = {
        "iss": TEST_ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "exp": now + 600,
        "nbf": now,
        "iat": now,
        "jti": secrets.token_urlsafe(18),
        "scope": "billing.read billing.write",
        "client_id": SUBJECT,
    }
    return _apply(base, over)


def rs256(key: RSAPrivateKey, signing_input: str) -> str:
    return b64url(key.sign(signing_input.encode("ascii"), PKCS1v15(), SHA256()))


def sign(
    key: RSAPrivateKey, hdr: dict[str, Any] | bytes | str, body: dict[str, Any] | bytes | str
) -> str:
    """A compact JWS with a genuine RS256 signature by `key` over whatever header and body."""
    signing_input = f"{segment(hdr)}.{segment(body)}"
    return f"{signing_input}.{rs256(key, signing_input)}"


def attacker_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def reason_name(response: auth_pb2.ValidateTokenResponse) -> str:
    return str(auth_pb2.ValidationFailure.Name(response.reason))


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = exc.code()
    return code


@dataclass
class OwnKey:
    kid: str
    private: RSAPrivateKey
    state: str


def own_keys(database_url: str) -> list[OwnKey]:
    """authsvc's signing keys that still hold a private part, decrypted with the test KEK.

    Signing attack payloads with the real key isolates the one rule under test: the signature
    is genuine, so only that rule can refuse the token."""
    kek = KeyEncryptionKey.from_base64(TEST_KEK)
    engine = make_engine(database_url)
    try:
        records = Repository(engine).list_signing_keys()
    finally:
        engine.dispose()
    return [
        OwnKey(r.kid, load_private_key(kek.unwrap(r.private_key_enc, kid=r.kid)), r.state)
        for r in records
        if r.private_key_enc is not None
    ]


@dataclass(repr=False)
class Target:
    """A real authsvc process under attack, plus the test's view of its database."""

    world: World
    database_url: str

    def __repr__(self) -> str:  # World holds the test secrets; failures print reprs
        return f"Target({self.address})"

    @property
    def address(self) -> str:
        return self.world.server.address

    def own_keys(self) -> list[OwnKey]:
        return own_keys(self.database_url)

    def active_key(self) -> OwnKey:
        return next(k for k in self.own_keys() if k.state == "active")

    def forge(self, hdr: dict[str, Any] | bytes | str | None = None, /, **over: Any) -> str:
        """A token signed by the active key: genuine except for what the caller changed."""
        key = self.active_key()
        return sign(key.private, header(key.kid) if hdr is None else hdr, claims(**over))

    def genuine(self, scopes: list[str] | None = None, ttl: int = 0) -> str:
        w = self.world
        return w.server.issue(SUBJECT, w.orders_secret, AUDIENCE, scopes, ttl).access_token

    def validate(
        self, token: str, audience: str = AUDIENCE, scopes: list[str] | None = None
    ) -> auth_pb2.ValidateTokenResponse:
        response: auth_pb2.ValidateTokenResponse = self.world.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(
                token=token, audience=audience, required_scopes=scopes or []
            ),
            timeout=10,
        )
        return response

    def reason(self, token: str, audience: str = AUDIENCE, scopes: list[str] | None = None) -> str:
        response = self.validate(token, audience, scopes)
        if response.valid:
            return "VALID"
        return reason_name(response)

    def revoke(self, token: str) -> bool:
        response = self.world.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token, reason="security test"), timeout=10
        )
        return bool(response.revoked)

    def assert_healthy(self) -> None:
        """After an attack batch: still SERVING, and a freshly issued token still validates."""
        health = health_pb2_grpc.HealthStub(self.world.server.channel)
        for service in ("", "authsvc.v1.AuthService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert self.world.server.proc.poll() is None
        response = self.validate(self.genuine(), scopes=["billing.read"])
        assert response.valid, reason_name(response)
        assert response.claims.subject == SUBJECT
