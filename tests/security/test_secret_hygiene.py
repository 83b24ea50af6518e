"""Promise: no service secret, secret hash, KEK, private key or token signature appears in a log
line (even at DEBUG), an audit row, a gRPC error, an exception message or a repr."""

from __future__ import annotations

import base64
import datetime
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from authsvc.config import load_settings
from authsvc.crypto.kek import KekRing, KeyEncryptionKey
from authsvc.crypto.secrets import SECRET_PREFIX, SecretHasher
from authsvc.keys.wrapping import load_secret_hash_key
from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client import (
    AuthMetadataPlugin,
    BearerTokenInterceptor,
    LocalValidator,
    RemoteValidator,
    TokenSource,
    TokenUnavailable,
)
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN
from tests.security.forge import b64url, claims, header, own_keys, sign
from tests.support.server import (
    TEST_ISSUER,
    TEST_KEK,
    RunningServer,
    base_env,
    run_cli,
    start_server,
)

THROTTLE_AFTER = 3


@dataclass
class Evidence:
    """Everything the flow let escape (haystack) and everything that must not be in it."""

    secrets: dict[str, str] = field(default_factory=dict)  # label -> secret
    tokens: list[str] = field(default_factory=list)
    private_pems: dict[str, bytes] = field(default_factory=dict)  # kid -> PKCS#8 DER
    private_numbers: dict[str, Any] = field(default_factory=dict)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (source label, text)
    errors: list[grpc.RpcError] = field(default_factory=list)
    hash_key: bytes = field(default=b"", repr=False)  # the deployment's secret-hash key

    def __repr__(self) -> str:  # a failing test must not print what it protects
        return f"Evidence({len(self.secrets)} secrets, {len(self.texts)} texts)"

    def add(self, source: str, text: object) -> None:
        self.texts.append((source, str(text)))

    def failed(self, source: str, call: Callable[[], Any]) -> grpc.RpcError:
        try:
            call()
        except grpc.RpcError as exc:
            self.errors.append(exc)
            self.add(f"{source}: details", exc.details())
            self.add(f"{source}: debug_error_string", exc.debug_error_string())
            self.add(f"{source}: str", exc)
            self.add(f"{source}: repr", repr(exc))
            self.add(f"{source}: trailing metadata", exc.trailing_metadata())
            self.add(f"{source}: initial metadata", exc.initial_metadata())
            return exc
        raise AssertionError(f"{source}: the call was expected to fail")

    def grab_keys(self, database_url: str) -> None:
        engine = make_engine(database_url)
        try:
            ring = KekRing(KeyEncryptionKey.from_base64(TEST_KEK))
            now = datetime.datetime.now(datetime.UTC)
            self.hash_key = load_secret_hash_key(Repository(engine), ring, now)
        finally:
            engine.dispose()
        for key in own_keys(database_url):
            self.private_pems[key.kid] = key.private.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.private_numbers[key.kid] = key.private.private_numbers()


class _Capture(logging.Handler):
    def __init__(self, ev: Evidence) -> None:
        super().__init__(logging.DEBUG)
        self.ev = ev
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.ev.add("client log", self.format(record))


def _encodings(label: str, data: bytes) -> Iterator[tuple[str, str]]:
    yield f"{label} (hex)", data.hex()
    yield f"{label} (HEX)", data.hex().upper()
    yield f"{label} (base64)", base64.b64encode(data).decode()
    yield f"{label} (base64url)", b64url(data)
    yield f"{label} (bytes repr)", repr(data)[2:-1]


def needles(ev: Evidence) -> list[tuple[str, str]]:
    """(label, value) pairs; labels are what a failure prints, never the values."""
    hash_key = ev.hash_key
    assert len(hash_key) == 32
    hasher = SecretHasher(hash_key)
    out: list[tuple[str, str]] = [("KEK (as configured)", TEST_KEK)]
    out += _encodings("KEK", base64.b64decode(TEST_KEK))
    out += _encodings("secret-hash key", hash_key)
    for label, secret in ev.secrets.items():
        out.append((f"secret {label}", secret))
        out.append((f"secret {label} (random part)", secret.removeprefix(SECRET_PREFIX)))
        out += _encodings(f"hash of secret {label}", hasher.hash(secret))
    for kid, der in ev.private_pems.items():
        pem = base64.encodebytes(der).decode()
        out += [(f"private key {kid} (PEM line {i})", line) for i, line in enumerate(pem.split())]
        out.append((f"private key {kid} (DER base64)", base64.b64encode(der).decode()))
        numbers = ev.private_numbers[kid]
        for part in ("d", "p", "q", "dmp1", "dmq1", "iqmp"):
            value = getattr(numbers, part)
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            out.append((f"private key {kid} {part} (decimal)", str(value)))
            out += _encodings(f"private key {kid} {part}", raw)
    for i, token in enumerate(ev.tokens):
        out.append((f"signature of token {i}", token.rsplit(".", 1)[1]))
    return out


