"""The serving process's garbage-collector policy (BENCHMARKS 1d).

With thousands of WatchRevocations streams open, a full collection walks every stream's objects
and stalls the event loop (ValidateToken waits for it). The server freezes what start-up built
and makes full collections ten times rarer while it serves, and puts both back when it stops.
"""

from __future__ import annotations

import gc
from pathlib import Path

from authsvc.server.app import AuthsvcServer
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings, run_in_process


def test_serving_freezes_the_start_up_heap_and_stopping_restores_the_collector(
    tmp_path: Path,
) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    seen: dict[str, object] = {}

    async def body(
        server: AuthsvcServer, stub: auth_pb2_grpc.AuthServiceStub, secrets: dict[str, str]
    ) -> None:
        await stub.GetJwks(auth_pb2.GetJwksRequest())  # serving
        seen["frozen"] = gc.get_freeze_count()
        seen["threshold"] = gc.get_threshold()

    run_in_process(in_process_settings(tmp_path), FakeClock(), {}, body)
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 10_000
    assert seen["threshold"] == (before[0], before[1], 100)
    # A stopped server leaves the process's collector as it found it.
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
