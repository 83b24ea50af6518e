"""RFC 8705 `tls_client_auth`: the identity in a verified client certificate, matched exactly.

gRPC verifies the chain against AUTHSVC_TLS_CLIENT_CA before a handler runs; this module only
reads the leaf it was given (the auth context's `x509_pem_cert`) and never looks at anything
but its subjectAltName: not the subject CN, not the issuer. A registered identity is either
a SPIFFE ID (a URI SAN, compared byte for byte: no case folding, no normalisation) or a DNS
name (compared case-insensitively, RFC 4343; no wildcards on either side).

`certificate_thumbprint` is the RFC 8705 section 3.1 `x5t#S256` a certificate-bound token
carries in `cnf`; the rule itself is `authsvc_client.binding.der_thumbprint`, the one validators
use, so what the server binds and what a validator compares cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authsvc.errors import InvalidArgument
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc_client.binding import der_thumbprint

__all__ = [
    "MAX_SPIFFE_ID_LENGTH",
    "CertificateMatch",
    "PeerIdentity",
    "binding_thumbprint",
    "certificate_thumbprint",
    "check_dns_san",
    "check_spiffe_id",
    "check_tls_san",
    "match_certificate",
    "peer_identity",
]

# SPIFFE ID spec section 2.3: at most 2048 bytes.
MAX_SPIFFE_ID_LENGTH = 2048
_MAX_PEM = 64 * 1024
# SPIFFE ID spec 2.1 / 2.2: trust domain [a-z0-9.-_], path segments [a-zA-Z0-9.-_].
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# RFC 1123 host names: LDH labels of 1-63 characters, not starting or ending with '-'.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_spiffe_id(value: str) -> str:
    """A SPIFFE ID fit to register (SPIFFE ID spec section 2), returned unchanged.

    Raises:
        InvalidArgument: not `spiffe://TRUST-DOMAIN/PATH` with a lower-case trust domain,
            non-empty path segments of [A-Za-z0-9._-] other than `.` and `..`, no trailing
            slash, query, fragment, port or user info, at most 2048 bytes.
    """
    if len(value.encode("utf-8")) > MAX_SPIFFE_ID_LENGTH:
        raise InvalidArgument(f"SPIFFE ID: at most {MAX_SPIFFE_ID_LENGTH} bytes")
    rest = value.removeprefix("spiffe://")
    if rest == value:
        raise InvalidArgument("SPIFFE ID: must start with 'spiffe://' (lower case)")
    trust_domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidArgument(
            "SPIFFE ID: the trust domain is lower-case letters, digits, '.', '-' and '_' "
            "(no port, no user info)"
        )
    if not slash or not path:
        raise InvalidArgument("SPIFFE ID: a workload ID needs a path (spiffe://domain/path)")
    for segment in path.split("/"):
        if not segment:
            raise InvalidArgument("SPIFFE ID: no empty path segments and no trailing '/'")
        if segment in {".", ".."}:
            raise InvalidArgument("SPIFFE ID: no '.' or '..' path segments")
        if not _PATH_SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                "SPIFFE ID: path segments are letters, digits, '.', '-' and '_' "
                "(no query, fragment or percent-encoding)"
            )
    return value


def check_dns_san(value: str) -> str:
    """A DNS name fit to register, lower-cased (DNS compares names case-insensitively).

    Raises:
        InvalidArgument: a wildcard, a trailing dot, an IP address, non-ASCII (use the
            A-label), an empty or over-long label, or more than 253 characters.
    """
    if "*" in value:
        raise InvalidArgument("DNS SAN: wildcards are refused; register the exact name")
    name = value.lower()
    if not name.isascii() or not 0 < len(name) <= 253:
        raise InvalidArgument("DNS SAN: 1-253 ASCII characters (use the A-label, xn--…)")
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(
            "DNS SAN: labels of 1-63 letters, digits and '-', separated by '.', no trailing dot"
        )
    if all(label.isdigit() for label in labels):
        raise InvalidArgument("DNS SAN: an IP address is not a DNS name")
    return name


def check_tls_san(value: str) -> str:
    """The canonical form of a `--tls-san`: a SPIFFE ID or a DNS name.

    Anything with `://` is taken as a URI SAN, and the only URI SANs accepted are SPIFFE IDs
    (an `https://` SAN is refused with a message that says so, not taken for a DNS name).

    Raises:
        InvalidArgument: see check_spiffe_id and check_dns_san.
    """
    if "://" in value or value.lower().startswith("spiffe:"):
        return check_spiffe_id(value)
    return check_dns_san(value)


@dataclass(frozen=True)
class PeerIdentity:
    """The subjectAltName identities of a client certificate, and its x5t#S256."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    thumbprint: str