def run_flow(folder: Path) -> tuple[Evidence, RunningServer]:
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_LOG_LEVEL="DEBUG",
        AUTHSVC_THROTTLE_ID_FAILURES=str(THROTTLE_AFTER),
    )
    ev = Evidence()

    def cli(*args: str, stdout_is_secret: bool = False) -> str:
        proc = run_cli(env, *args)
        ev.add(f"cli {args[:2]} stderr", proc.stderr)
        if not stdout_is_secret:  # `services create` prints the new secret once, by design
            ev.add(f"cli {args[:2]} stdout", proc.stdout)
        return proc.stdout

    cli("db", "upgrade")
    # This process's own log records (client package, grpc) are searched too, at DEBUG.
    capture = _Capture(ev)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    server = start_server(env)
    try:
        _exercise(ev, server, cli, folder)
    finally:
        server.stop()
        root.removeHandler(capture)
        root.setLevel(old_level)
    ev.texts += [("server output", line) for line in server.output]
    return ev, server


def _exercise(ev: Evidence, server: RunningServer, cli: Callable[..., str], folder: Path) -> None:
    def create(name: str, *args: str) -> str:
        out = cli("services", "create", name, "--json", *args, stdout_is_secret=True)
        secret = str(json.loads(out)["service_secret"])
        ev.secrets[name] = secret
        return secret

    admin_secret = create(ADMIN, "--admin")
    orders = create("orders", "--audience", "billing", "--scope", "billing.read")
    create("billing", "--audience", "orders", "--scope", "orders.read")
    victim = create("victim", "--audience", "billing", "--scope", "billing.read")
    database_url = f"sqlite:///{folder / 'authsvc.db'}"
    ev.grab_keys(database_url)
    stub = server.stub

    def issue(sid: str, secret: str, aud: str = "billing") -> str:
        token = server.issue(sid, secret, aud).access_token
        ev.tokens.append(token)
        return token

    def admin_md() -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {issue(ADMIN, admin_secret, 'authsvc')}")]

    def validate(token: str, aud: str = "billing") -> auth_pb2.ValidateTokenResponse:
        response: auth_pb2.ValidateTokenResponse = stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience=aud), timeout=10
        )
        ev.add("ValidateToken response", response)
        return response

    # Issue, validate, and every kind of refused token.
    token = issue("orders", orders)
    assert validate(token).valid
    h, p, s = token.split(".")
    validate(f"{h}.{p}.{s[:-2]}AA")
    validate(token, "inventory")
    validate(sign(own_keys(database_url)[0].private, header("no-such-kid"), claims()))
    validate(f"{h}.{p}")
    ev.failed("validate oversized", lambda: validate(token * 20))

    # Failed logins: near-miss secret, unknown id, the fields swapped, then throttled.
    near_miss = orders[:-1] + ("A" if orders[-1] != "A" else "B")
    ev.secrets["near miss"] = near_miss
    ev.failed("issue near miss", lambda: issue("orders", near_miss))
    ev.failed("issue unknown id", lambda: issue("nobody", orders))
    ev.failed("issue swapped fields", lambda: issue(orders, "orders"))
    for i in range(THROTTLE_AFTER + 1):
        ev.failed(f"issue victim wrong {i}", lambda: issue("victim", near_miss))
    ev.failed("issue throttled", lambda: issue("victim", victim))
    ev.failed("issue audience denied", lambda: issue("orders", orders, "inventory"))
    ev.failed(
        "issue authsvc scope denied",
        lambda: ev.tokens.append(
            server.issue("orders", orders, "authsvc", ["authsvc.admin"]).access_token
        ),
    )

    # Client objects given a wrong secret fail without echoing it.
    with grpc.insecure_channel(server.address) as channel:
        source = TokenSource(
            channel,
            service_id="orders",
            service_secret=near_miss,
            audience="billing",
            backoff_initial_seconds=0.05,
        )
        try:
            source.token(timeout=10)
            raise AssertionError("a wrong secret produced a token")
        except TokenUnavailable as exc:
            ev.add("TokenSource error", exc)
            ev.add("TokenSource error repr", repr(exc))
        ev.add("TokenSource repr", repr(source))
        ev.add("AuthMetadataPlugin repr", repr(AuthMetadataPlugin(source)))
        ev.add("BearerTokenInterceptor repr", repr(BearerTokenInterceptor(source)))
        source.close()
        good = TokenSource(channel, service_id="orders", service_secret=orders, audience="billing")
        ev.tokens.append(good.token(timeout=10))
        ev.add("TokenSource repr (with token)", repr(good))
        ev.add("TokenSource str (with token)", str(good))
        good.close()
        remote = RemoteValidator(channel, "billing")
        remote.validate(token)
        ev.add("RemoteValidator repr", repr(remote))
        # The feed's follower token (scopeless, for authsvc) is in the evidence too.
        local = LocalValidator(
            channel, "billing", TEST_ISSUER, token_source=lambda: issue("orders", orders, "authsvc")
        )
        assert local.wait_ready(10)
        local.validate(token)
        ev.add("LocalValidator repr", repr(local))
        local.close()

    # Admin calls: refused callers, then the real thing.
    ev.failed(
        "admin with a service token",
        lambda: stub.ListServices(
            auth_pb2.ListServicesRequest(),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        ),
    )
    ev.failed(
        "admin with a forged token",
        lambda: stub.ListServices(
            auth_pb2.ListServicesRequest(),
            metadata=[("authorization", f"Bearer {h}.{p}.{s[::-1]}")],
            timeout=10,
        ),
    )
    ev.failed(
        "admin with a secret as bearer",
        lambda: stub.ListServices(
            auth_pb2.ListServicesRequest(),
            metadata=[("authorization", f"Bearer {orders}")],
            timeout=10,
        ),
    )
    created = stub.CreateService(
        auth_pb2.CreateServiceRequest(service_id="ledger", audiences=["billing"]),
        metadata=admin_md(),
        timeout=10,
    )
    ev.secrets["ledger"] = created.service_secret
    ev.add(
        "ListServices",
        stub.ListServices(auth_pb2.ListServicesRequest(), metadata=admin_md(), timeout=10),
    )

    # Revocations of every kind, and the feed that publishes them.
    revoked = issue("orders", orders)
    stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=revoked, reason="leaked"), timeout=10)
    validate(revoked)
    jti = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))["jti"]
    stub.RevokeToken(auth_pb2.RevokeTokenRequest(jti=jti), metadata=admin_md(), timeout=10)
    stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(service_id="billing"), metadata=admin_md(), timeout=10
    )
    ev.failed(
        "revoke by jti anonymously",
        lambda: stub.RevokeToken(auth_pb2.RevokeTokenRequest(jti=jti), timeout=10),
    )
    stream = stub.WatchRevocations(auth_pb2.WatchRevocationsRequest(), timeout=2)
    try:
        for event in stream:
            ev.add("revocation event", event)
    except grpc.RpcError:
        pass  # the deadline ends the stream

    # Secret rotation: self with grace, wrong current secret, admin with no grace.
    rotated = stub.RotateServiceSecret(
        auth_pb2.RotateServiceSecretRequest(
            service_id="orders", current_secret=orders, grace_period_seconds=60
        ),
        timeout=10,
    )
    ev.secrets["orders rotated"] = rotated.service_secret
    ev.failed(
        "rotate swapped fields",
        lambda: stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id=orders, current_secret="orders"),
            timeout=10,
        ),
    )
    ev.failed(
        "rotate with a wrong secret",
        lambda: stub.RotateServiceSecret(
            auth_pb2.RotateServiceSecretRequest(service_id="orders", current_secret=near_miss),
            timeout=10,
        ),
    )
    by_admin = stub.RotateServiceSecret(
        auth_pb2.RotateServiceSecretRequest(service_id="orders"), metadata=admin_md(), timeout=10
    )
    ev.secrets["orders rotated by admin"] = by_admin.service_secret
    issue("orders", by_admin.service_secret)
    ev.failed("old secret after rotation", lambda: issue("orders", orders))

    # Key rotation, plain and with revoke_previous; every private key is a needle.
    ev.grab_keys(database_url)
    stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin_md(), timeout=30)
    ev.grab_keys(database_url)
    stub.RotateSigningKey(
        auth_pb2.RotateSigningKeyRequest(revoke_previous=True), metadata=admin_md(), timeout=30
    )
    ev.grab_keys(database_url)
    validate(token)
    issue("orders", by_admin.service_secret)
    ev.add("GetJwks", stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10))
    stub.DisableService(
        auth_pb2.DisableServiceRequest(service_id="ledger"), metadata=admin_md(), timeout=10
    )
    ev.failed("disabled service login", lambda: issue("ledger", created.service_secret))
    # An admin pasting a secret where a service id goes: refused as a secret, never echoed.
    pasted = orders
    admin_calls: dict[str, Callable[[], Any]] = {
        "disable": lambda: stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id=pasted), metadata=admin_md(), timeout=10
        ),
        "enable": lambda: stub.EnableService(
            auth_pb2.EnableServiceRequest(service_id=pasted), metadata=admin_md(), timeout=10
        ),
        "update": lambda: stub.UpdateService(
            auth_pb2.UpdateServiceRequest(service_id=pasted, add_scopes=["billing.read"]),
            metadata=admin_md(),
            timeout=10,
        ),
        "revoke": lambda: stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id=pasted), metadata=admin_md(), timeout=10
        ),
    }
    for name, call in admin_calls.items():
        code = ev.failed(f"admin {name} with a pasted secret", call).code()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name  # the code only: never the error

    # Operator commands beside the server.
    cli("services", "list")
    cli("keys", "list")

    # Configuration, storage records and crypto objects as an operator would print them.
    ev.add("Settings repr", repr(load_settings(server.env, {})))
    ev.add("KEK repr", repr(KeyEncryptionKey.from_base64(TEST_KEK)))
    ev.add("KEK str", str(KeyEncryptionKey.from_base64(TEST_KEK)))
    ev.add("SecretHasher repr", repr(SecretHasher(ev.hash_key)))
    engine = make_engine(database_url)
    try:
        repo = Repository(engine)
        for record in repo.list_audit_events(limit=10_000):
            ev.add("audit row", repr(record))
            for name in ("actor", "action", "target", "outcome", "peer", "request_id", "detail"):
                ev.add(f"audit row {name}", getattr(record, name))
        for key_record in repo.list_signing_keys():
            ev.add("signing key record repr", repr(key_record))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> Evidence:
    ev, _ = run_flow(tmp_path_factory.mktemp("authsvc-hygiene"))
    return ev


