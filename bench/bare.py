"""The floor of a remote check on this stack: a bare grpc.aio server, no authsvc code.

It serves `ValidateToken` and `ValidateTokenStream` under authsvc's own method names, on the
event loop authsvc picks by default (uvloop where installed), and answers every request with
one fixed ValidateTokenResponse, without decoding the request: the server CPU of a unary call
and of a stream message with nothing done inside. Side by side with the peer (bench.peer)
it says how much of authsvc's cost per remote check is gRPC's own Python server, which no
change inside authsvc can take away.

It also serves `IssueToken` as authsvc's issue path is built, with nothing else in it: the
request goes to one thread and back (authsvc's login batch: a queue, a thread that takes
every waiting request, a concurrent future per request answered from that thread), then one
RSA-2048 PKCS#1 v1.5 SHA-256 signature is made on the event loop, and a fixed answer is
returned. That is IssueToken's floor on this stack measured as one call, which the sum of a
signature and a bare unary call measured apart understates: the signature releases the GIL,
the thread takes it, and the loop then waits to get it back (BENCHMARKS, issue 16's sixth
round).

Run as `python -m bench.bare --answer-hex HEX` in its own process: it prints
`bench bare listening on HOST:PORT` once serving and stops when its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import os
import queue
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256

from bench.echo import ChildServer

SERVICE = "authsvc.v1.AuthService"
READY_LINE = "bench bare listening on "


# What IssueToken signs: a JWS signing input of the size authsvc's tokens have (header and
# claims, base64url); RSA's cost does not depend on the bytes.
_SIGNING_INPUT = b"e" * 420


class _Hop:
    """One thread that answers every request waiting for it, as authsvc's login batch does
    (authsvc.usecases.login_batch.LoginBatcher), doing no work of its own."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[concurrent.futures.Future[None]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="bare-hop", daemon=True).start()

    def submit(self) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(future)
        return future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for future in batch:
                if future.set_running_or_notify_cancel():
                    future.set_result(None)


async def serve(answer: bytes, issue_answer: bytes, key_bits: int) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    padding, hash_ = PKCS1v15(), SHA256()
    hop = _Hop()

    async def unary(_request: bytes, _context: Any) -> bytes:
        return answer

    async def issue(_request: bytes, _context: Any) -> bytes:
        await asyncio.wrap_future(hop.submit())
        key.sign(_SIGNING_INPUT, padding, hash_)
        return issue_answer

    async def stream(requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        async for _request in requests:
            yield answer

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ValidateToken": grpc.unary_unary_rpc_method_handler(unary),
            "IssueToken": grpc.unary_unary_rpc_method_handler(issue),
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

    def __init__(self, answer: bytes, issue_answer: bytes = b"", key_bits: int = 2048) -> None:
        """`key_bits`: the size of the key IssueToken signs with (the measured authsvc's)."""
        argv = [
            "-m",
            "bench.bare",
            f"--answer-hex={answer.hex()}",
            f"--issue-answer-hex={issue_answer.hex()}",
            f"--key-bits={key_bits}",
        ]
        super().__init__("bare grpc.aio", argv, READY_LINE, dict(os.environ))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare")
    p.add_argument("--answer-hex", required=True, help="the ValidateTokenResponse, serialized")
    p.add_argument("--issue-answer-hex", default="", help="the IssueTokenResponse, serialized")
    p.add_argument("--key-bits", type=int, default=2048, help="RSA key size IssueToken signs with")
    args = p.parse_args(argv)
    answers = bytes.fromhex(args.answer_hex), bytes.fromhex(args.issue_answer_hex)
    if event_loop() == "uvloop":
        import uvloop

        uvloop.run(serve(*answers, args.key_bits))
    else:
        asyncio.run(serve(*answers, args.key_bits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
