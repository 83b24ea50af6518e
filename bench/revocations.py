"""Validation with 0 vs 1,000,000 revocations held, and the memory they take: in-process, and
through the ValidateToken RPC of servers holding them (seeded into a copy of the database)."""

from __future__ import annotations

import gc
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy import Table
from sqlalchemy.dialects import sqlite as sqlite_dialect

from authsvc.storage.models import RevocationRow
from authsvc_client.keyring import KeyRing
from authsvc_client.revocations import RevocationEntry, RevocationSet
from authsvc_client.verifier import TokenVerifier
from bench.local import paired_ratio, time_all


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def snapshot_database(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database in WAL mode (sqlite3's online backup)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def seed_revocations(database: Path, count: int, *, now: datetime | None = None) -> float:
    """Insert `count` jti revocations (authsvc's jti shape, expiries spread over an hour after
    15 minutes) into an SQLite authsvc database; returns the seconds it took.

    A benchmark fixture: the values go through the schema's own SQLAlchemy type processors, so
    they read back exactly as rows authsvc wrote, but without authsvc's one-transaction-per-
    revocation path (a million of those would take the whole benchmark's time).
    """
    started = time.perf_counter()
    table = cast(Table, RevocationRow.__table__)
    dialect = sqlite_dialect.dialect()
    to_db = table.c.expires_at.type.dialect_impl(dialect).bind_processor(dialect)
    assert to_db is not None
    now = now or datetime.now(UTC)
    created = to_db(now)
    expiries = [to_db(now + timedelta(seconds=900 + i)) for i in range(3600)]
    rows = ((secrets.token_urlsafe(18), expiries[i % 3600], created) for i in range(count))
    conn = sqlite3.connect(database)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO revocations (jti, expires_at, reason, created_at) "
                "VALUES (?, ?, 'bench', ?)",
                rows,
            )
    finally:
        conn.close()
    return time.perf_counter() - started


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
    rounds: int = 25,
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
