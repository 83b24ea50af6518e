"""Issue 14 item 5: token sources that hold no shared secret.

Unit part (real files, real keys, no server): which login `from_env` picks and what it
refuses, what each login method sends, the workload token file read afresh at every refresh.
Integration part: two real `authsvc serve` replicas on one database, one over TLS and one
over mTLS (client certificates from a throwaway workload CA), services registered with the CLI
(`--jwk-file`, `--tls-san`, `--federated-subject`, `--no-secret`, `trust add`); each login
gets a token that authsvc itself validates, and follows revocations logging in the same way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authsvc_client import (
    AssertionLogin,
    AsyncTokenSource,
    CertificateLogin,
    CredentialsError,
    SecretLogin,
    TokenRefused,
    TokenSource,
    TokenState,
    TokenUnavailable,
    WorkloadTokenLogin,
    login_from_env,
)
from authsvc_client.assertions import AssertionSigner, jwk_thumbprint
from authsvc_client.logins import (
    JWT_TOKEN_TYPE,
    MAX_WORKLOAD_TOKEN_BYTES,
    Rpc,
    tls_credentials_from_env,
)
from authsvc_client.v1 import auth_pb2
from tests.client.conftest import Counter
from tests.support.certs import Pki, make_pki
from tests.support.server import TEST_ISSUER, RunningServer, base_env, run_cli, start_server
from tests.support.workload import (
    WorkloadCa,
    b64url,
    jwk_of,
    jwk_set,
    new_ec,
    new_rsa,
    private_pem,
    sign,
)

CLIENT_README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"

ISSUER = TEST_ISSUER
K8S_ISSUER = "https://kubernetes.default.svc.test.invalid"
K8S_AUDIENCE = "authsvc.test.invalid"
TRUST = "cluster-a"
SPIFFE = "spiffe://example.org/ns/prod/sa/"
ADMIN = "ops-admin"
# Every variable that selects a way to log in, and the one that names the service.
LOGIN_GROUPS = {
    "secret": "AUTHSVC_SERVICE_SECRET",
    "secret file": "AUTHSVC_SERVICE_SECRET_FILE",
    "key file": "AUTHSVC_SERVICE_KEY_FILE",
    "client certificate": "AUTHSVC_TLS_CLIENT_CERT",
    "workload token": "AUTHSVC_WORKLOAD_TOKEN_FILE",
}
# Generous: the machine is shared; recovery after a revoke normally takes about a second.
DEADLINE_SECONDS = 30.0


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def _k8s_token(key: Any, subject: str, *, lifetime: int = 600, kid: str = "k1") -> str:
    """A projected service-account token as the kube-apiserver makes them (aud a list)."""
    now = int(time.time())
    return sign(
        {
            "iss": K8S_ISSUER,
            "sub": subject,
            "aud": [K8S_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "orders"}},
        },
        key,
        "RS256",
        kid=kid,
    )


def _private_rsa_jwk(key: Any, **extra: str) -> str:
    """An RSA key as a private JWK (RFC 7518 section 6.3.2), with extra members (alg...)."""
    numbers = key.private_numbers()
    private = {
        m: b64url(v.to_bytes((v.bit_length() + 7) // 8, "big"))
        for m, v in (
            ("d", numbers.d),
            ("p", numbers.p),
            ("q", numbers.q),
            ("dp", numbers.dmp1),
            ("dq", numbers.dmq1),
            ("qi", numbers.iqmp),
        )
    }
    return json.dumps({**jwk_of(key), **private, **extra})


@dataclass
class Files:
    """Real credential files of every kind, in a temp folder."""

    folder: Path
    ca: WorkloadCa = field(default_factory=lambda: WorkloadCa.create("unit"))

    def secret_file(self) -> Path:
        return _write(self.folder / "secret", "a-secret-value-for-tests")

    def key_file(self, mode: int = 0o600) -> tuple[Path, Any]:
        key = new_ec()
        return _write(self.folder / f"key-{uuid.uuid4().hex[:6]}.pem", private_pem(key), mode), key

    def client_pair(self, key_mode: int = 0o600) -> tuple[Path, Path, bytes]:
        cert, key = self.ca.issue_pair(uris=(SPIFFE + "orders",))
        return (
            _write(self.folder / "client.crt", cert, 0o644),
            _write(self.folder / "client.key", key, key_mode),
            key,
        )

    def ca_file(self) -> Path:
        return _write(self.folder / "ca.crt", self.ca.cert_pem, 0o644)

    def token_file(self, token: str, name: str = "token") -> Path:
        # Projected tokens are mounted 0644: the workload token file need not be owner-only.
        return _write(self.folder / name, token, 0o644)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def _env_for(kind: str, files: Files, **extra: str) -> dict[str, str]:
    """A complete environment for one way to log in (service id and issuer included)."""
    env = {"AUTHSVC_TARGET": "127.0.0.1:1", "AUTHSVC_SERVICE_ID": "orders", **extra}
    if kind == "secret":
        env["AUTHSVC_SERVICE_SECRET"] = "a-secret-value-for-tests"
    elif kind == "secret file":
        env["AUTHSVC_SERVICE_SECRET_FILE"] = str(files.secret_file())
    elif kind == "key file":
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(files.key_file()[0])
        env["AUTHSVC_ISSUER"] = ISSUER
    elif kind == "client certificate":
        cert, key, _ = files.client_pair()
        env["AUTHSVC_TLS_CLIENT_CERT"] = str(cert)
        env["AUTHSVC_TLS_CLIENT_KEY"] = str(key)
    elif kind == "workload token":
        env["AUTHSVC_WORKLOAD_TOKEN_FILE"] = str(files.token_file(_k8s_token(new_rsa(), "s")))
    return env


# --- unit: the environment rules ----------------------------------------------------------------


class TestFromEnvSelection:
    @pytest.mark.parametrize(
        ("kind", "login_type"),
        [
            ("secret", SecretLogin),
            ("secret file", SecretLogin),
            ("key file", AssertionLogin),
            ("client certificate", CertificateLogin),
            ("workload token", WorkloadTokenLogin),
        ],
    )
    def test_each_way_alone_picks_its_login(
        self, files: Files, kind: str, login_type: type
    ) -> None:
        found = login_from_env(_env_for(kind, files))
        assert type(found.login) is login_type
        assert found.login.service_id == "orders"
        assert found.target == "127.0.0.1:1"
        # Only the certificate login needs TLS credentials of its own (the client pair).
        assert (found.channel_credentials is not None) == (kind == "client certificate")

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            *itertools.combinations(
                ["secret", "key file", "client certificate", "workload token"], 2
            ),
            ("secret file", "key file"),
            ("secret file", "client certificate"),
            ("secret file", "workload token"),
        ],
    )
    def test_two_ways_at_once_are_refused_naming_both(
        self, files: Files, first: str, second: str
    ) -> None:
        env = {**_env_for(first, files), **_env_for(second, files)}
        with pytest.raises(CredentialsError, match="only one way") as info:
            login_from_env(env)
        message = str(info.value)
        assert LOGIN_GROUPS[first] in message and LOGIN_GROUPS[second] in message
        assert "a-secret-value-for-tests" not in message

    def test_three_ways_at_once_name_all_three(self, files: Files) -> None:
        env = {
            **_env_for("secret", files),
            **_env_for("key file", files),
            **_env_for("workload token", files),
        }
        with pytest.raises(CredentialsError, match="all set") as info:
            login_from_env(env)
        for kind in ("secret", "key file", "workload token"):
            assert LOGIN_GROUPS[kind] in str(info.value)

    def test_the_secret_inline_and_as_a_file_is_still_its_own_error(self, files: Files) -> None:
        env = {**_env_for("secret", files), **_env_for("secret file", files)}
        with pytest.raises(CredentialsError, match="only one of AUTHSVC_SERVICE_SECRET"):
            login_from_env(env)

    def test_no_way_lists_every_option(self) -> None:
        env = {"AUTHSVC_TARGET": "127.0.0.1:1", "AUTHSVC_SERVICE_ID": "orders"}
        with pytest.raises(CredentialsError) as info:
            login_from_env(env)
        for name in (*LOGIN_GROUPS.values(), "AUTHSVC_TLS_CLIENT_KEY"):
            assert name in str(info.value)

    @pytest.mark.parametrize("kind", ["secret", "key file", "client certificate"])
    def test_the_service_id_is_required_but_for_the_workload_token(
        self, files: Files, kind: str
    ) -> None:
        env = _env_for(kind, files)
        del env["AUTHSVC_SERVICE_ID"]
        with pytest.raises(CredentialsError, match="AUTHSVC_SERVICE_ID"):
            login_from_env(env)

    def test_the_workload_token_needs_no_service_id(self, files: Files) -> None:
        env = _env_for("workload token", files)
        del env["AUTHSVC_SERVICE_ID"]
        login = login_from_env(env).login
        assert isinstance(login, WorkloadTokenLogin) and login.service_id == ""
        request = login.request("billing", (), 0)
        assert isinstance(request, auth_pb2.ExchangeTokenRequest) and request.service_id == ""

    def test_the_target_is_required(self, files: Files) -> None:
        env = _env_for("key file", files)
        del env["AUTHSVC_TARGET"]
        with pytest.raises(CredentialsError, match="AUTHSVC_TARGET"):
            login_from_env(env)
        assert login_from_env(env, "authsvc:50051").target == "authsvc:50051"

    def test_the_key_file_needs_authsvcs_issuer(self, files: Files) -> None:
        env = _env_for("key file", files)
        del env["AUTHSVC_ISSUER"]
        with pytest.raises(CredentialsError, match="AUTHSVC_ISSUER"):
            login_from_env(env)

    def test_the_assertions_are_for_that_issuer_with_that_key(self, files: Files) -> None:
        path, key = files.key_file()
        env = {**_env_for("secret", files), "AUTHSVC_SERVICE_KEY_FILE": str(path)}
        del env["AUTHSVC_SERVICE_SECRET"]
        env["AUTHSVC_ISSUER"] = ISSUER
        login = login_from_env(env).login
        assert isinstance(login, AssertionLogin)
        assert login.signer.issuer == ISSUER
        assert login.signer.key_id == jwk_thumbprint(key.public_key())

    def test_a_jwk_key_file_with_alg_ps256_signs_ps256(self, files: Files) -> None:
        key = new_rsa()
        env = _env_for("key file", files)
        path = _write(files.folder / "rsa.jwk", _private_rsa_jwk(key, alg="PS256"))
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(path)
        login = login_from_env(env).login
        assert isinstance(login, AssertionLogin)
        assert login.signer.algorithm == "PS256"
        assertion = login.signer.sign()
        assert jwt.get_unverified_header(assertion)["alg"] == "PS256"
        jwt.decode(assertion, key.public_key(), algorithms=["PS256"], audience=ISSUER)
        _write(path, _private_rsa_jwk(key))
        unpinned = login_from_env(env).login
        assert isinstance(unpinned, AssertionLogin) and unpinned.signer.algorithm == "RS256"

    @pytest.mark.parametrize("alg", ["ES256", "HS256", "none", "RSA-OAEP"])
    def test_a_jwk_key_file_whose_alg_does_not_fit_is_refused(self, files: Files, alg: str) -> None:
        env = _env_for("key file", files)
        path = _write(files.folder / "rsa.jwk", _private_rsa_jwk(new_rsa(), alg=alg))
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(path)
        with pytest.raises(CredentialsError, match=r"AUTHSVC_SERVICE_KEY_FILE: the JWK's 'alg'"):
            login_from_env(env)

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
    def test_a_key_file_others_can_read_is_refused(self, files: Files, mode: int) -> None:
        path, _ = files.key_file(mode)
        env = _env_for("key file", files)
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(path)
        with pytest.raises(CredentialsError, match=r"AUTHSVC_SERVICE_KEY_FILE.*group or others"):
            login_from_env(env)

    @pytest.mark.parametrize("missing", ["AUTHSVC_TLS_CLIENT_CERT", "AUTHSVC_TLS_CLIENT_KEY"])
    def test_a_certificate_without_its_key_or_a_key_without_its_certificate(
        self, files: Files, missing: str
    ) -> None:
        env = _env_for("client certificate", files)
        del env[missing]
        with pytest.raises(CredentialsError, match=r"AUTHSVC_TLS_CLIENT_CERT and .* go together"):
            login_from_env(env)

    def test_a_client_key_others_can_read_is_refused_without_showing_it(self, files: Files) -> None:
        cert, key, key_pem = files.client_pair(key_mode=0o644)
        env = _env_for("secret", files, AUTHSVC_TLS_CLIENT_CERT=str(cert))
        del env["AUTHSVC_SERVICE_SECRET"]
        env["AUTHSVC_TLS_CLIENT_KEY"] = str(key)
        with pytest.raises(CredentialsError, match=r"AUTHSVC_TLS_CLIENT_KEY.*group or others") as e:
            login_from_env(env)
        assert key_pem.decode() not in str(e.value)

    def test_a_client_certificate_file_that_is_no_certificate(self, files: Files) -> None:
        env = _env_for("client certificate", files)
        env["AUTHSVC_TLS_CLIENT_CERT"] = str(_write(files.folder / "junk.crt", "not pem", 0o644))
        with pytest.raises(CredentialsError, match="AUTHSVC_TLS_CLIENT_CERT"):
            login_from_env(env)

    def test_a_client_key_file_that_is_no_key(self, files: Files) -> None:
        env = _env_for("client certificate", files)
        env["AUTHSVC_TLS_CLIENT_KEY"] = str(_write(files.folder / "junk.key", "not a key"))
        with pytest.raises(CredentialsError, match=r"AUTHSVC_TLS_CLIENT_KEY: .*no PEM private key"):
            login_from_env(env)

    @pytest.mark.parametrize("kind", ["secret", "key file", "workload token"])
    def test_authsvc_tls_ca_gives_every_login_tls(self, files: Files, kind: str) -> None:
        env = _env_for(kind, files, AUTHSVC_TLS_CA=str(files.ca_file()))
        assert login_from_env(env).channel_credentials is not None

    def test_an_unreadable_ca_is_named(self, files: Files) -> None:
        env = _env_for("secret", files, AUTHSVC_TLS_CA=str(files.folder / "absent.crt"))
        with pytest.raises(CredentialsError, match="AUTHSVC_TLS_CA: cannot read"):
            login_from_env(env)

    def test_tls_for_a_bearer_caller_follows_the_login_rules(self, files: Files) -> None:
        # The CLI's `token validate` and `revoke` bring a token, not a login: the same TLS
        # variables, read by the same rules (tests/security/test_tls.py runs it end to end).
        assert tls_credentials_from_env({}) is None
        assert tls_credentials_from_env({"AUTHSVC_TLS_CA": str(files.ca_file())}) is not None
        cert, key, key_pem = files.client_pair()
        pair = {"AUTHSVC_TLS_CLIENT_CERT": str(cert), "AUTHSVC_TLS_CLIENT_KEY": str(key)}
        assert tls_credentials_from_env(pair) is not None
        for missing in pair:
            half = {k: v for k, v in pair.items() if k != missing}
            with pytest.raises(CredentialsError, match=r"CLIENT_CERT and .* go together"):
                tls_credentials_from_env(half)
        key.chmod(0o644)
        with pytest.raises(CredentialsError, match=r"AUTHSVC_TLS_CLIENT_KEY.*group or others") as e:
            tls_credentials_from_env(pair)
        assert key_pem.decode() not in str(e.value)
        junk = {"AUTHSVC_TLS_CA": str(_write(files.folder / "junk.crt", "not pem", 0o644))}
        with pytest.raises(CredentialsError, match="AUTHSVC_TLS_CA: the file holds no PEM"):
            tls_credentials_from_env(junk)

    def test_a_missing_workload_token_file_is_refused_at_start(self, files: Files) -> None:
        env = _env_for("workload token", files)
        env["AUTHSVC_WORKLOAD_TOKEN_FILE"] = str(files.folder / "not-yet-mounted")
        with pytest.raises(CredentialsError, match="AUTHSVC_WORKLOAD_TOKEN_FILE: cannot read"):
            TokenSource.from_env("billing", environ=env)

    def test_the_client_readme_names_every_new_variable(self) -> None:
        text = CLIENT_README.read_text(encoding="utf-8")
        for name in (
            *LOGIN_GROUPS.values(),
            "AUTHSVC_TLS_CLIENT_KEY",
            "AUTHSVC_TLS_CA",
            "AUTHSVC_ISSUER",
        ):
            assert f"`{name}`" in text, name


# --- unit: what each login sends ----------------------------------------------------------------


class TestLoginRequests:
    def test_a_fresh_verifiable_assertion_at_every_refresh(self) -> None:
        key = new_ec()
        login = AssertionLogin(AssertionSigner("orders", ISSUER, key))
        first, second = (login.request("billing", ["billing.read"], 60) for _ in range(2))
        assert login.rpc is Rpc.ISSUE_TOKEN
        claims = [
            jwt.decode(r.client_assertion, key.public_key(), algorithms=["ES256"], audience=ISSUER)
            for r in (first, second)
        ]
        assert all(c["iss"] == c["sub"] == "orders" for c in claims)
        assert claims[0]["jti"] != claims[1]["jti"]
        assert first.service_id == "orders" and first.service_secret == ""
        assert (first.audience, list(first.scopes), first.ttl_seconds) == (
            "billing",
            ["billing.read"],
            60,
        )

    def test_a_certificate_login_sends_the_service_id_and_nothing_secret(self) -> None:
        request = CertificateLogin("orders").request("billing", [], 0)
        assert isinstance(request, auth_pb2.IssueTokenRequest)
        assert request.service_id == "orders"
        assert request.service_secret == "" and request.client_assertion == ""

    def test_the_workload_token_is_exchanged_as_a_jwt(self, files: Files) -> None:
        token = _k8s_token(new_rsa(), "system:serviceaccount:prod:orders")
        login = WorkloadTokenLogin(str(files.token_file(token)), "orders")
        request = login.request("billing", ["billing.read"], 120)
        assert login.rpc is Rpc.EXCHANGE_TOKEN
        assert isinstance(request, auth_pb2.ExchangeTokenRequest)
        assert request.subject_token == token
        assert request.subject_token_type == JWT_TOKEN_TYPE
        assert (request.audience, list(request.scopes), request.ttl_seconds) == (
            "billing",
            ["billing.read"],
            120,
        )
        assert request.service_id == "orders" and request.service_secret == ""

    def test_the_file_is_read_again_at_every_refresh_through_a_kubelet_style_swap(
        self, files: Files
    ) -> None:
        # The kubelet writes a new timestamped directory and swaps the `..data` symlink; the
        # mounted `token` is a symlink through it (atomic for the reader).
        mount = files.folder / "serviceaccount"
        mount.mkdir()
        key = new_rsa()
        tokens = [_k8s_token(key, "system:serviceaccount:prod:orders") for _ in range(2)]
        tokens.append(_k8s_token(key, "system:serviceaccount:prod:orders", lifetime=900))
        for i, token in enumerate(tokens):
            version = mount / f"..2026_12_02_{i}"
            version.mkdir()
            _write(version / "token", token, 0o644)
            link = mount / f"..data_tmp{i}"
            link.symlink_to(version.name)
            os.replace(link, mount / "..data")
            if i == 0:
                (mount / "token").symlink_to("..data/token")
        login = WorkloadTokenLogin(str(mount / "token"))
        assert login.request("billing", (), 0).subject_token == tokens[-1]
        # and back to an earlier one: nothing is cached
        link = mount / "..data_back"
        link.symlink_to("..2026_12_02_0")
        os.replace(link, mount / "..data")
        assert login.request("billing", (), 0).subject_token == tokens[0]

    @pytest.mark.parametrize(
        ("content", "said"),
        [
            (b"", "empty"),
            (b" \n\t\n", "empty"),
            (b"\xff\xfe-not-text", "does not hold a JWT"),
            (b"only-one-part-CONTENTMARK", "does not hold a JWT"),
            (b"a.b.c.d-CONTENTMARK", "does not hold a JWT"),
            (b"eyJ.eyJ CONTENTMARK.sig", "does not hold a JWT"),
            (b"e" * (MAX_WORKLOAD_TOKEN_BYTES + 1), "larger than"),
        ],
    )
    def test_a_bad_token_file_is_a_clear_error_without_its_content(
        self, files: Files, content: bytes, said: str
    ) -> None:
        path = _write(files.folder / "token", content, 0o644)
        login = WorkloadTokenLogin(str(path))
        with pytest.raises(CredentialsError, match=f"AUTHSVC_WORKLOAD_TOKEN_FILE: .*{said}") as e:
            login.request("billing", (), 0)
        assert "CONTENTMARK" not in str(e.value) and "eyJ" not in str(e.value)

    def test_a_missing_file_or_a_directory_is_named(self, files: Files) -> None:
        for path in (files.folder / "absent", files.folder):
            with pytest.raises(CredentialsError, match="AUTHSVC_WORKLOAD_TOKEN_FILE"):
                WorkloadTokenLogin(str(path)).read()

    def test_login_or_secret_not_both(self) -> None:
        with grpc.insecure_channel("127.0.0.1:1") as channel:
            with pytest.raises(CredentialsError, match="not both"):
                TokenSource(
                    channel,
                    login=CertificateLogin("orders"),
                    service_secret="x",
                    audience="billing",
                    follow_revocations=False,
                )
            with pytest.raises(CredentialsError, match="non-empty"):
                TokenSource(channel, service_id="orders", audience="billing")

    def test_reprs_show_the_login_kind_and_nothing_secret(self, files: Files) -> None:
        key = new_ec()
        signer = AssertionSigner("orders", ISSUER, key)
        logins = [
            SecretLogin("orders", "a-secret-value-for-tests"),
            AssertionLogin(signer),
            CertificateLogin("orders"),
            WorkloadTokenLogin(str(files.token_file(_k8s_token(new_rsa(), "s")))),
        ]
        key_pem = private_pem(key).decode()
        with grpc.insecure_channel("127.0.0.1:1") as channel:
            for login in logins:
                source = TokenSource(channel, login=login, audience="billing")
                text = repr(source) + repr(login)
                assert "a-secret-value-for-tests" not in text and key_pem not in text
                assert "eyJ" not in text  # no token from the file
                source.close()
        assert signer.key_id in repr(logins[1])


class TestCredentialFailureAtRefresh:
    """A token file that vanishes while the source runs: the refresh fails with the variable
    named, backs off like an outage (not like a refusal), and no RPC is even attempted."""

    def test_sync(self, files: Files) -> None:
        path = files.token_file(_k8s_token(new_rsa(), "s"))
        counter = Counter()
        channel = grpc.intercept_channel(grpc.insecure_channel("127.0.0.1:1"), counter)
        source = TokenSource(
            channel,
            login=WorkloadTokenLogin(str(path)),
            audience="billing",
            follow_revocations=False,
            backoff_initial_seconds=0.05,
            backoff_max_seconds=30,
        )
        path.unlink()
        with pytest.raises(TokenUnavailable, match="AUTHSVC_WORKLOAD_TOKEN_FILE") as info:
            source.token()
        assert not isinstance(info.value, TokenRefused)
        assert counter.calls == {}
        assert source.state is TokenState.INVALID
        # An outage's backoff: ready again well before a refusal's 30 s.
        time.sleep(0.15)
        with pytest.raises(TokenUnavailable, match="cannot read the file"):
            source.token()
        assert counter.calls == {}
        source.close()
        channel.close()

    def test_asyncio(self, files: Files) -> None:
        async def scenario() -> str:
            async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
                source = AsyncTokenSource(
                    channel,
                    login=WorkloadTokenLogin(str(files.folder / "absent")),
                    audience="billing",
                    follow_revocations=False,
                )
                try:
                    await source.token()
                except TokenUnavailable as exc:
                    assert not isinstance(exc, TokenRefused)
                    return str(exc)
                finally:
                    await source.close()
            return "no error"

        message = asyncio.run(scenario())
        assert "AUTHSVC_WORKLOAD_TOKEN_FILE: cannot read the file" in message


# --- integration: a real authsvc ---------------------------------------------------------------


def _thumbprint(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass
class Fleet:
    """authsvc over TLS (`server`) and, on the same database, over mTLS (`mtls_server`,
    client certificates from the workload CA required), one trusted cluster issuer, and a
    factory registering a secretless service per test."""

    server: RunningServer
    mtls_server: RunningServer
    folder: Path
    pki: Pki
    workload_ca: WorkloadCa
    cluster_key: Any = field(repr=False)
    admin_secret: str = field(repr=False)

    def env(self, *, mtls: bool = False, **extra: str) -> dict[str, str]:
        """What a workload's environment holds besides its credential."""
        return {
            "AUTHSVC_TARGET": (self.mtls_server if mtls else self.server).address,
            "AUTHSVC_TLS_CA": str(self.pki.ca.cert_path),
            **extra,
        }

    def register(self, name: str, *flags: str) -> None:
        out = self.server.cli(
            "services",
            "create",
            name,
            "--audience",
            "billing",
            "--audience",
            "authsvc",
            "--scope",
            "billing.read",
            "--no-secret",
            "--json",
            *flags,
        ).stdout
        assert json.loads(out)["service_secret"] is None

    def key_service(self) -> tuple[str, dict[str, str], Any]:
        """A service with a registered public key: (id, env with its key file, key)."""
        name = f"orders-key-{uuid.uuid4().hex[:8]}"
        key = new_ec()
        jwk = _write(self.folder / f"{name}.jwk", json.dumps(jwk_of(key)), 0o644)
        self.register(name, "--jwk-file", str(jwk))
        key_file = _write(self.folder / f"{name}.pem", private_pem(key))
        return (
            name,
            self.env(
                AUTHSVC_SERVICE_ID=name,
                AUTHSVC_SERVICE_KEY_FILE=str(key_file),
                AUTHSVC_ISSUER=ISSUER,
            ),
            key,
        )

    def cert_service(self) -> tuple[str, dict[str, str], bytes]:
        """A service with a registered SPIFFE id: (id, env with its client pair, cert PEM)."""
        name = f"orders-cert-{uuid.uuid4().hex[:8]}"
        self.register(name, "--tls-san", SPIFFE + name)
        cert, key = self.workload_ca.issue_pair(uris=(SPIFFE + name,))
        return (
            name,
            self.env(
                mtls=True,
                AUTHSVC_SERVICE_ID=name,
                AUTHSVC_TLS_CLIENT_CERT=str(_write(self.folder / f"{name}.crt", cert, 0o644)),
                AUTHSVC_TLS_CLIENT_KEY=str(_write(self.folder / f"{name}.key", key)),
            ),
            cert,
        )

    def workload_service(self) -> tuple[str, dict[str, str], str]:
        """A service bound to a cluster subject: (id, env with its token file (no service
        id: authsvc finds the bound service), subject)."""
        name = f"orders-wl-{uuid.uuid4().hex[:8]}"
        subject = f"system:serviceaccount:prod:{name}"
        self.register(name, "--federated-subject", f"{TRUST}={subject}")
        path = _write(self.folder / f"{name}.token", _k8s_token(self.cluster_key, subject), 0o644)
        return name, self.env(AUTHSVC_WORKLOAD_TOKEN_FILE=str(path)), subject

    def service(self, kind: str) -> tuple[str, dict[str, str], str]:
        """(id, env, the thumbprint a validator compares a bound token with)."""
        if kind == "assertion":
            name, env, _ = self.key_service()
            return name, env, ""
        if kind == "certificate":
            name, env, cert = self.cert_service()
            return name, env, _thumbprint(cert)
        name, env, _ = self.workload_service()
        return name, env, ""

    def validate(self, token: str, audience: str = "billing", thumbprint: str = "") -> Any:
        """authsvc's own verdict on a token (with the certificate a callee would see)."""
        reply = self.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(
                token=token, audience=audience, client_cert_thumbprint=thumbprint
            ),
            timeout=10,
        )
        assert reply.valid, auth_pb2.ValidationFailure.Name(reply.reason)
        return reply.claims

    def revoke_all(self, service_id: str) -> None:
        admin = self.server.issue(ADMIN, self.admin_secret, "authsvc").access_token
        self.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(service_id=service_id, reason="test"),
            metadata=[("authorization", f"Bearer {admin}")],
            timeout=10,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("secretless")
    pki = make_pki(folder / "pki")
    workload_ca = WorkloadCa.create("spiffe")
    ca_path = _write(folder / "workload-ca.crt", workload_ca.cert_pem, 0o644)
    env = base_env(
        f"sqlite:///{folder / 'authsvc.db'}",
        AUTHSVC_TLS_CERT=str(pki.server.cert_path),
        AUTHSVC_TLS_KEY=str(pki.server.key_path),
    )
    run_cli(env, "db", "upgrade")
    created = run_cli(env, "services", "create", ADMIN, "--admin", "--json")
    admin_secret = str(json.loads(created.stdout)["service_secret"])
    cluster_key = new_rsa()
    jwks = _write(folder / "cluster.jwks", jwk_set(jwk_of(cluster_key, kid="k1")), 0o644)
    run_cli(
        env,
        "trust",
        "add",
        TRUST,
        "--issuer",
        K8S_ISSUER,
        "--audience",
        K8S_AUDIENCE,
        "--jwks-file",
        str(jwks),
    )
    roots = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    server = start_server(env, credentials=roots)
    try:
        # With a client CA every connection must present a certificate: a replica of its
        # own, so that the secret, key and token logins connect to the other without one.
        mtls_server = start_server(
            {**env, "AUTHSVC_TLS_CLIENT_CA": str(ca_path)}, credentials=roots
        )
        try:
            yield Fleet(server, mtls_server, folder, pki, workload_ca, cluster_key, admin_secret)
        finally:
            mtls_server.stop()
    finally:
        server.stop()


