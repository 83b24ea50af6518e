"""Signs RFC 9068 access tokens as compact RS256 JWS, then verifies what it signed (SPIRE style)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.hashes import SHA256

from authsvc_client._b64 import b64url_encode
from authsvc_client.binding import CONFIRMATION_CLAIM, THUMBPRINT_MEMBER, is_thumbprint
from authsvc_client.claims import (
    ACTOR_CLAIM,
    ALGORITHM,
    DEFAULT_MAX_TOKEN_BYTES,
    DELEGATION_PARENTS_CLAIM,
    MAX_DELEGATION_DEPTH,
    SCOPE_TOKEN,
    TOKEN_TYPE,
    Claims,
)
from authsvc_client.keyring import MIN_RSA_KEY_BITS, KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.verifier import TokenVerifier

__all__ = ["IssuedToken", "TokenIssuer", "TokenTooLong", "UnsignedToken"]

_JTI_BYTES = 18  # 144 random bits (RFC 9068 section 2.2 / DESIGN: at least 128)
# Self-verifiers kept, one per signing key (kid) seen: a handful over a process's life.
_VERIFIERS_KEPT = 8
_PADDING = PKCS1v15()
_HASH = SHA256()


@dataclass(frozen=True)
class UnsignedToken:
    """A token's claims and signing input (header.payload), ready for an RS256 signature."""

    claims: Claims
    signing_input: str = field(repr=False)
    key_bits: int


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed token and its claims; repr shows the claims, never the token."""

    token: str = field(repr=False)
    claims: Claims


# Built once: json.dumps with any non-default option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _compact_json(obj: dict[str, object]) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


class TokenTooLong(ValueError):
    """The token would be longer than validators accept (AUTHSVC_MAX_TOKEN_BYTES): the
    request's fault (too many or too long scopes), refused before anything is signed."""

    def __init__(self, max_token_bytes: int) -> None:
        super().__init__(
            f"the token would be longer than {max_token_bytes} bytes "
            "(AUTHSVC_MAX_TOKEN_BYTES); request fewer scopes"
        )


