"""PostgreSQL for tests: a throwaway database per test, skipped when absent (failed under CI)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "fresh_postgres_database",
    "postgres_url",
    "postgres_url_or_skip",
]

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_CONNECT_TIMEOUT_S = 3


def _base_url() -> URL:
    return make_url(os.environ.get("AUTHSVC_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)


def _libpq(url: URL) -> str:
    """The same URL as psycopg's own connect() wants it (no +driver)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _where(url: URL) -> str:
    # Host and port only: the configured URL may hold a password.
    return f"{url.host or 'localhost'}:{url.port or 5432}"


def _unreachable(url: URL, reason: str) -> NoReturn:
    message = f"PostgreSQL not reachable at {_where(url)}: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(message)


# Servers found unreachable in this session, with the reason: a dead host costs one timeout,
# not one per test.
_UNREACHABLE: dict[str, str] = {}


def _admin_connection(url: URL) -> psycopg.Connection[tuple[object, ...]]:
    where = _where(url)
    if where in _UNREACHABLE:
        _unreachable(url, _UNREACHABLE[where])
    try:
        return psycopg.connect(_libpq(url), autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        # First line only: libpq adds hints, never the password.
        _UNREACHABLE[where] = (str(exc).strip().splitlines() or ["error"])[0]
        _unreachable(url, _UNREACHABLE[where])


def postgres_url_or_skip() -> str:
    """The base test database URL, after checking the server answers (skip or fail if not)."""
    url = _base_url()
    with _admin_connection(url) as conn:
        conn.execute("SELECT 1")
    return url.render_as_string(hide_password=False)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create `authsvc_t_<hex>`, yield its SQLAlchemy URL, then drop it (WITH (FORCE))."""
    base = _base_url()
    name = f"authsvc_t_{secrets.token_hex(6)}"
    with _admin_connection(base) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connection(base) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test only (schema not created)."""
    with fresh_postgres_database() as url:
        yield url