KINDS = ["assertion", "certificate", "workload token"]
# Short backoffs: these tests provoke refusals and want the next attempt soon.
FAST = {"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2}


def _eventually(attempt: Callable[[], Any]) -> Any:
    """attempt() once it stops raising an AuthsvcClientError (a source backing off)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        try:
            return attempt()
        except TokenUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class TestSecretlessLogins:
    def test_a_secret_login_speaks_tls_with_authsvc_tls_ca(self, fleet: Fleet) -> None:
        # AUTHSVC_TLS_CA alone: a secret login over TLS (a loopback target would otherwise
        # be plaintext, which this server refuses).
        name = f"orders-secret-{uuid.uuid4().hex[:8]}"
        out = fleet.server.cli("services", "create", name, "--audience", "billing", "--json")
        env = fleet.env(
            AUTHSVC_SERVICE_ID=name,
            AUTHSVC_SERVICE_SECRET=json.loads(out.stdout)["service_secret"],
        )
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            assert fleet.validate(source.token()).subject == name

    @pytest.mark.parametrize("kind", KINDS)
    def test_from_env_gets_a_token_authsvc_validates(self, fleet: Fleet, kind: str) -> None:
        name, env, thumbprint = fleet.service(kind)
        with TokenSource.from_env("billing", ["billing.read"], environ=env) as source:
            token = source.token()
        claims = fleet.validate(token, thumbprint=thumbprint)
        assert claims.subject == name and claims.client_id == name
        assert list(claims.scopes) == ["billing.read"]

    @pytest.mark.parametrize("kind", KINDS)
    def test_asyncio_from_env_gets_a_token(self, fleet: Fleet, kind: str) -> None:
        name, env, thumbprint = fleet.service(kind)

        async def scenario() -> str:
            async with AsyncTokenSource.from_env("billing", environ=env) as source:
                return await source.token()

        assert fleet.validate(asyncio.run(scenario()), thumbprint=thumbprint).subject == name

    def test_every_refresh_signs_a_new_assertion(self, fleet: Fleet) -> None:
        # A jti is single-use: a source that reused its assertion would be refused here.
        name, env, _ = fleet.key_service()
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            seen = set()
            for _ in range(3):
                token = source.token()
                seen.add(token)
                assert source.invalidate(token)
        assert len(seen) == 3
        assert {fleet.validate(t).subject for t in seen} == {name}

    def test_a_key_registered_for_ps256_logs_in_from_its_jwk_file(self, fleet: Fleet) -> None:
        """Registered with "alg": "PS256", the key is pinned to PS256: the private JWK with that
        alg, through AUTHSVC_SERVICE_KEY_FILE, logs in (it signed RS256 and was refused)."""
        name = f"orders-pss-{uuid.uuid4().hex[:8]}"
        key = new_rsa()
        public = _write(fleet.folder / f"{name}.jwk", json.dumps(jwk_of(key, alg="PS256")), 0o644)
        fleet.register(name, "--jwk-file", str(public))
        private = _write(fleet.folder / f"{name}.private.jwk", _private_rsa_jwk(key, alg="PS256"))
        env = fleet.env(
            AUTHSVC_SERVICE_ID=name, AUTHSVC_SERVICE_KEY_FILE=str(private), AUTHSVC_ISSUER=ISSUER
        )
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            token = source.token()
        assert fleet.validate(token).subject == name
        # The same key as PEM signs RS256, which the pin refuses.
        pem = _write(fleet.folder / f"{name}.pem", private_pem(key))
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(pem)
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            with pytest.raises(TokenRefused, match="UNAUTHENTICATED"):
                source.token()

    def test_an_unregistered_key_is_refused_with_the_assertion_hint(self, fleet: Fleet) -> None:
        name, env, _key = fleet.key_service()
        other = new_ec()
        env["AUTHSVC_SERVICE_KEY_FILE"] = str(
            _write(fleet.folder / "other.pem", private_pem(other))
        )
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            with pytest.raises(TokenRefused, match="UNAUTHENTICATED") as info:
                source.token()
        assert "key not registered" in str(info.value) and name in str(info.value)
        assert "eyJ" not in str(info.value)

    def test_a_certificate_for_another_identity_is_refused(self, fleet: Fleet) -> None:
        _name, env, _ = fleet.cert_service()
        cert, key = fleet.workload_ca.issue_pair(uris=(SPIFFE + "someone-else",))
        env["AUTHSVC_TLS_CLIENT_CERT"] = str(_write(fleet.folder / "else.crt", cert, 0o644))
        env["AUTHSVC_TLS_CLIENT_KEY"] = str(_write(fleet.folder / "else.key", key))
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            with pytest.raises(TokenRefused, match="UNAUTHENTICATED") as info:
                source.token()
        assert "client certificate" in str(info.value)

    def test_a_workload_token_naming_another_service_is_refused(self, fleet: Fleet) -> None:
        _name, env, _ = fleet.workload_service()
        other, _, _ = fleet.key_service()
        env["AUTHSVC_SERVICE_ID"] = other
        with TokenSource.from_env("billing", environ=env, follow_revocations=False) as source:
            with pytest.raises(TokenRefused):
                source.token()

    def test_the_workload_token_file_is_read_again_at_every_refresh(self, fleet: Fleet) -> None:
        name, env, subject = fleet.workload_service()
        path = Path(env["AUTHSVC_WORKLOAD_TOKEN_FILE"])
        with TokenSource.from_env(
            "billing", environ=env, follow_revocations=False, **FAST
        ) as source:
            first = source.token()
            assert fleet.validate(first).subject == name
            # The file now holds a token of a key the cluster never published: the next
            # refresh must present it (and be refused), not the token read before.
            _write(path, _k8s_token(new_rsa(), subject), 0o644)
            assert source.invalidate(first)
            with pytest.raises(TokenRefused, match="workload token"):
                source.token()
            # Gone while the kubelet swaps it: named, and retried like an outage.
            path.unlink()
            time.sleep(0.25)
            with pytest.raises(TokenUnavailable, match="AUTHSVC_WORKLOAD_TOKEN_FILE"):
                source.token()
            # A fresh, valid token appears: the source recovers by itself.
            _write(path, _k8s_token(fleet.cluster_key, subject), 0o644)
            again = _eventually(source.token)
        assert again != first and fleet.validate(again).subject == name

    @pytest.mark.parametrize(
        "kind",
        [
            "assertion",
            "certificate",
            "workload token",
        ],
    )
    def test_revocations_are_followed_logging_in_the_same_way(
        self, fleet: Fleet, kind: str
    ) -> None:
        # The revocation feed needs a token for audience authsvc: the follower source gets it
        # with the same login (no secret exists for these services), and a workload source
        # learns its service id from its first token to recognise the service's revoke-all.
        name, env, thumbprint = fleet.service(kind)
        with TokenSource.from_env("billing", environ=env) as source:
            first = source.token()
            assert source.following
            # Let the follower connect (it starts with the first refresh) before revoking.
            time.sleep(0.5)
            fleet.revoke_all(name)
            deadline = time.monotonic() + DEADLINE_SECONDS
            while source.cached_token() in (first, None):
                assert time.monotonic() < deadline, "the revocation was not followed"
                time.sleep(0.05)
            renewed = source.token()
        assert renewed != first
        assert fleet.validate(renewed, thumbprint=thumbprint).subject == name
