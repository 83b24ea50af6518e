"""Validation with 0 vs 1,000,000 revocations held, and the memory they take (in-process)."""

from __future__ import annotations

import gc
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.verifier import TokenVerifier
from bench.local import paired_ratio, time_all


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def filled_set(count: int, expires_at: int) -> tuple[RevocationSet, int]:
    """A RevocationSet holding `count` distinct jtis (authsvc's jti shape: 128 random bits,
    base64url), spread over an hour of expiry seconds; returns it and the resident memory it
    added (RSS, so allocator overhead counts too)."""
    gc.collect()
    before = _rss_bytes()
    revocations = RevocationSet()
    add = revocations.add
    for i in range(count):
        jti = secrets.token_urlsafe(16)
        add(RevocationEntry(i + 1, jti, None, None, expires_at + i % 3600))
    gc.collect()
    return revocations, _rss_bytes() - before


def run_revocations(
    *,
    token: str,
    key: RSAPublicKey,
    kid: str,
    audience: str,
    scopes: list[str],
    issuer: str,
    count: int = 1_000_000,
    rounds: int = 15,
) -> dict[str, Any]:
    ring = KeyRing({kid: key})
    started = time.perf_counter()
    full, held = filled_set(count, int(time.time()) + 900)
    fill_seconds = time.perf_counter() - started
    empty = RevocationSet()

    def verifier(revocations: RevocationSet, cache_size: int) -> Callable[[], object]:
        v = TokenVerifier(
            keys=lambda: ring, revocations=revocations, issuer=issuer, cache_size=cache_size
        )
        if not v.verify(token, audience=audience, required_scopes=scopes).valid:
            raise RuntimeError("benchmark token rejected")

        def call() -> object:
            return v.verify(token, audience=audience, required_scopes=scopes)

        return call

    timings = time_all(
        {
            "cold_empty": verifier(empty, 0),
            "cold_1m": verifier(full, 0),
            "cached_empty": verifier(empty, 10_000),
            "cached_1m": verifier(full, 10_000),
        },
        rounds=rounds,
    )
    us = {name: t.median_us for name, t in timings.items()}
    size = len(full)
    del full
    gc.collect()
    return {
        "revocations": size,
        "fill_seconds": round(fill_seconds, 1),
        "held_mb": round(held / 1e6, 1),
        "us_per_call": {name: round(v, 2) for name, v in us.items()},
        "ratios": {
            "cold_1m_over_empty": round(paired_ratio(timings["cold_1m"], timings["cold_empty"]), 3),
            "cached_1m_over_empty": round(
                paired_ratio(timings["cached_1m"], timings["cached_empty"]), 3
            ),
        },
    }
