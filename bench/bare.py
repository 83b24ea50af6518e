"""The floor of a remote check on this stack: a bare grpc.aio server, no authsvc code.

It serves `ValidateToken` and `ValidateTokenStream` under authsvc's own method names, on the
event loop authsvc picks by default (uvloop where installed), and answers every request with
one fixed ValidateTokenResponse, without decoding the request: the server CPU of a unary call
and of a stream message with nothing done inside. Side by side with the peer (bench.peer)
it says how much of authsvc's cost per remote check is gRPC's own Python server, which no
change inside authsvc can take away.

Run as `python -m bench.bare --answer-hex HEX` in its own process: it prints
`bench bare listening on HOST:PORT` once serving and stops when its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.echo import ChildServer

SERVICE = "authsvc.v1.AuthService"
READY_LINE = "bench bare listening on "


async def serve(answer: bytes) -> None:
    async def unary(_request: bytes, _context: Any) -> bytes:
        return answer

    async def stream(requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        async for _request in requests:
            yield answer

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ValidateToken": grpc.unary_unary_rpc_method_handler(unary),
            "ValidateTokenStream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{READY_LINE}127.0.0.1:{port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # EOF: the parent is done (or gone)
    await server.stop(1)


def event_loop() -> str:
    """The loop authsvc serves on by default (AUTHSVC_EVENT_LOOP=auto)."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


class BareProcess(ChildServer):
    """A running `python -m bench.bare`; close() ends it."""

    def __init__(self, answer: bytes) -> None:
        argv = ["-m", "bench.bare", f"--answer-hex={answer.hex()}"]
        super().__init__("bare grpc.aio", argv, READY_LINE, dict(os.environ))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare")
    p.add_argument("--answer-hex", required=True, help="the ValidateTokenResponse, serialized")
    args = p.parse_args(argv)
    answer = bytes.fromhex(args.answer_hex)
    if event_loop() == "uvloop":
        import uvloop

        uvloop.run(serve(answer))
    else:
        asyncio.run(serve(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
