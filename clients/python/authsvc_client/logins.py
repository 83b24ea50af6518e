"""How a token source proves who it is to authsvc: one login method per kind of credential.

A token source refreshes, single-flights, backs off and follows revocations the same way
whatever the credential; only the request differs. Each login method here says which RPC it
calls (`IssueToken` or `ExchangeToken`) and builds that request afresh at every refresh, so a
signed assertion is new each time (its jti is single-use) and a workload token file is read
again each time (the kubelet rotates it at 80% of its lifetime). `login_from_env` picks the one
way the environment configures, and refuses two.
"""

from __future__ import annotations

import enum
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc

from authsvc_client.assertions import ENV_SERVICE_KEY_FILE, AssertionSigner, read_private_file
from authsvc_client.claims import JWT_TOKEN_TYPE
from authsvc_client.errors import CredentialsError
from authsvc_client.v1 import auth_pb2

__all__ = [
    "ENV_ISSUER",
    "ENV_SERVICE_ID",
    "ENV_SERVICE_KEY_FILE",
    "ENV_SERVICE_SECRET",
    "ENV_SERVICE_SECRET_FILE",
    "ENV_TARGET",
    "ENV_TLS_CA",
    "ENV_TLS_CLIENT_CERT",
    "ENV_TLS_CLIENT_KEY",
    "ENV_WORKLOAD_TOKEN_FILE",
    "JWT_TOKEN_TYPE",
    "MAX_WORKLOAD_TOKEN_BYTES",
    "AssertionLogin",
    "CertificateLogin",
    "EnvLogin",
    "Login",
    "LoginRequest",
    "Rpc",
    "SecretLogin",
    "WorkloadTokenLogin",
    "credentials_from_env",
    "login_from_env",
    "tls_credentials_from_env",
]

ENV_SERVICE_ID = "AUTHSVC_SERVICE_ID"
ENV_SERVICE_SECRET = "AUTHSVC_SERVICE_SECRET"  # noqa: S105 - a variable name, not a secret
ENV_SERVICE_SECRET_FILE = "AUTHSVC_SERVICE_SECRET_FILE"  # noqa: S105
ENV_TARGET = "AUTHSVC_TARGET"
# The assertion's `aud`: authsvc's issuer, as its own AUTHSVC_ISSUER says.
ENV_ISSUER = "AUTHSVC_ISSUER"
ENV_TLS_CA = "AUTHSVC_TLS_CA"
ENV_TLS_CLIENT_CERT = "AUTHSVC_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY = "AUTHSVC_TLS_CLIENT_KEY"
ENV_WORKLOAD_TOKEN_FILE = "AUTHSVC_WORKLOAD_TOKEN_FILE"  # noqa: S105 - a variable name
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
# A projected service-account token is 1-2 KB; anything far larger is not one (and is not
# read whole into memory at every refresh).
MAX_WORKLOAD_TOKEN_BYTES = 64 * 1024

LoginRequest = auth_pb2.IssueTokenRequest | auth_pb2.ExchangeTokenRequest


class Rpc(enum.Enum):
    """The AuthService method a login calls; both answer with an IssueTokenResponse."""

    ISSUE_TOKEN = "IssueToken"  # noqa: S105 - an RPC name
    EXCHANGE_TOKEN = "ExchangeToken"  # noqa: S105 - an RPC name