def _load(cert_pem: str | bytes) -> x509.Certificate:
    raw = cert_pem.encode("ascii", "replace") if isinstance(cert_pem, str) else cert_pem
    if not raw.strip():
        raise WorkloadAuthError(Reason.NO_CERTIFICATE)
    if len(raw) > _MAX_PEM:
        raise WorkloadAuthError(Reason.TOO_LARGE)
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise WorkloadAuthError(Reason.MALFORMED) from None


def certificate_thumbprint(cert_pem: str | bytes) -> str:
    """RFC 8705 section 3.1 `x5t#S256`: base64url (no padding) of SHA-256 over the DER."""
    return _thumbprint(_load(cert_pem))


def binding_thumbprint(cert_pem: str | bytes) -> str:
    """What a token issued (or presented) on a call is bound to: the x5t#S256 of the call's
    verified client certificate, "" without one. TLS verified the certificate already; one
    that cannot be read here binds nothing rather than failing the call."""
    if not cert_pem:
        return ""
    try:
        return certificate_thumbprint(cert_pem)
    except WorkloadAuthError:
        return ""


def _thumbprint(cert: x509.Certificate) -> str:
    return der_thumbprint(cert.public_bytes(serialization.Encoding.DER))


def peer_identity(cert_pem: str | bytes) -> PeerIdentity:
    """The URI and DNS SANs of the leaf certificate gRPC verified, in certificate order.

    Raises:
        WorkloadAuthError: NO_CERTIFICATE (empty), MALFORMED (not a PEM certificate, or a
            subjectAltName that cannot be parsed), TOO_LARGE.
    """
    cert = _load(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PeerIdentity((), (), _thumbprint(cert))
    except ValueError:  # a malformed extension
        raise WorkloadAuthError(Reason.MALFORMED) from None
    return PeerIdentity(
        tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        tuple(san.get_values_for_type(x509.DNSName)),
        _thumbprint(cert),
    )


@dataclass(frozen=True)
class CertificateMatch:
    """The registered identity the certificate matched, and the thumbprint to bind tokens to."""

    identity: str
    thumbprint: str


def _matches(peer: PeerIdentity, registered: str) -> bool:
    if "://" in registered:
        # SPIFFE X.509-SVID section 2: an SVID holds exactly one URI SAN. A certificate with
        # several is no SVID, and which of them it "is" would be ambiguous.
        return len(peer.uris) == 1 and peer.uris[0] == registered
    wanted = registered.lower()
    return any(name.lower() == wanted for name in peer.dns_names)


def match_certificate(cert_pem: str | bytes, registered: Sequence[str]) -> CertificateMatch:
    """Authenticate a verified client certificate as one of a service's registered identities.

    Args:
        cert_pem: the leaf as gRPC gives it (auth context `x509_pem_cert`), already verified
            against the client CA bundle by the TLS layer.
        registered: the service's identities (check_tls_san forms).

    Raises:
        WorkloadAuthError: NO_CERTIFICATE, MALFORMED, or IDENTITY_MISMATCH when no SAN of
            the certificate equals a registered identity.
    """
    peer = peer_identity(cert_pem)
    for identity in registered:
        if _matches(peer, identity):
            return CertificateMatch(identity, peer.thumbprint)
    raise WorkloadAuthError(Reason.IDENTITY_MISMATCH)