class TokenIssuer:
    """Builds and signs access tokens for one issuer (`iss`)."""

    def __init__(self, issuer: str, *, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> None:
        """Sign as `issuer`.

        Args:
            issuer: the `iss` of every token.
            max_token_bytes: refuse to issue a token that validators with this limit would
                reject as MALFORMED (too many or too long scopes).
        """
        if not issuer:
            raise ValueError("issuer is required")
        self._issuer = issuer
        self._max_token_bytes = max_token_bytes
        # kid -> (the signing key, a verifier over its public half); plain dict get/set from
        # worker threads.
        self._verifiers: dict[str, tuple[RSAPrivateKey, TokenVerifier]] = {}
        # kid -> the encoded header segment, the same for every token signed under that kid.
        self._headers: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"TokenIssuer(issuer={self._issuer!r})"

    def issue(
        self,
        *,
        private_key: RSAPrivateKey,
        kid: str,
        subject: str,
        audience: str,
        scopes: Sequence[str],
        ttl_seconds: int,
        now: float,
        not_after: float | None = None,
        cert_thumbprint: str = "",
    ) -> IssuedToken:
        """Sign a token valid from int(now) for ttl_seconds, never past not_after.

        The same as prepare() then sign(); see both for the arguments and errors.
        """
        unsigned = self.prepare(
            key_bits=private_key.key_size,
            kid=kid,
            subject=subject,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            now=now,
            not_after=not_after,
            cert_thumbprint=cert_thumbprint,
        )
        return self.sign(unsigned, private_key)

    def prepare(
        self,
        *,
        key_bits: int,
        kid: str,
        subject: str,
        audience: str,
        scopes: Sequence[str],
        ttl_seconds: int,
        now: float,
        not_after: float | None = None,
        cert_thumbprint: str = "",
        actors: Sequence[str] = (),
        parent_jtis: Sequence[str] = (),
    ) -> UnsignedToken:
        """Everything but the signature, so the server can record a token's jti (audit) before
        it spends an RSA signature on it, and refuse a token that could not be issued first.

        Args:
            key_bits: the signing key's modulus length (the signature's length follows).
            not_after: the signing key's retirement time; exp is capped at it so that no
                token outlives the key's publication (SPIRE caps TTLs the same way).
            cert_thumbprint: the `x5t#S256` (authsvc_client.binding.certificate_thumbprint)
                of the verified client certificate the request arrived with; non-empty, it
                binds the token to that certificate (RFC 8705 section 3: `cnf`), so that a
                stolen copy is useless without the workload's private key.
            actors: a delegated token's chain, nearest actor first (RFC 8693 section 4.1
                `act`, nested, outermost = the current actor, who is also `client_id`);
                `parent_jtis` the jti of the token each actor exchanged, nearest first.

        Raises:
            ValueError: empty subject, audience or kid; a scope that is not an RFC 6749
                scope-token (SCOPE_TOKEN); ttl_seconds < 1; not_after leaves no validity; a
                key under 2048 bits; a cert_thumbprint that is not a base64url SHA-256; or a
                token longer than max_token_bytes.
        """
        if not subject or not audience or not kid:
            raise ValueError("subject, audience and kid are required")
        if isinstance(scopes, str):
            raise TypeError("scopes must be a sequence of scope names, not a str")
        if any(SCOPE_TOKEN.fullmatch(scope) is None for scope in scopes):
            raise ValueError("scope names must be RFC 6749 scope-tokens")
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be at least 1")
        if key_bits < MIN_RSA_KEY_BITS:
            raise ValueError(f"signing keys must be at least {MIN_RSA_KEY_BITS} bits")
        if cert_thumbprint and not is_thumbprint(cert_thumbprint):
            raise ValueError("cert_thumbprint must be a base64url SHA-256 (x5t#S256)")
        if len(actors) != len(parent_jtis) or len(actors) > MAX_DELEGATION_DEPTH:
            raise ValueError("one parent jti per actor, at most MAX_DELEGATION_DEPTH")
        if any(not a for a in actors) or any(not j for j in parent_jtis):
            raise ValueError("actors and parent jtis must be non-empty")
        iat = int(now)
        exp = iat + ttl_seconds
        if not_after is not None:
            exp = min(exp, int(not_after))
            if exp <= iat:
                raise ValueError("the signing key retires before the token would be valid")
        claims = Claims(
            issuer=self._issuer,
            subject=subject,
            audience=audience,
            scopes=tuple(scopes),
            issued_at=iat,
            not_before=iat,
            expires_at=exp,
            jti=secrets.token_urlsafe(_JTI_BYTES),
            key_id=kid,
            client_id=actors[0] if actors else subject,
            cert_thumbprint=cert_thumbprint,
            actors=tuple(actors),
        )
        header = self._headers.get(kid)
        if header is None:
            if len(self._headers) >= _VERIFIERS_KEPT:
                self._headers.clear()  # one entry per signing key in normal use
            # RFC 9068 section 2.1 header; RFC 7515 section 7.1 compact serialisation.
            header = self._headers[kid] = b64url_encode(
                _compact_json({"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid})
            )
        body: dict[str, object] = {
            "iss": claims.issuer,
            "sub": claims.subject,
            "aud": claims.audience,
            "exp": claims.expires_at,
            "nbf": claims.not_before,
            "iat": claims.issued_at,
            "jti": claims.jti,
            "scope": " ".join(claims.scopes),
            "client_id": claims.client_id,
        }
        if cert_thumbprint:
            # RFC 8705 section 3.1 / RFC 7800 section 3.1.
            body[CONFIRMATION_CLAIM] = {THUMBPRINT_MEMBER: cert_thumbprint}
        if actors:
            act: dict[str, object] | None = None
            for actor in reversed(actors):
                act = {"sub": actor} if act is None else {"sub": actor, ACTOR_CLAIM: act}
            body[ACTOR_CLAIM] = act
            body[DELEGATION_PARENTS_CLAIM] = list(parent_jtis)
        payload = _compact_json(body)
        signing_input = f"{header}.{b64url_encode(payload)}"
        # 4 base64 characters per 3 bytes, for a signature as long as the modulus.
        signature_chars = -(-((key_bits + 7) // 8) * 4 // 3)
        if len(signing_input) + 1 + signature_chars > self._max_token_bytes:
            raise TokenTooLong(self._max_token_bytes)
        return UnsignedToken(claims=claims, signing_input=signing_input, key_bits=key_bits)

    def sign(self, unsigned: UnsignedToken, private_key: RSAPrivateKey) -> IssuedToken:
        """RS256-sign a prepared token, then verify what was signed.

        Raises:
            ValueError: the key is not the size the token was prepared for.
            RuntimeError: the signed token did not verify to exactly its claims.
        """
        if private_key.key_size != unsigned.key_bits:
            raise ValueError("the token was prepared for a key of another size")
        signature = private_key.sign(unsigned.signing_input.encode("ascii"), _PADDING, _HASH)
        token = f"{unsigned.signing_input}.{b64url_encode(signature)}"
        self._self_verify(token, unsigned.claims, private_key)
        return IssuedToken(token=token, claims=unsigned.claims)

    def _self_verify(self, token: str, claims: Claims, private_key: RSAPrivateKey) -> None:
        """Run the token through the very verifier the fleet uses (SPIRE CredValidator)."""
        kept = self._verifiers.get(claims.key_id)
        if kept is not None and kept[0] is private_key:
            verifier = kept[1]
        else:
            # A kid names one key (its RFC 7638 thumbprint) but nothing here relies on it.
            ring = KeyRing({claims.key_id: private_key.public_key()})
            verifier = TokenVerifier(
                keys=lambda: ring,
                revocations=RevocationSet(),
                issuer=self._issuer,
                leeway_seconds=0,
                max_token_bytes=self._max_token_bytes,
                cache_size=0,
            )
            if len(self._verifiers) >= _VERIFIERS_KEPT:
                self._verifiers.clear()  # one entry per signing key in normal use
            self._verifiers[claims.key_id] = (private_key, verifier)
        result = verifier.verify(
            token,
            audience=claims.audience,
            required_scopes=claims.scopes,
            now=float(claims.issued_at),
            client_cert_thumbprint=claims.cert_thumbprint or None,
        )
        if not result.valid or result.claims != claims:
            raise RuntimeError("issued token failed self-verification")
