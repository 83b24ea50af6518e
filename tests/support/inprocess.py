"""Run an AuthsvcServer in this process (real grpc.aio server on port 0) with an injected clock."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from authsvc.config import Settings, load_settings
from authsvc.server.app import AuthsvcServer, build_core, create_service
from authsvc_client.v1 import auth_pb2_grpc
from tests.support.clock import FakeClock
from tests.support.server import TEST_ISSUER, TEST_KEK

# name -> (audiences, scopes); "admin" is always registered with the admin grant.
Services = Mapping[str, tuple[list[str], list[str]]]
Body = Callable[[AuthsvcServer, auth_pb2_grpc.AuthServiceStub, dict[str, str]], Awaitable[None]]


def in_process_settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings(
        {
            "AUTHSVC_KEK": TEST_KEK,
            "AUTHSVC_ISSUER": TEST_ISSUER,
            "AUTHSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
            # As tests.support.server.base_env: rotations back to back unless a test sets it.
            "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "0",
            **env,
        },
        {"listen": "127.0.0.1:0"},
    )


def run_in_process(settings: Settings, clock: FakeClock, services: Services, body: Body) -> None:
    """Register the services, start the server, run `body`, stop the server."""
    core = build_core(settings, clock)
    secrets = {"admin": create_service(core, "admin", [], [], admin=True)}
    for name, (audiences, scopes) in services.items():
        secrets[name] = create_service(core, name, audiences, scopes)
    core.dispose()

    async def main() -> None:
        server = AuthsvcServer(settings, clock)
        port = await server.start(io.StringIO())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await body(server, auth_pb2_grpc.AuthServiceStub(channel), secrets)
        finally:
            await server.stop()

    asyncio.run(main())