class Login(ABC):
    """One way to log in. Implementations hold no I/O but what building the request needs
    (reading a token file), so the sync and asyncio sources share them."""

    rpc: ClassVar[Rpc] = Rpc.ISSUE_TOKEN
    # What the source's messages call the credential.
    kind: ClassVar[str] = "credential"
    # Whose grants a PERMISSION_DENIED is about, in the source's messages.
    grantee: ClassVar[str] = "this service"

    @property
    @abstractmethod
    def service_id(self) -> str:
        """The service logging in; empty when authsvc learns it from the credential (a
        federated token's subject)."""

    @abstractmethod
    def request(self, audience: str, scopes: Sequence[str], ttl_seconds: int) -> LoginRequest:
        """The request for one refresh.

        Raises:
            CredentialsError: the credential cannot be had right now (a token file missing
                or empty); the message names the variable or file, never its content.
        """

    @abstractmethod
    def refused_hint(self) -> str:
        """Why authsvc answers UNAUTHENTICATED to this kind of login, for the error message."""

    @abstractmethod
    def describe(self) -> str:
        """A repr fragment with nothing secret in it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class SecretLogin(Login):
    """The shared secret (`AUTHSVC_SERVICE_SECRET` / `_FILE`): what every source used before
    workload identity, and what `service_id=…, service_secret=…` still means."""

    kind = "secret"

    def __init__(self, service_id: str, secret: str) -> None:
        if not service_id or not secret:
            raise CredentialsError("service id and service secret must both be non-empty")
        self._service_id = service_id
        self._secret = secret

    @property
    def service_id(self) -> str:
        return self._service_id

    @property
    def secret(self) -> str:
        return self._secret

    def request(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int
    ) -> auth_pb2.IssueTokenRequest:
        return auth_pb2.IssueTokenRequest(
            service_id=self._service_id,
            service_secret=self._secret,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
        )

    def refused_hint(self) -> str:
        return "wrong secret, or unknown or disabled service"

    def describe(self) -> str:
        return "secret=<redacted>"


class AssertionLogin(Login):
    """RFC 7523 `private_key_jwt`: a fresh assertion signed with the service's own key at
    every refresh (the key never leaves the workload; a jti is single-use)."""

    kind = "assertion"

    def __init__(self, signer: AssertionSigner) -> None:
        self.signer = signer

    @property
    def service_id(self) -> str:
        return self.signer.service_id

    def request(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int
    ) -> auth_pb2.IssueTokenRequest:
        return auth_pb2.IssueTokenRequest(
            service_id=self.signer.service_id,
            client_assertion=self.signer.sign(),
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
        )

    def refused_hint(self) -> str:
        return (
            "key not registered for this service, assertion refused (clock skew, or an "
            "issuer other than authsvc's), or unknown or disabled service"
        )

    def describe(self) -> str:
        return f"assertion(key_id={self.signer.key_id!r})"


class CertificateLogin(Login):
    """RFC 8705 `tls_client_auth`: the channel to authsvc presents the client certificate
    (build it with `grpc.ssl_channel_credentials(..., private_key=…, certificate_chain=…)`),
    so the request names the service and carries no secret at all."""

    kind = "certificate"

    def __init__(self, service_id: str) -> None:
        if not service_id:
            raise CredentialsError("a certificate login needs the service id")
        self._service_id = service_id

    @property
    def service_id(self) -> str:
        return self._service_id

    def request(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int
    ) -> auth_pb2.IssueTokenRequest:
        return auth_pb2.IssueTokenRequest(
            service_id=self._service_id, audience=audience, scopes=scopes, ttl_seconds=ttl_seconds
        )

    def refused_hint(self) -> str:
        return (
            "no client certificate on the channel, or one not registered for this service, "
            "or unknown or disabled service"
        )

    def describe(self) -> str:
        return "certificate"


class WorkloadTokenLogin(Login):
    """A federated workload token (a Kubernetes projected service-account token, an OIDC ID
    token) exchanged with `ExchangeToken` for a token of the service bound to its subject.

    The file is read at every refresh: the kubelet replaces it at 80% of its lifetime, and a
    source that kept the first one would fail once it expired. It need not be owner-only
    (projected tokens are mounted 0644 by default); it must be small and hold one JWT.
    `service_id` is optional: when set, authsvc checks that it is the bound service.
    `variable` is what error messages call the file.
    """

    rpc = Rpc.EXCHANGE_TOKEN
    kind = "workload token"

    def __init__(
        self, path: str, service_id: str = "", *, variable: str = ENV_WORKLOAD_TOKEN_FILE
    ) -> None:
        if not path:
            raise CredentialsError(f"{variable}: no file given")
        self.path = path
        self.variable = variable
        self._service_id = service_id

    @property
    def service_id(self) -> str:
        return self._service_id

    def read(self) -> str:
        """The token now in the file.

        Raises:
            CredentialsError: missing, unreadable, not a regular file, too large, empty or
                not a JWT; the message names the variable, never the content.
        """
        name = self.variable
        try:
            with open(self.path, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise CredentialsError(f"{name}: not a regular file")
                data = handle.read(MAX_WORKLOAD_TOKEN_BYTES + 1)
        except OSError:
            raise CredentialsError(f"{name}: cannot read the file") from None
        if len(data) > MAX_WORKLOAD_TOKEN_BYTES:
            raise CredentialsError(
                f"{name}: the file is larger than {MAX_WORKLOAD_TOKEN_BYTES} bytes"
            )
        try:
            token = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CredentialsError(f"{name}: the file does not hold a JWT") from None
        if not token:
            raise CredentialsError(f"{name}: the file is empty")
        parts = token.split(".")
        if len(parts) != 3 or not all(parts[:2]) or any(c.isspace() for c in token):
            raise CredentialsError(f"{name}: the file does not hold a JWT")
        return token

    def request(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int
    ) -> auth_pb2.ExchangeTokenRequest:
        return auth_pb2.ExchangeTokenRequest(
            subject_token=self.read(),
            subject_token_type=JWT_TOKEN_TYPE,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            service_id=self._service_id,
        )

    def refused_hint(self) -> str:
        return (
            "the workload token is expired, from an issuer authsvc does not trust or for "
            "another audience, its subject is bound to no service (or to another than the one "
            "named), or the service is disabled"
        )

    def describe(self) -> str:
        return f"workload_token(file={self.path!r})"


# --- configuration from the environment ------------------------------------------------------


def _read_secret_file(path_text: str) -> str:
    """The secret in AUTHSVC_SERVICE_SECRET_FILE, by the one rule for credential files
    (`assertions.read_private_file`: owner-only, readable, not empty)."""
    data = read_private_file(path_text, ENV_SERVICE_SECRET_FILE)
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialsError(f"{ENV_SERVICE_SECRET_FILE}: cannot read the file") from None


def credentials_from_env(
    environ: Mapping[str, str] | None, target: str | None
) -> tuple[str, str, str]:
    """(service id, secret, target) from the `AUTHSVC_SERVICE_*` variables, by the client's
    rules (one of inline or file, the file private to its owner); the server's CLI uses the
    same function so that both read credentials alike.

    Raises:
        CredentialsError: a variable is missing, both are set, or the file is unsafe.
    """
    env = os.environ if environ is None else environ
    service_id = env.get(ENV_SERVICE_ID, "").strip()
    if not service_id:
        raise CredentialsError(f"{ENV_SERVICE_ID} is not set")
    inline = env.get(ENV_SERVICE_SECRET, "")
    file_path = env.get(ENV_SERVICE_SECRET_FILE, "")
    if inline and file_path:
        raise CredentialsError(
            f"set only one of {ENV_SERVICE_SECRET} and {ENV_SERVICE_SECRET_FILE}"
        )
    if file_path:
        secret = _read_secret_file(file_path)
    elif inline.strip():
        secret = inline.strip()
    else:
        raise CredentialsError(f"{ENV_SERVICE_SECRET} or {ENV_SERVICE_SECRET_FILE} must be set")
    resolved = target or env.get(ENV_TARGET, "").strip()
    if not resolved:
        raise CredentialsError(f"{ENV_TARGET} is not set and no target was given")
    return service_id, secret, resolved


@dataclass(frozen=True)
class EnvLogin:
    """What the environment configures: the login method, authsvc's address, and the channel
    credentials to reach it with (None: `channel_for_target`'s default for the target)."""

    login: Login
    target: str
    channel_credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)


