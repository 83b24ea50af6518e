"""The strict RS256 access-token verifier (RFC 7515/7519/8725/9068) for server and clients."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256

from authsvc_client._b64 import b64url_decode_canonical, b64url_decode_lenient
from authsvc_client.binding import (
    CONFIRMATION_CLAIM,
    THUMBPRINT_MEMBER,
    is_thumbprint,
    thumbprint_matches,
)
from authsvc_client.claims import (
    ACTOR_CLAIM,
    ALGORITHM,
    DEFAULT_LEEWAY_SECONDS,
    DEFAULT_MAX_TOKEN_BYTES,
    DELEGATION_PARENTS_CLAIM,
    MAX_DELEGATION_DEPTH,
    SCOPE_CLAIM,
    TOKEN_TYPE,
    ValidationResult,
    valid_result,
)
from authsvc_client.errors import (
    BadSignature,
    Expired,
    InsufficientScope,
    Malformed,
    NotYetValid,
    Revoked,
    ServiceDisabled,
    TokenInvalid,
    UnknownKey,
    WrongAudience,
    WrongIssuer,
)
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.v1 import auth_pb2

__all__ = ["TokenVerifier"]

# RFC 7515 section 4: the only header parameters we accept. Anything else, notably jku, jwk,
# x5u, x5c (keys named by the token itself; RFC 8725 section 3.10) and crit (section 4.1.11:
# extensions we would be obliged to understand), makes the token MALFORMED.
_HEADER_NAMES = frozenset(("alg", "typ", "kid"))
# RFC 9068 section 2.1 / RFC 7515 section 4.1.9: "at+jwt", optionally with the "application/"
# prefix, compared case-insensitively like any media type.
_TOKEN_TYPES = frozenset((TOKEN_TYPE, "application/" + TOKEN_TYPE))
# Largest NumericDate a protobuf Timestamp can carry (9999-12-31T23:59:59Z); beyond it the
# claims could not be sent on in a ValidateTokenResponse.
_MAX_NUMERIC_DATE = 253_402_300_799
_UTF8_BOM = b"\xef\xbb\xbf"
# Bytes outside the base64 and base64url alphabets, dropped before the lenient read so that junk
# spliced into a revoked token (spaces, newlines, '!') still reads as that token: REVOKED, not
# MALFORMED. Nothing read this way is trusted; the canonical check comes later.
_NOT_BASE64 = bytes(
    sorted(
        set(range(256))
        - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=")
    )
)
# Header segments known good (exact bytes -> kid); cleared when full, since anyone can mint
# headers that pass the header rules.
_HEADER_CACHE_SIZE = 256
# RFC 7518 section 3.3: RS256 is RSASSA-PKCS1-v1_5 with SHA-256.
_PADDING = PKCS1v15()
_HASH = SHA256()
# RFC 8705 section 3: a bound token presented without its certificate, or with another one.
# (Returned, not raised: the check runs last but one, after every claim check, on every use.)
_CERTIFICATE_MISMATCH = ValidationResult.fail(auth_pb2.CERTIFICATE_MISMATCH)
# The only confirmation method authsvc issues; a `cnf` naming any other (RFC 7800 jwk, RFC
# 9449 jkt…) is a binding this verifier cannot check, so the token is MALFORMED, never bearer.
_CNF_MEMBERS = frozenset((THUMBPRINT_MEMBER,))
_ACT_MEMBERS = frozenset(("sub", ACTOR_CLAIM))


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 section 5.2 / RFC 7519 section 4: duplicate member names MUST be rejected, since
    # parsers disagree about which one wins.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would otherwise become inf
        raise ValueError("number out of range")
    return value


_JSON = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_no_constant,
    parse_float=_finite_float,
)
# The scanner under _JSON.decode: every JSONDecoder has one, but typeshed does not declare it.
_scan: Callable[[str, int], tuple[Any, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def _json_object(text: str) -> Any:
    """_JSON.decode(text), minus its two whitespace regex passes and a Python frame when the
    text starts with the object itself (as authsvc issues it). Anything else, and any text
    with more after the object, takes _JSON.decode, so errors and values are always _JSON's.
    """
    if text.startswith("{"):
        try:
            obj, end = _scan(text, 0)
        except StopIteration:  # what raw_decode turns into "Expecting value"
            return _JSON.decode(text)
        if end == len(text):
            return obj
    return _JSON.decode(text)


def _parse_segment(segment: bytes) -> tuple[dict[str, Any], bool]:
    """Read a header or payload segment as a JSON object, and say whether its base64url was
    canonical; the object is not yet trusted, and a non-canonical one is still read (for the
    revocation check) but must end MALFORMED."""
    raw = b64url_decode_canonical(segment)
    canonical = raw is not None
    try:
        if raw is None:
            raw = b64url_decode_lenient(segment.translate(None, _NOT_BASE64))
        if raw.startswith(_UTF8_BOM):  # RFC 8259 section 8.1: MUST NOT add a BOM
            raise Malformed
        text = raw.decode("utf-8")  # strict: invalid UTF-8 and encoded surrogates fail
        obj = _json_object(text)
        if 92 in raw and "\\u" in text:  # 92 is a backslash; an int scans the bytes fastest
            # An escaped lone surrogate parses to a str that cannot be encoded as UTF-8 and
            # would crash protobuf serialisation later; only escapes can produce one.
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        raise Malformed from None
    if not isinstance(obj, dict):
        raise Malformed
    return obj, canonical


def _cnf(payload: dict[str, Any]) -> str:
    """RFC 8705 section 3.1: the `x5t#S256` a bound token's `cnf` holds, "" without `cnf`.

    Raises:
        Malformed: a `cnf` that is not exactly {"x5t#S256": <base64url SHA-256>}.
    """
    cnf = payload.get(CONFIRMATION_CLAIM)
    if cnf is None and CONFIRMATION_CLAIM not in payload:
        return ""
    if type(cnf) is not dict or cnf.keys() != _CNF_MEMBERS:
        raise Malformed
    thumbprint = cnf[THUMBPRINT_MEMBER]
    if not is_thumbprint(thumbprint):
        raise Malformed
    return thumbprint  # type: ignore[no-any-return]


def _delegation(payload: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The actor chain of RFC 8693 section 4.1 `act` (nested, outermost = current actor) and
    the parent jtis, both nearest first; ((), ()) for a direct token.

    Raises:
        Malformed: an `act` that is not nested objects of exactly {"sub": str[, "act": …]}, a
            chain deeper than MAX_DELEGATION_DEPTH, or parents that do not match the chain.
    """
    act = payload.get(ACTOR_CLAIM)
    parents = payload.get(DELEGATION_PARENTS_CLAIM)
    if act is None:
        if ACTOR_CLAIM in payload or parents is not None or DELEGATION_PARENTS_CLAIM in payload:
            raise Malformed
        return (), ()
    actors: list[str] = []
    while act is not None:
        if type(act) is not dict or not act.keys() <= _ACT_MEMBERS or "sub" not in act:
            raise Malformed
        actor = act["sub"]
        if type(actor) is not str or not actor or len(actors) >= MAX_DELEGATION_DEPTH:
            raise Malformed
        actors.append(actor)
        act = act.get(ACTOR_CLAIM)
    if (
        type(parents) is not list
        or len(parents) != len(actors)
        or any(type(p) is not str or not p for p in parents)
    ):
        raise Malformed
    return tuple(actors), tuple(parents)


