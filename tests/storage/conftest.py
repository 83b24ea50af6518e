"""Fixtures for the storage conformance suite: one schema (via migrations) per dialect."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.models import Base
from authsvc.storage.repository import Repository
from tests.support.postgres import fresh_postgres_database

DIALECTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(dialect: str, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet), fresh for this test."""
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture(scope="session")
def _migrated_postgres() -> Iterator[str]:
    # Migrated once per session; each test empties it (migrating a new database per test
    # would triple the suite's run time). Migration tests use `database_url` instead.
    with fresh_postgres_database() as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()
        yield url


@pytest.fixture
def migrated_url(dialect: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database at head with no rows, shared by everything this test opens."""
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'authsvc.db'}"
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()
        return url
    url = str(request.getfixturevalue("_migrated_postgres"))
    engine = make_engine(url)
    try:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    eng = make_engine(migrated_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def repo(engine: Engine) -> Repository:
    return Repository(engine)