# Each way to log in, by the variables that select it (the first names it in messages).
_LOGIN_VARIABLES: tuple[tuple[str, ...], ...] = (
    (ENV_SERVICE_SECRET, ENV_SERVICE_SECRET_FILE),
    (ENV_SERVICE_KEY_FILE,),
    (ENV_TLS_CLIENT_CERT, ENV_TLS_CLIENT_KEY),
    (ENV_WORKLOAD_TOKEN_FILE,),
)
_NO_LOGIN = (
    "no credentials for authsvc: set one of AUTHSVC_SERVICE_SECRET or "
    "AUTHSVC_SERVICE_SECRET_FILE (a shared secret), AUTHSVC_SERVICE_KEY_FILE (a private key "
    "signing assertions), AUTHSVC_TLS_CLIENT_CERT with AUTHSVC_TLS_CLIENT_KEY (mTLS), or "
    "AUTHSVC_WORKLOAD_TOKEN_FILE (a federated workload token)"
)


def _read_pem(path_text: str, variable: str, marker: bytes) -> bytes:
    """A public PEM file (a certificate or CA bundle); it need not be private."""
    try:
        data = Path(path_text).read_bytes()
    except OSError:
        raise CredentialsError(f"{variable}: cannot read the file") from None
    if marker not in data:
        raise CredentialsError(f"{variable}: the file holds no PEM certificate")
    return data


def _tls_credentials(env: Mapping[str, str], *, client: bool) -> grpc.ChannelCredentials | None:
    """TLS to authsvc from AUTHSVC_TLS_CA (roots; system roots when unset) and, for the
    certificate login, the client's pair (the key file owner-only, like every private file).
    None when nothing is configured (the target then decides, `channel_for_target`)."""
    ca_path = env.get(ENV_TLS_CA, "").strip()
    if not ca_path and not client:
        return None
    roots = _read_pem(ca_path, ENV_TLS_CA, _PEM_CERTIFICATE) if ca_path else None
    key = chain = None
    if client:
        chain = _read_pem(env[ENV_TLS_CLIENT_CERT].strip(), ENV_TLS_CLIENT_CERT, _PEM_CERTIFICATE)
        key = read_private_file(env[ENV_TLS_CLIENT_KEY].strip(), ENV_TLS_CLIENT_KEY)
        if b"PRIVATE KEY-----" not in key:
            raise CredentialsError(f"{ENV_TLS_CLIENT_KEY}: the file holds no PEM private key")
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )


