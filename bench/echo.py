"""A trivial unary RPC on a sync grpc.server, plain or behind AuthServerInterceptor (local mode).

Run as `python -m bench.echo --mode plain|local ...` in its own process: it prints
`bench echo listening on HOST:PORT` once serving and stops when its standard input closes,
so it never outlives the benchmark. `EchoProcess` is the parent's side.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from concurrent import futures

import grpc

from authsvc_client import AuthServerInterceptor
from authsvc_client.validation import LocalValidator

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"
SCOPE = "bench.call"
READY_LINE = "bench echo listening on "


def echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


def serve(mode: str, authsvc: str, audience: str, issuer: str, threads: int) -> int:
    handlers = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    interceptors: list[grpc.ServerInterceptor] = []
    validator: LocalValidator | None = None
    authsvc_channel: grpc.Channel | None = None
    if mode == "local":
        authsvc_channel = grpc.insecure_channel(authsvc)
        # The revocation feed authenticates as the service in AUTHSVC_SERVICE_ID/_SECRET.
        validator = LocalValidator(authsvc_channel, audience, issuer)
        if not validator.wait_ready(15):
            print("local validator did not get keys and the revocation feed", file=sys.stderr)
            return 1
        interceptors.append(AuthServerInterceptor(validator, {METHOD: [SCOPE]}))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), interceptors=interceptors)
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"{READY_LINE}127.0.0.1:{port}", flush=True)
    try:
        sys.stdin.read()  # EOF: the parent is done (or gone)
    finally:
        server.stop(1).wait()
        if validator is not None:
            validator.close()
        if authsvc_channel is not None:
            authsvc_channel.close()
    return 0


class ChildServer:
    """A benchmark server in its own process: it prints `ready_line` + HOST:PORT once serving
    and stops when its standard input closes; close() ends it."""

    def __init__(self, label: str, argv: list[str], ready_line: str, env: dict[str, str]) -> None:
        self.label = label
        self._ready_line = ready_line
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.address = self._wait_ready(30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(self._ready_line):
                    return line[len(self._ready_line) :].strip()
                if not line:
                    break
            elif self.proc.poll() is not None:
                break
        self.close()
        raise RuntimeError(f"bench server ({self.label}) did not start")

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class EchoProcess(ChildServer):
    """A running `python -m bench.echo`; close() ends it."""

    def __init__(
        self,
        mode: str,
        *,
        authsvc: str,
        audience: str,
        issuer: str,
        threads: int = 16,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """`credentials` (service id, secret) authenticate the local validator's revocation
        feed; they reach the child through its environment, never its command line."""
        self.mode = mode
        env = dict(os.environ)
        if credentials is not None:
            env.update(
                AUTHSVC_SERVICE_ID=credentials[0],
                AUTHSVC_SERVICE_SECRET=credentials[1],
                AUTHSVC_TARGET=authsvc,
            )
        argv = [
            "-m",
            "bench.echo",
            f"--mode={mode}",
            f"--authsvc={authsvc}",
            f"--audience={audience}",
            f"--issuer={issuer}",
            f"--threads={threads}",
        ]
        super().__init__(f"echo {mode}", argv, READY_LINE, env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo")
    p.add_argument("--mode", choices=["plain", "local"], required=True)
    p.add_argument("--authsvc", required=True, help="authsvc HOST:PORT (local mode)")
    p.add_argument("--audience", required=True, help="this service's id")
    p.add_argument("--issuer", required=True)
    p.add_argument("--threads", type=int, default=16)
    args = p.parse_args(argv)
    return serve(args.mode, args.authsvc, args.audience, args.issuer, args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
