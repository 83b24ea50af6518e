"""Fixtures: one real `authsvc serve` with its HTTP side port, shared by a test module."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import pytest

from tests.support.server import RunningServer, base_env, run_cli, start_server

ADMIN = "ops-admin"


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def http_get(url: str, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, exc.read())


def http_address(server: RunningServer) -> str:
    """The side port from the line serve prints before its gRPC line."""
    for line in server.output:
        if line.startswith("authsvc http listening on "):
            return line.split()[4]
    raise AssertionError("serve printed no 'authsvc http listening on' line")


@dataclass
class OpsServer:
    server: RunningServer
    base_url: str
    admin_secret: str = field(repr=False)
    orders_secret: str = field(repr=False)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return http_get(self.base_url + path, headers)

    def admin_md(self) -> list[tuple[str, str]]:
        token = self.server.issue(ADMIN, self.admin_secret, "authsvc").access_token
        return [("authorization", f"Bearer {token}")]


def start_ops_server(folder: Path, *extra_args: str, **env: str) -> OpsServer:
    environ = base_env(f"sqlite:///{folder / 'authsvc.db'}", **env)
    run_cli(environ, "db", "upgrade")
    server = start_server(environ, "--http-listen", "127.0.0.1:0", *extra_args)
    return OpsServer(
        server=server,
        base_url=f"http://{http_address(server)}",
        admin_secret=server.create_service(ADMIN, [], [], admin=True),
        orders_secret=server.create_service("orders", ["billing"], ["billing.read"]),
    )


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsServer]:
    # A rotation every 10 minutes: the JWKS may be cached for a tenth of that.
    o = start_ops_server(
        tmp_path_factory.mktemp("ops"), AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS="600"
    )
    try:
        yield o
    finally:
        o.server.stop()
