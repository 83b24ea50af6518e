"""Workload identity without shared secrets: signed assertions (RFC 7523), client certificates
(RFC 8705) and federated tokens. Pure: no gRPC, no storage; the use cases wire them in."""

from __future__ import annotations

from authsvc.workload.assertions import VerifiedAssertion, claimed_service_id, verify_assertion
from authsvc.workload.certificates import (
    CertificateMatch,
    PeerIdentity,
    certificate_thumbprint,
    check_tls_san,
    match_certificate,
)
from authsvc.workload.errors import GENERIC_MESSAGE, Reason, WorkloadAuthError
from authsvc.workload.federation import (
    FederatedIdentity,
    FederationVerifier,
    StaticKeys,
    TrustedIssuer,
    load_jwks_file,
)
from authsvc.workload.jwks_fetch import FetchPolicy, JwksCache, check_jwks_url
from authsvc.workload.public_keys import RegisteredKey, key_from_jwk, parse_public_key

__all__ = [
    "GENERIC_MESSAGE",
    "CertificateMatch",
    "FederatedIdentity",
    "FederationVerifier",
    "FetchPolicy",
    "JwksCache",
    "PeerIdentity",
    "Reason",
    "RegisteredKey",
    "StaticKeys",
    "TrustedIssuer",
    "VerifiedAssertion",
    "WorkloadAuthError",
    "certificate_thumbprint",
    "check_jwks_url",
    "check_tls_san",
    "claimed_service_id",
    "key_from_jwk",
    "load_jwks_file",
    "match_certificate",
    "parse_public_key",
    "verify_assertion",
]
