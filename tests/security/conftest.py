"""Fixtures: one real authsvc per security test module, attacked over gRPC."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import make_world
from tests.security.forge import Target


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("authsvc-security")
    world, server = make_world(folder)
    try:
        yield Target(world, f"sqlite:///{folder / 'authsvc.db'}")
    finally:
        server.stop()


@pytest.fixture(scope="class")
def after_each_batch(target: Target) -> Iterator[None]:
    """Each test class is one attack batch; after it the server must be SERVING and still
    validate a genuine token (a teardown failure here fails the batch)."""
    target.assert_healthy()
    yield
    target.assert_healthy()