def hits(ev: Evidence) -> list[tuple[str, str]]:
    """(needle label, source label) for every leak; values are never part of the result."""
    found = []
    for needle_label, value in needles(ev):
        for source, text in ev.texts:
            if value and value in text:
                found.append((needle_label, source))
    return sorted(set(found))


class TestSecretHygiene:
    def test_the_flow_logged_at_debug_and_audited_everything(self, evidence: Evidence) -> None:
        # Controls: the haystack is real, so "no hits" below means something.
        output = [text for source, text in evidence.texts if source == "server output"]
        assert any(" DEBUG " in line or '"level":"debug"' in line for line in output)
        assert any(source == "client log" for source, _ in evidence.texts)
        audit = " ".join(text for source, text in evidence.texts if source == "audit row")
        for action in ("issue_token", "revoke_token", "rotate_secret", "rotate_signing_key"):
            assert action in audit
        assert "bad_credentials" in audit
        codes = {e.code() for e in evidence.errors}
        assert {
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT,
        } <= codes
        assert len(evidence.tokens) >= 10 and len(evidence.private_pems) >= 3
        assert len(evidence.secrets) >= 8

    def test_the_search_finds_a_value_that_is_there(self, evidence: Evidence) -> None:
        # The same search over the same haystack finds non-secret values that are logged.
        jwks = next(text for source, text in evidence.texts if source == "GetJwks")
        kid = list(evidence.private_pems)[-1]  # the active key, published
        assert kid in jwks
        assert any("victim" in text for source, text in evidence.texts if source == "audit row")

    def test_no_secret_hash_kek_private_key_or_signature_leaks(self, evidence: Evidence) -> None:
        found = hits(evidence)
        assert not found, "leaks (labels only):\n" + "\n".join(f"{n} in {s}" for n, s in found)