def tls_credentials_from_env(
    environ: Mapping[str, str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS to authsvc as the environment sets it, for a caller that brings its own bearer
    token rather than a login (the CLI's `token validate` and `revoke`): AUTHSVC_TLS_CA, and
    the client pair AUTHSVC_TLS_CLIENT_CERT with AUTHSVC_TLS_CLIENT_KEY when set, read by the
    same rules as login_from_env (the key file owner-only). None when neither is set: the
    target then decides (`channel_for_target`).

    Raises:
        CredentialsError: one of the pair without the other, a file unreadable, unsafe or not
            PEM. The message names the variable, never a value.
    """
    env = os.environ if environ is None else environ
    cert = env.get(ENV_TLS_CLIENT_CERT, "").strip()
    key = env.get(ENV_TLS_CLIENT_KEY, "").strip()
    if bool(cert) != bool(key):
        raise CredentialsError(f"{ENV_TLS_CLIENT_CERT} and {ENV_TLS_CLIENT_KEY} go together")
    return _tls_credentials(env, client=bool(cert))


def login_from_env(environ: Mapping[str, str] | None = None, target: str | None = None) -> EnvLogin:
    """The one login method the environment configures, by the client's rules.

    Exactly one of: AUTHSVC_SERVICE_SECRET or AUTHSVC_SERVICE_SECRET_FILE (a shared secret);
    AUTHSVC_SERVICE_KEY_FILE (assertions signed with that key, for AUTHSVC_ISSUER);
    AUTHSVC_TLS_CLIENT_CERT with AUTHSVC_TLS_CLIENT_KEY (mTLS); AUTHSVC_WORKLOAD_TOKEN_FILE
    (a federated token, exchanged). AUTHSVC_SERVICE_ID is required but for the workload
    token (there it is optional: authsvc checks it is the bound service). AUTHSVC_TLS_CA
    (when set) is the CA authsvc's certificate is checked against, whatever the login. Two
    ways at once are refused rather than one silently winning.

    Raises:
        CredentialsError: none or two configured, a variable missing, a file unsafe or
            unreadable. The message names the variables, never a value.
    """
    env = os.environ if environ is None else environ

    def value(name: str) -> str:
        return env.get(name, "").strip()

    chosen = [names for names in _LOGIN_VARIABLES if any(value(n) for n in names)]
    if len(chosen) > 1:
        named = [next(n for n in names if value(n)) for names in chosen]
        listed = " and ".join(named) if len(named) == 2 else ", ".join(named)
        raise CredentialsError(
            f"{listed} are {'both' if len(named) == 2 else 'all'} set: "
            "set only one way to log in to authsvc"
        )
    if not chosen:
        raise CredentialsError(_NO_LOGIN)
    resolved = target or value(ENV_TARGET)
    if not resolved:
        raise CredentialsError(f"{ENV_TARGET} is not set and no target was given")
    kind = chosen[0][0]
    if kind == ENV_SERVICE_SECRET:
        service_id, secret, _ = credentials_from_env(env, resolved)
        return EnvLogin(
            SecretLogin(service_id, secret), resolved, _tls_credentials(env, client=False)
        )
    if kind == ENV_WORKLOAD_TOKEN_FILE:
        workload = WorkloadTokenLogin(value(ENV_WORKLOAD_TOKEN_FILE), value(ENV_SERVICE_ID))
        workload.read()  # a missing file is a configuration error now, not at the first call
        return EnvLogin(workload, resolved, _tls_credentials(env, client=False))
    service_id = value(ENV_SERVICE_ID)
    if not service_id:
        raise CredentialsError(f"{ENV_SERVICE_ID} is not set")
    if kind == ENV_SERVICE_KEY_FILE:
        issuer = value(ENV_ISSUER)
        if not issuer:
            raise CredentialsError(
                f"{ENV_ISSUER} is not set: {ENV_SERVICE_KEY_FILE} signs assertions for "
                "authsvc's issuer, which must be given"
            )
        signer = AssertionSigner.from_file(
            value(ENV_SERVICE_KEY_FILE), service_id=service_id, issuer=issuer
        )
        return EnvLogin(AssertionLogin(signer), resolved, _tls_credentials(env, client=False))
    if not value(ENV_TLS_CLIENT_CERT) or not value(ENV_TLS_CLIENT_KEY):
        raise CredentialsError(f"{ENV_TLS_CLIENT_CERT} and {ENV_TLS_CLIENT_KEY} go together")
    return EnvLogin(CertificateLogin(service_id), resolved, _tls_credentials(env, client=True))