def _checked_kid(header: dict[str, Any]) -> str:
    """Apply the JOSE header rules; returns the kid."""
    # Exactly alg, typ and kid, all strings.
    if header.keys() != _HEADER_NAMES:
        raise Malformed
    alg, typ, kid = header["alg"], header["typ"], header["kid"]
    if type(alg) is not str or type(typ) is not str or type(kid) is not str:
        raise Malformed
    # RFC 8725 sections 3.1-3.2: the algorithm is pinned, never taken from the token
    # ("none" in any casing, HS256 keyed with our public key, RS384, PS256, ES256...).
    if alg != ALGORITHM:
        raise BadSignature
    # RFC 8725 section 3.11 explicit typing; ASCII-only case folding as for media types.
    if not typ.isascii() or typ.lower() not in _TOKEN_TYPES:
        raise Malformed
    return kid


class _Entry:
    """What a verified token still needs checked on each use; kept in the cache.

    The time limits are folded with the verifier's leeway once, here, rather than on every use.
    """

    __slots__ = (
        "actors",
        "aud",
        "cnf",
        "exp_limit",
        "iat",
        "iss",
        "jti",
        "kid",
        "parents",
        "result",
        "ring",
        "scopes",
        "start_limit",
        "sub",
    )

    def __init__(
        self,
        iss: str,
        sub: str,
        aud: str,
        jti: str,
        kid: str,
        iat: int,
        nbf: int,
        exp: int,
        scopes: tuple[str, ...],
        leeway: int,
        cnf: str,
        actors: tuple[str, ...] = (),
        parents: tuple[str, ...] = (),
    ) -> None:
        self.iss = iss
        self.sub = sub
        self.aud = aud
        self.jti = jti
        self.kid = kid
        self.iat = iat
        # RFC 7519 section 4.1.4: refused on or after exp (plus leeway).
        self.exp_limit = exp + leeway
        # RFC 7519 sections 4.1.5-4.1.6: refused before nbf, or if issued in the future; the
        # later of the two decides (checked as start_limit > now + leeway).
        self.start_limit = max(nbf, iat)
        self.scopes = frozenset(scopes)
        # RFC 8705 section 3.1 cnf.x5t#S256 ("" for an unbound token): checked on every use,
        # cached or not, against the certificate the token arrived with.
        self.cnf = cnf
        # RFC 8693 section 4.1 `act`, nearest actor first, and the jtis of the tokens this one
        # was exchanged from (DELEGATION_PARENTS_CLAIM), nearest first: each is checked on
        # every use, so revoking an actor service or any token up the chain revokes this one.
        self.actors = actors
        self.parents = parents
        client_id = actors[0] if actors else sub
        self.result = valid_result(
            iss, sub, aud, scopes, iat, nbf, exp, jti, kid, client_id, cnf, actors
        )
        # The last ring seen holding `kid`. Rings are immutable and replaced whole, so while
        # the current ring is this very object the kid is in it: no lookup needed.
        self.ring: KeyRing | None = None


