"""Promise: keys are looked up only by `kid` among authsvc's own keys; `jku`, `x5u`, `jwk` and
`x5c` headers are refused and never fetched (RFC 8725 section 3.10, RFC 7515 section 4.1)."""

from __future__ import annotations

import base64
import datetime
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from authsvc.keys.jwks import jwk_thumbprint, public_jwk
from authsvc_client import LocalValidator, RemoteValidator
from authsvc_client.v1 import auth_pb2
from tests.security.forge import (
    AUDIENCE,
    Target,
    attacker_key,
    b64url,
    claims,
    header,
    rpc_code,
    sign,
)
from tests.support.server import TEST_ISSUER

pytestmark = pytest.mark.usefixtures("after_each_batch")


class Listener:
    """A real TCP listener on 127.0.0.1 that counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lis = Listener()
    yield lis
    lis.close()


@pytest.fixture(scope="module")
def local_validator(target: Target) -> Iterator[LocalValidator]:
    channel = grpc.insecure_channel(target.address)
    validator = LocalValidator(
        channel, AUDIENCE, TEST_ISSUER, token_source=target.world.follower_token
    )
    assert validator.wait_ready(10)
    yield validator
    validator.close()
    channel.close()


@pytest.fixture(scope="module")
def remote_validator(target: Target) -> Iterator[RemoteValidator]:
    channel = grpc.insecure_channel(target.address)
    yield RemoteValidator(channel, AUDIENCE)
    channel.close()


KID_ATTACKS = [
    "../../../../etc/passwd",
    "..\\..\\..\\windows\\win.ini",
    "/dev/zero",
    "/proc/self/environ",
    "file:///etc/passwd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "' OR '1'='1",
    "' OR 1=1 --",
    "x'; DROP TABLE signing_keys; --",
    '" OR ""="',
    "1 UNION SELECT private_key_enc FROM signing_keys",
    "`id`",
    "; cat /etc/passwd",
    "| nc 127.0.0.1 9",
    "&& sleep 10",
    "\u0000",
    "",
    " ",
    "*",
    "%",
    "{kid}\u0000",
    "{kid} ",
    " {kid}",
    "{KID}",
    "{kid_short}",
    "{kid}{kid}",
]


def _kid(template: str, real: str) -> str:
    return (
        template.replace("{kid}", real)
        .replace("{KID}", real.swapcase())
        .replace("{kid_short}", real[:-1])
    )


class TestHostileKidStrings:
    @pytest.mark.parametrize("template", KID_ATTACKS)
    def test_kid_naming_no_own_key_is_unknown_key(self, target: Target, template: str) -> None:
        key = target.active_key()
        token = sign(key.private, header(_kid(template, key.kid)), claims())
        assert target.reason(token) == "UNKNOWN_KEY"

    def test_shell_substitution_in_kid_runs_nothing(self, target: Target, tmp_path: Path) -> None:
        marker = tmp_path / "pwned"
        key = target.active_key()
        for kid in (f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}"):
            assert target.reason(sign(key.private, header(kid), claims())) == "UNKNOWN_KEY"
        time.sleep(0.2)
        assert not marker.exists()

    def test_sql_in_kid_leaves_the_key_table_intact(self, target: Target) -> None:
        key = target.active_key()
        for kid in ("x'; DELETE FROM signing_keys; --", 'x"; DROP TABLE revocations; --'):
            assert target.reason(sign(key.private, header(kid), claims())) == "UNKNOWN_KEY"
        assert target.active_key().kid == key.kid
        jwks = target.world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        assert key.kid in {k["kid"] for k in json.loads(jwks)["keys"]}

    @pytest.mark.parametrize("kid", [1, 0, 1.5, None, True, False, [], ["{kid}"], {"kid": "{kid}"}])
    def test_non_string_kid_is_malformed(self, target: Target, kid: Any) -> None:
        key = target.active_key()
        kid = json.loads(json.dumps(kid).replace("{kid}", key.kid))
        assert target.reason(sign(key.private, header("x", kid=kid), claims())) == "MALFORMED"

    def test_oversized_kid_within_the_token_limit_is_unknown_key(self, target: Target) -> None:
        key = target.active_key()
        token = sign(key.private, header(key.kid + "A" * 4800), claims())
        assert len(token) < 8192
        assert target.reason(token) == "UNKNOWN_KEY"

    def test_oversized_kid_beyond_the_token_limit_is_refused_before_decoding(
        self, target: Target
    ) -> None:
        key = target.active_key()
        token = sign(key.private, header("A" * 9000), claims())
        with pytest.raises(grpc.RpcError) as excinfo:
            target.validate(token)
        assert rpc_code(excinfo.value) == grpc.StatusCode.INVALID_ARGUMENT


class TestKeyUrlHeadersAreNeverFetched:
    @pytest.mark.parametrize("param", ["jku", "x5u"])
    def test_url_header_is_malformed_and_the_listener_sees_no_connection(
        self,
        target: Target,
        listener: Listener,
        local_validator: LocalValidator,
        remote_validator: RemoteValidator,
        param: str,
    ) -> None:
        attacker = attacker_key()
        attacker_kid = jwk_thumbprint(attacker.public_key())
        own = target.active_key()
        tokens = [
            # the attacker's key, named by the token and served from the URL
            sign(attacker, header(attacker_kid, **{param: listener.url("jwks.json")}), claims()),
            # a kid that is itself the URL
            sign(attacker, header(listener.url("key")), claims()),
            # our own key and kid: the header parameter alone is refused
            sign(own.private, header(own.kid, **{param: listener.url("jwks.json")}), claims()),
        ]
        for token in tokens:
            for validate in (
                lambda t: target.validate(t),
                lambda t: local_validator.validate(t),
                lambda t: remote_validator.validate(t),
            ):
                assert not validate(token).valid
        assert target.reason(tokens[0]) == "MALFORMED"
        assert target.reason(tokens[1]) == "UNKNOWN_KEY"
        assert target.reason(tokens[2]) == "MALFORMED"
        assert local_validator.validate(tokens[2]).reason_name == "MALFORMED"
        time.sleep(0.5)  # give any stray fetch time to connect
        assert listener.connections == 0

    def test_the_listener_does_count_connections(self, listener: Listener) -> None:
        # Control for the zero above.
        socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
        deadline = time.monotonic() + 30
        while listener.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.connections == 1


def _self_signed(key: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authsvc")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


class TestEmbeddedKeys:
    @pytest.mark.parametrize("kid_choice", ["attacker", "own"])
    def test_embedded_jwk_is_malformed(self, target: Target, kid_choice: str) -> None:
        attacker = attacker_key()
        attacker_kid = jwk_thumbprint(attacker.public_key())
        kid = attacker_kid if kid_choice == "attacker" else target.active_key().kid
        jwk = public_jwk(attacker.public_key(), kid)
        token = sign(attacker, header(kid, jwk=jwk), claims())
        assert target.reason(token) == "MALFORMED"

    @pytest.mark.parametrize("kid_choice", ["attacker", "own"])
    def test_embedded_x5c_is_malformed(self, target: Target, kid_choice: str) -> None:
        attacker = attacker_key()
        kid = (
            jwk_thumbprint(attacker.public_key())
            if kid_choice == "attacker"
            else target.active_key().kid
        )
        chain = [base64.b64encode(_self_signed(attacker)).decode()]
        token = sign(attacker, header(kid, x5c=chain, x5t=b64url(b"x" * 20)), claims())
        assert target.reason(token) == "MALFORMED"

    def test_attacker_key_under_our_kid_is_bad_signature(self, target: Target) -> None:
        token = sign(attacker_key(), header(target.active_key().kid), claims())
        assert target.reason(token) == "BAD_SIGNATURE"

    def test_attacker_key_under_its_own_thumbprint_is_unknown_key(self, target: Target) -> None:
        attacker = attacker_key()
        token = sign(attacker, header(jwk_thumbprint(attacker.public_key())), claims())
        assert target.reason(token) == "UNKNOWN_KEY"


class TestRightKidWrongOwnKey:
    """Runs last in this module: it rotates the signing key so that two own keys are published."""

    def test_a_token_signed_by_one_own_key_never_validates_under_another_kid(
        self, target: Target, local_validator: LocalValidator
    ) -> None:
        old = target.active_key()  # decrypted now: rotation deletes its private part
        target.world.server.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(), metadata=target.world.admin_md(), timeout=30
        )
        new = target.active_key()
        assert new.kid != old.kid
        jwks = target.world.server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
        assert {old.kid, new.kid} <= {k["kid"] for k in json.loads(jwks)["keys"]}

        # Controls: each key under its own kid is genuine and still valid.
        assert target.validate(sign(old.private, header(old.kid), claims())).valid
        assert target.validate(sign(new.private, header(new.kid), claims())).valid
        swapped = [
            sign(old.private, header(new.kid), claims()),
            sign(new.private, header(old.kid), claims()),
        ]
        assert [target.reason(t) for t in swapped] == ["BAD_SIGNATURE", "BAD_SIGNATURE"]
        # The local validator learns the new key from the JWK Set (an unknown kid refetches it).
        fresh = sign(new.private, header(new.kid), claims())
        deadline = time.monotonic() + 15
        while not local_validator.validate(fresh).valid and time.monotonic() < deadline:
            time.sleep(0.2)
        assert local_validator.validate(fresh).valid
        assert [local_validator.validate(t).reason_name for t in swapped] == [
            "BAD_SIGNATURE",
            "BAD_SIGNATURE",
        ]
