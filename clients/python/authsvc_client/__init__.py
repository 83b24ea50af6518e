"""authsvc client: generated stubs, token sources, call credentials and server interceptors."""

from __future__ import annotations

from authsvc_client.claims import ADMIN_SCOPE, TOKEN_TYPE, Claims, ValidationResult
from authsvc_client.credentials import AuthMetadataPlugin, BearerTokenInterceptor, call_credentials
from authsvc_client.delegation import AsyncDelegator, Delegator
from authsvc_client.errors import (
    AuthsvcClientError,
    CredentialsError,
    TokenInvalid,
    TokenRefused,
    TokenUnavailable,
    ValidatorUnavailable,
)
from authsvc_client.interceptors import (
    DEFAULT_PUBLIC_SERVICES,
    AuthServerInterceptor,
    MethodRule,
    current_claims,
    incoming_token,
)
from authsvc_client.keyring import KeyRing
from authsvc_client.logins import (
    AssertionLogin,
    CertificateLogin,
    Login,
    SecretLogin,
    WorkloadTokenLogin,
)
from authsvc_client.revocations import RevocationSet
from authsvc_client.tokens import (
    AccessToken,
    AsyncTokenSource,
    EnvLogin,
    TokenSource,
    TokenState,
    login_from_env,
)
from authsvc_client.validation import LocalValidator, RemoteValidator, Validator
from authsvc_client.verifier import TokenVerifier

__version__ = "0.1.0"

__all__ = [
    "ADMIN_SCOPE",
    "DEFAULT_PUBLIC_SERVICES",
    "TOKEN_TYPE",
    "AccessToken",
    "AssertionLogin",
    "AsyncDelegator",
    "AsyncTokenSource",
    "AuthMetadataPlugin",
    "AuthServerInterceptor",
    "AuthsvcClientError",
    "BearerTokenInterceptor",
    "CertificateLogin",
    "Claims",
    "CredentialsError",
    "Delegator",
    "EnvLogin",
    "KeyRing",
    "LocalValidator",
    "Login",
    "MethodRule",
    "RemoteValidator",
    "RevocationSet",
    "SecretLogin",
    "TokenInvalid",
    "TokenRefused",
    "TokenSource",
    "TokenState",
    "TokenUnavailable",
    "TokenVerifier",
    "ValidationResult",
    "Validator",
    "ValidatorUnavailable",
    "WorkloadTokenLogin",
    "__version__",
    "call_credentials",
    "current_claims",
    "incoming_token",
    "login_from_env",
]