# (token, audience, required scopes, certificate thumbprint) and (the entry, then the key ring,
# revocations version and subjects version read before its checks): TokenVerifier's memo.
_VerdictKey = tuple[str | bytes, str, tuple[str, ...], str]
_Verdict = tuple[_Entry, KeyRing, int, object]


def _no_subjects() -> None:
    """The subjects version of a verifier that never asks whether a subject is enabled."""
    return None


class TokenVerifier:
    """Checks authsvc access tokens offline against a KeyRing and a RevocationSet.

    Every security option is fixed and written out below rather than taken from the token:
    the algorithm is pinned to RS256, the key comes only from our own ring by kid, `typ` must
    say at+jwt, and every claim RFC 9068 section 2.2 requires must be present with its exact
    JSON type. Tokens that verified are cached by the SHA-256 of their exact bytes, so a repeat
    costs a hash and a few dictionary lookups; what can change (key ring, revocations, time,
    the caller's audience and scopes, whether the subject is enabled, and the certificate a
    certificate-bound token arrived with) is checked every time. A valid verdict is also
    remembered for the exact request (token, audience, scopes, certificate): reused while the
    key ring, the revocation set's version and the subjects' version are the ones it was
    reached under and the token is inside its time bounds, it costs one lookup.
    """

    def __init__(
        self,
        *,
        keys: Callable[[], KeyRing],
        revocations: RevocationSet,
        issuer: str,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        is_subject_enabled: Callable[[str], bool] | None = None,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        on_unknown_kid: Callable[[str], KeyRing | None] | None = None,
        subjects_version: Callable[[], object] | None = None,
    ) -> None:
        """Fix the verification policy; nothing about it is read from tokens.

        Args:
            keys: returns the current ring; called once per verification, so swapping the
                ring takes effect at once (a key removed by revoke_previous stops its tokens,
                cached or not).
            revocations: consulted on every verification.
            issuer: the exact `iss` required (RFC 8725 section 3.8).
            leeway_seconds: clock skew allowed on exp, nbf and iat.
            max_token_bytes: longer tokens are MALFORMED before any decoding.
            is_subject_enabled: False makes the subject's tokens SERVICE_DISABLED.
            cache_size: verified tokens remembered (oldest evicted first); 0 disables it.
            clock: epoch seconds, used when verify() gets no `now`.
            on_unknown_kid: called once with a kid not in the ring (say, to refetch the JWK
                Set); it may return the new ring. It should rate-limit itself, since the kid
                comes from the token. An exception from it counts as "still unknown".
            subjects_version: returns an object that is replaced (a new identity) whenever an
                answer of is_subject_enabled may have changed. With it, or without
                is_subject_enabled, a valid verdict is reused for the same token, audience,
                scopes and certificate while the ring, the revocations and it are unchanged
                and the token is within its time bounds (the verdict memo, below).
        """
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        if max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be positive")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        if not issuer:
            raise ValueError("issuer is required")
        self._keys = keys
        self._revocations = revocations
        self._issuer = issuer
        self._leeway = leeway_seconds
        self._max_bytes = max_token_bytes
        self._is_subject_enabled = is_subject_enabled
        self._cache_size = cache_size
        self._clock = clock
        self._on_unknown_kid = on_unknown_kid
        # sha256(token bytes) -> _Entry, in insertion order. Reads take no lock (one atomic
        # dict.get); every write, eviction included, holds _cache_lock.
        self._cache: dict[bytes, _Entry] = {}
        # jti -> digest of the cached token carrying it, so a revocation drops it at once.
        self._cached_jtis: dict[str, bytes] = {}
        self._cache_lock = threading.Lock()
        if cache_size:
            revocations.watch_jtis(self._drop_revoked)
        # Single atomic get/set/clear operations only, so no lock.
        self._headers: dict[bytes, str] = {}
        # The verdict memo: (token, audience, scopes, thumbprint) -> (entry, ring, revocations
        # version, subjects version) of a *valid* verdict, the three versions read before that
        # verdict's checks. Equal versions mean nothing _check reads has changed except the
        # time, which is compared on every reuse; anything else falls through to the cache and
        # _check. It skips the hashing and lookups of a cache hit (BENCHMARKS, issue 16's
        # fourth round). Only where every input to a verdict has a version: without
        # subjects_version an is_subject_enabled callback is opaque, so no memo.
        self._memo = bool(cache_size) and (is_subject_enabled is None or bool(subjects_version))
        self._subjects: Callable[[], object] = subjects_version or _no_subjects
        self._verdicts: dict[_VerdictKey, _Verdict] = {}

    def __repr__(self) -> str:
        return f"TokenVerifier(issuer={self._issuer!r}, cached={len(self._cache)})"

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens the cache holds now (at most cache_size)."""
        return len(self._cache)

    def verify(
        self,
        token: str | bytes,
        *,
        audience: str,
        required_scopes: Sequence[str] = (),
        now: float | None = None,
        client_cert_thumbprint: str | None = None,
    ) -> ValidationResult:
        """Validate a compact JWS access token for `audience`.

        Never raises for any token input: every problem with the token is a ValidationResult
        with valid=False and its reason.

        Args:
            client_cert_thumbprint: the RFC 8705 `x5t#S256` of the verified client
                certificate the token arrived with (binding.certificate_thumbprint), None or
                "" when the call carried none. A certificate-bound token (one with `cnf`) is
                valid only when this equals its `cnf.x5t#S256`, otherwise
                CERTIFICATE_MISMATCH; an unbound token ignores it.

        Raises:
            ValueError: audience is empty.
            TypeError: required_scopes is a single str (a sequence of names is expected).
        """
        if not audience:
            raise ValueError("audience is required")
        if isinstance(required_scopes, str):
            raise TypeError("required_scopes must be a sequence of scope names, not a str")
        if now is None:
            now = self._clock()
        try:
            # Size first, before any decoding (RFC 8725 section 3.4 spirit: bound the work).
            if isinstance(token, str):
                if len(token) > self._max_bytes or not token.isascii():
                    raise Malformed
                raw = token.encode()  # ASCII, so the UTF-8 encoder only copies
            elif isinstance(token, bytes):
                if len(token) > self._max_bytes or not token.isascii():
                    raise Malformed
                raw = token
            else:
                raise Malformed

            if not self._cache_size:  # nothing is ever cached, so no cache key either
                return self._check(
                    self._verify_signed(raw),
                    audience,
                    required_scopes,
                    now,
                    client_cert_thumbprint,
                    revocation_checked=True,
                )

            if self._memo:
                key: _VerdictKey = (
                    token,
                    audience,
                    tuple(required_scopes) if required_scopes else (),
                    client_cert_thumbprint or "",
                )
                versions = (self._keys(), self._revocations.version, self._subjects())
                seen = self._verdicts.get(key)
                if (
                    seen is not None
                    and seen[1] is versions[0]
                    and seen[2] == versions[1]
                    and seen[3] is versions[2]
                    # The two time bounds _check enforces (Expired, NotYetValid).
                    and now < seen[0].exp_limit
                    and seen[0].start_limit <= now + self._leeway
                ):
                    return seen[0].result

            # Cache key: the exact bytes, never the jti, so a token re-encoded or altered under
            # a cached jti misses and is verified in full.
            digest = hashlib.sha256(raw).digest()
            entry = self._cache.get(digest)
            if entry is not None:
                ring = self._keys()
                if (entry.ring is ring or entry.kid in ring) and now < entry.exp_limit:
                    entry.ring = ring  # any thread may store it: every candidate holds the kid
                    result = self._check(
                        entry, audience, required_scopes, now, client_cert_thumbprint
                    )
                    if self._memo and result is entry.result:
                        self._memorize(key, (entry, *versions))
                    return result
                # Key gone or token expired: forget it and let a full verification decide.
                self._forget(digest)

            entry = self._verify_signed(raw)
            if now < entry.exp_limit:
                self._remember(digest, entry)
            result = self._check(
                entry,
                audience,
                required_scopes,
                now,
                client_cert_thumbprint,
                revocation_checked=True,
            )
            if self._memo and result is entry.result:
                self._memorize(key, (entry, *versions))
            return result
        except TokenInvalid as exc:
            return ValidationResult.fail(exc.reason)

    def _verify_signed(self, raw: bytes) -> _Entry:
        """Decoding, revocation by the raw jti, header rules, key lookup and RSA."""
        # RFC 7515 section 7.1: compact serialisation only. JWE (5 parts, RFC 7516) and the JSON
        # serialisation are not access tokens here.
        h64, _, rest = raw.partition(b".")
        p64, dot, s64 = rest.partition(b".")
        if not dot or 46 in s64:  # not exactly two '.' (46); an int scans fastest
            raise Malformed
        # A header segment that already passed every header check needs no second look; the
        # outcome is a pure function of its bytes.
        kid = self._headers.get(h64)
        header: dict[str, Any] = {}
        header_canonical = True
        if kid is None:
            header, header_canonical = _parse_segment(h64)
        payload, payload_canonical = _parse_segment(p64)

        # Revocation before canonical-form checks: a revoked token stays REVOKED however its
        # base64 is respelled (padding, +/ alphabet).
        jti, sub, iat = payload.get("jti"), payload.get("sub"), payload.get("iat")
        if self._revocations.is_revoked(
            jti if type(jti) is str else "",
            sub if type(sub) is str else "",
            # Without an integer iat no service cutoff can apply; such a token is MALFORMED below.
            iat if type(iat) is int else sys.maxsize,
        ):
            raise self._revoked(
                sub if type(sub) is str else "", iat if type(iat) is int else sys.maxsize
            )

        # RFC 7515 section 2 / appendix C: base64url without padding, in canonical form, in
        # every segment; otherwise one signature would cover many token strings.
        if not header_canonical or not payload_canonical:
            raise Malformed
        signature = b64url_decode_canonical(s64)
        if signature is None:
            raise Malformed

        if kid is None:
            kid = _checked_kid(header)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()  # one entry per signing key in normal use
            self._headers[h64] = kid

        # RFC 8725 section 3.10 / RFC 7515 sections 4.1.2-4.1.6: the key is looked up only by
        # kid among our own keys; jku, x5u, jwk and x5c were refused above.
        key = self._keys().get(kid)
        if key is None and self._on_unknown_kid is not None:
            try:
                refreshed = self._on_unknown_kid(kid)
            except Exception:
                refreshed = None
            key = (refreshed if refreshed is not None else self._keys()).get(kid)
        if key is None:
            raise UnknownKey

        # RFC 7518 section 3.3 / RFC 8017 section 8.2.2: the signature is exactly k octets
        # (k = modulus length); checked over the signing input exactly as sent.
        if len(signature) != (key.key_size + 7) // 8:
            raise BadSignature
        try:
            key.verify(signature, raw[: len(h64) + 1 + len(p64)], _PADDING, _HASH)
        except (InvalidSignature, ValueError):
            raise BadSignature from None

        return self._entry(payload, kid, jti, sub, iat)

    def _entry(self, payload: dict[str, Any], kid: str, jti: Any, sub: Any, iat: Any) -> _Entry:
        """RFC 9068 section 2.2 required claims with exact JSON types; extra claims ignored.

        jti, sub and iat are payload.get() of those names, already read for revocation.
        """
        try:
            iss, aud, scope = payload["iss"], payload["aud"], payload["scope"]
            exp, nbf, client_id = payload["exp"], payload["nbf"], payload["client_id"]
        except KeyError:
            raise Malformed from None
        # Every failure here is MALFORMED, so one expression makes all the checks.
        if (
            type(iss) is not str
            or type(sub) is not str
            or not sub
            # RFC 7519 allows an array; authsvc tokens carry exactly one audience, so an array
            # is refused rather than searched (no "any of" audience confusion).
            or type(aud) is not str
            or type(jti) is not str
            or not jti
            # RFC 7519 section 2 NumericDate, narrowed to an integer: bool is an int subclass in
            # Python and floats are not issued by authsvc, so both are refused by exact type.
            or type(exp) is not int
            or not 0 <= exp <= _MAX_NUMERIC_DATE
            or type(nbf) is not int
            or not 0 <= nbf <= _MAX_NUMERIC_DATE
            or type(iat) is not int
            or not 0 <= iat <= _MAX_NUMERIC_DATE
            or type(scope) is not str
            # RFC 8693 section 4.2 / RFC 6749 section 3.3: space-delimited scope-tokens (no
            # empty names, no tabs, controls or non-ASCII that another parser might split
            # differently).
            or (scope and SCOPE_CLAIM.fullmatch(scope) is None)
        ):
            raise Malformed
        actors, parents = _delegation(payload)
        # RFC 9068 section 2.2: client_id is the client that asked for the token: the subject
        # itself, or for a delegated token the current actor (RFC 8693 section 4.1).
        if client_id != (actors[0] if actors else sub):
            raise Malformed
        scopes = tuple(scope.split(" ")) if scope else ()
        return _Entry(
            iss,
            sub,
            aud,
            jti,
            kid,
            iat,
            nbf,
            exp,
            scopes,
            self._leeway,
            _cnf(payload),
            actors,
            parents,
        )

    def _check_chain(self, entry: _Entry) -> None:
        """A delegated token dies with any token it was exchanged from (revoked by jti), and
        with any actor service whose tokens were revoked or which is disabled since."""
        link = self._revocations.revoked_link(entry.parents, entry.actors, entry.iat)
        if link is not None:
            raise self._revoked(link, entry.iat) if link else Revoked
        enabled = self._is_subject_enabled
        if enabled is not None:
            for actor in entry.actors:
                if not enabled(actor):
                    raise ServiceDisabled

    def _revoked(self, subject: str, issued_at: int) -> type[Revoked] | type[ServiceDisabled]:
        """Disabling a service also revokes its tokens (so local validators learn of it);
        where the subject is known to be disabled (here, or by the revocation's kind on the
        feed), that is the reason authsvc gives, so every validator gives it too."""
        if self._is_subject_enabled is not None and not self._is_subject_enabled(subject):
            return ServiceDisabled
        if self._revocations.is_disabled(subject, issued_at):
            return ServiceDisabled
        return Revoked

    def _check(
        self,
        entry: _Entry,
        audience: str,
        required_scopes: Sequence[str],
        now: float,
        client_cert_thumbprint: str | None,
        *,
        revocation_checked: bool = False,
    ) -> ValidationResult:
        """The checks that can change between two uses of the same signed token.

        `revocation_checked`: _verify_signed has just made the token's own revocation check,
        with the same jti, subject and iat, in this very verification.
        """
        sub = entry.sub
        if not revocation_checked and self._revocations.is_revoked(entry.jti, sub, entry.iat):
            raise self._revoked(sub, entry.iat)
        if entry.actors:
            self._check_chain(entry)
        # RFC 7519 section 4.1.1 / RFC 8725 section 3.8: exact issuer.
        if entry.iss != self._issuer:
            raise WrongIssuer
        # RFC 7519 section 4.1.3 / RFC 8725 section 3.9: exact audience, the caller's own id.
        if entry.aud != audience:
            raise WrongAudience
        # RFC 7519 section 4.1.4: not accepted on or after exp (plus leeway).
        if now >= entry.exp_limit:
            raise Expired
        # RFC 7519 sections 4.1.5-4.1.6: not before nbf, and not issued in the future.
        if entry.start_limit > now + self._leeway:
            raise NotYetValid
        enabled = self._is_subject_enabled
        if enabled is not None and not enabled(sub):
            raise ServiceDisabled
        # RFC 8705 section 3: a bound token only from the holder of its certificate.
        if entry.cnf and not thumbprint_matches(entry.cnf, client_cert_thumbprint):
            return _CERTIFICATE_MISMATCH
        if required_scopes:
            granted = entry.scopes
            for scope in required_scopes:
                if scope not in granted:
                    raise InsufficientScope
        return entry.result

    def _remember(self, digest: bytes, entry: _Entry) -> None:
        with self._cache_lock:
            cache = self._cache
            if digest in cache:
                return
            while len(cache) >= self._cache_size:
                oldest = next(iter(cache))  # dicts keep insertion order
                self._unindex(oldest, cache.pop(oldest))
            cache[digest] = entry
            # A jti names one token; should two cached spellings share one (a forged copy
            # cannot verify, so only our own), the index keeps the newest, and the per-use
            # revocation check in _check still stops the other.
            self._cached_jtis[entry.jti] = digest

    def _memorize(self, key: _VerdictKey, verdict: _Verdict) -> None:
        with self._cache_lock:
            verdicts = self._verdicts
            while len(verdicts) >= self._cache_size:
                del verdicts[next(iter(verdicts))]  # the oldest: dicts keep insertion order
            verdicts[key] = verdict

    def _forget(self, digest: bytes) -> None:
        with self._cache_lock:
            entry = self._cache.pop(digest, None)
            if entry is not None:
                self._unindex(digest, entry)

    def _unindex(self, digest: bytes, entry: _Entry) -> None:
        """Callers hold _cache_lock; `entry` has just left the cache from under `digest`."""
        if self._cached_jtis.get(entry.jti) == digest:
            del self._cached_jtis[entry.jti]

    def _drop_revoked(self, jti: str) -> None:
        """RevocationSet watcher: a revoked token leaves the cache at once."""
        with self._cache_lock:
            digest = self._cached_jtis.pop(jti, None)
            if digest is not None:
                self._cache.pop(digest, None)
