"""In-process validation cost of one RS256 token: TokenVerifier cold and cached, PyJWT, raw RSA."""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from authsvc_client import AuthServerInterceptor
from authsvc_client._b64 import b64url_decode
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationSet
from authsvc_client.validation import LocalValidator
from authsvc_client.verifier import TokenVerifier
from bench.echo import METHOD, echo
from bench.stats import median

# Every claim RFC 9068 section 2.2 requires that PyJWT knows how to require.
_PYJWT_REQUIRE = ["exp", "iat", "nbf", "jti", "iss", "aud", "sub"]


class _CallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


def interceptor_paths(
    validator: LocalValidator, token: str, scopes: list[str]
) -> dict[str, Callable[[], object]]:
    """What a sync grpc.server does per call around the handler, with and without the auth
    interceptor: handler lookup (through intercept_service) and the handler itself."""
    handler = grpc.unary_unary_rpc_method_handler(echo)
    details = _CallDetails(METHOD, (("authorization", f"Bearer {token}"),))
    interceptor = AuthServerInterceptor(validator, {METHOD: scopes})

    def continuation(_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    def plain() -> object:
        return continuation(details).unary_unary(b"ping", None)

    def intercepted() -> object:
        guarded = interceptor.intercept_service(continuation, details)
        assert guarded is not None
        return guarded.unary_unary(b"ping", None)

    if intercepted() != b"ping":
        raise RuntimeError("the interceptor refused the benchmark token")
    return {"handler_plain": plain, "handler_intercepted": intercepted}


@dataclass(frozen=True)
class Timing:
    name: str
    samples_us: list[float]  # µs per call, one per round, rounds aligned across candidates
    loops: int

    @property
    def median_us(self) -> float:
        return median(self.samples_us)

    @property
    def min_us(self) -> float:
        return min(self.samples_us)


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a/b within the same round: both ran within a fraction of a
    second of each other, so a neighbour's burst of load inflates both sides of one ratio
    instead of one side of the comparison."""
    return median(x / y for x, y in zip(a.samples_us, b.samples_us, strict=True))


def _calibrate(
    fn: Callable[[], object], target_seconds: float, timer: Callable[[], float]
) -> int:
    """Loops per round so that one round lasts about target_seconds."""
    loops = 1
    while True:
        elapsed = timeit.Timer(fn, timer=timer).timeit(loops)
        if elapsed >= target_seconds / 4:
            return max(1, int(loops * target_seconds / elapsed))
        loops *= 4


def time_all(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int = 25,
    round_seconds: float = 0.1,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """timeit rounds, interleaved across candidates so drift on a shared machine hits all of
    them alike. `timer=time.thread_time` counts this thread's CPU instead of wall time."""
    loops = {name: _calibrate(fn, round_seconds, timer) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            elapsed = timeit.Timer(fn, timer=timer).timeit(loops[name])
            samples[name].append(elapsed / loops[name] * 1e6)
    return {name: Timing(name, values, loops[name]) for name, values in samples.items()}


def run_local(
    *,
    token: str,
    key: RSAPublicKey,
    kid: str,
    audience: str,
    scopes: list[str],
    issuer: str,
    validator: LocalValidator | None = None,
    rounds: int = 25,
) -> dict[str, Any]:
    """Time each way of validating `token` and return µs per call and the ratios."""
    ring = KeyRing({kid: key})
    revocations = RevocationSet()
    cold = TokenVerifier(keys=lambda: ring, revocations=revocations, issuer=issuer, cache_size=0)
    cached = TokenVerifier(keys=lambda: ring, revocations=revocations, issuer=issuer)
    h64, p64, s64 = token.split(".")
    signing_input = f"{h64}.{p64}".encode()
    signature = b64url_decode(s64.encode())
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    padding, hash_ = PKCS1v15(), SHA256()

    def verify_cold() -> object:
        return cold.verify(token, audience=audience, required_scopes=scopes)

    def verify_cached() -> object:
        return cached.verify(token, audience=audience, required_scopes=scopes)

    def pyjwt(k: object) -> Callable[[], object]:
        def decode() -> object:
            return jwt.decode(
                token,
                k,  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=audience,
                issuer=issuer,
                options={"require": _PYJWT_REQUIRE},
            )

        return decode

    def raw_rsa() -> object:
        key.verify(signature, signing_input, padding, hash_)
        return None

    # IssueToken's floor: one RS256 signature with a key of the same size as authsvc's.
    signer = rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)

    def raw_sign() -> object:
        return signer.sign(signing_input, padding, hash_)

    # Each path must accept the token, or its timing would be of a failure path.
    for name, check in (("cold", verify_cold), ("cached", verify_cached)):
        outcome = check()
        if not getattr(outcome, "valid", False):
            raise RuntimeError(f"TokenVerifier ({name}) rejected the benchmark token")
    pyjwt(key)()
    raw_rsa()

    candidates: dict[str, Callable[[], object]] = {
        "raw_rsa_verify": raw_rsa,
        "verifier_cold": verify_cold,
        "verifier_cached": verify_cached,
        "pyjwt_decode": pyjwt(key),
        "pyjwt_decode_pem": pyjwt(pem),
        "raw_rsa_sign": raw_sign,
    }
    if validator is not None:
        if not validator.validate(token, required_scopes=scopes).valid:
            raise RuntimeError("LocalValidator rejected the benchmark token")

        def local_validate() -> object:
            return validator.validate(token, required_scopes=scopes)

        candidates["local_validator_cached"] = local_validate
        candidates.update(interceptor_paths(validator, token, scopes))

    started = time.perf_counter()
    timings = time_all(candidates, rounds=rounds)
    elapsed = time.perf_counter() - started
    raw = timings["raw_rsa_verify"]
    us = {name: t.median_us for name, t in timings.items()}
    extra: dict[str, float] = {}
    if "handler_intercepted" in us:
        extra["interceptor_us_per_call"] = round(
            median(
                x - y
                for x, y in zip(
                    timings["handler_intercepted"].samples_us,
                    timings["handler_plain"].samples_us,
                    strict=True,
                )
            ),
            2,
        )
    return {
        "rounds": rounds,
        "seconds": round(elapsed, 1),
        "us_per_call": {name: round(v, 2) for name, v in us.items()},
        "min_us_per_call": {name: round(t.min_us, 2) for name, t in timings.items()},
        "loops_per_round": {name: t.loops for name, t in timings.items()},
        "vs_raw_rsa": {
            name: round(paired_ratio(t, timings["raw_rsa_verify"]), 3)
            for name, t in timings.items()
            if name.startswith(("raw_rsa_verify", "verifier_", "pyjwt_", "local_"))
        },
        "ratios": {
            "cold_over_raw_rsa": round(paired_ratio(timings["verifier_cold"], raw), 3),
            "pyjwt_over_raw_rsa": round(paired_ratio(timings["pyjwt_decode"], raw), 3),
            "cold_over_pyjwt": round(
                paired_ratio(timings["verifier_cold"], timings["pyjwt_decode"]), 3
            ),
            "pyjwt_over_cached": round(
                paired_ratio(timings["pyjwt_decode"], timings["verifier_cached"]), 1
            ),
        },
        **extra,
    }


def verifier_timer(
    *, token: str, key: RSAPublicKey, kid: str, audience: str, scopes: list[str], issuer: str
) -> Callable[[], dict[str, float]]:
    """A short timing of TokenVerifier cold and cached and of the raw RSA verify (µs of this
    thread's CPU per call, median of 5 interleaved rounds), to run between another system's
    slices: CPU time, like the figure it is compared with (jose's process CPU per token), so
    that being descheduled by a neighbour does not count."""
    ring = KeyRing({kid: key})
    revocations = RevocationSet()
    cold = TokenVerifier(keys=lambda: ring, revocations=revocations, issuer=issuer, cache_size=0)
    cached = TokenVerifier(keys=lambda: ring, revocations=revocations, issuer=issuer)
    h64, p64, s64 = token.split(".")
    signing_input = f"{h64}.{p64}".encode()
    signature = b64url_decode(s64.encode())
    padding, hash_ = PKCS1v15(), SHA256()
    # IssueToken's floor, with a key of the same size as authsvc's.
    signer = rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    candidates: dict[str, Callable[[], object]] = {
        "raw_rsa_sign": lambda: signer.sign(signing_input, padding, hash_),
        "raw_rsa_verify": lambda: key.verify(signature, signing_input, padding, hash_),
        "verifier_cold": lambda: cold.verify(token, audience=audience, required_scopes=scopes),
        "verifier_cached": lambda: cached.verify(token, audience=audience, required_scopes=scopes),
    }
    for name in ("verifier_cold", "verifier_cached"):
        if not getattr(candidates[name](), "valid", False):
            raise RuntimeError(f"TokenVerifier ({name}) rejected the benchmark token")

    def timer() -> dict[str, float]:
        timed = time_all(candidates, rounds=5, timer=time.thread_time)
        return {name: t.median_us for name, t in timed.items()}

    return timer
