"""Fixtures: a real authsvc server (SQLite in a temp folder) shared by a test module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.postgres import postgres_url  # noqa: F401  (a fixture)
from tests.support.server import RunningServer, base_env, run_cli, start_server

ADMIN = "ops-admin"


@dataclass
class World:
    """A running server with an admin and two services registered."""

    server: RunningServer
    admin_secret: str = field(repr=False)
    orders_secret: str = field(repr=False)
    billing_secret: str = field(repr=False)

    def admin_token(self) -> str:
        return self.server.issue(ADMIN, self.admin_secret, "authsvc").access_token

    def admin_md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.admin_token()}")]

    def follower_token(self) -> str:
        """billing's scopeless token for authsvc itself: what a local validator in billing
        presents to WatchRevocations (a LocalValidator's `token_source`)."""
        return self.server.issue("billing", self.billing_secret, "authsvc").access_token


def sqlite_env(folder: Path, **extra: str) -> dict[str, str]:
    return base_env(f"sqlite:///{folder / 'authsvc.db'}", **extra)


def make_world(folder: Path, **extra: str) -> tuple[World, RunningServer]:
    env = sqlite_env(folder, **extra)
    run_cli(env, "db", "upgrade")
    server = start_server(env)
    world = World(
        server=server,
        admin_secret=server.create_service(ADMIN, [], [], admin=True),
        # orders may call billing with scopes billing.read/billing.write
        orders_secret=server.create_service(
            "orders", ["billing", "inventory"], ["billing.read", "billing.write"]
        ),
        billing_secret=server.create_service("billing", ["orders"], ["orders.read"]),
    )
    return world, server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w, server = make_world(tmp_path_factory.mktemp("authsvc"))
    try:
        yield w
    finally:
        server.stop()
