"""Start real `authsvc serve` processes on free ports and talk to them over gRPC."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

# A fixed, valid test KEK: base64 of 32 random bytes (not a placeholder pattern).
TEST_KEK = "q0mJ5cXfHq3m0yN1Yw7u2o8Jk4Vb6sZt9eR1cA5dLkE="
TEST_ISSUER = "https://authsvc.test.invalid"


def authsvc_command() -> list[str]:
    script = Path(sys.executable).with_name("authsvc")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "authsvc.cli"]


def base_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    env.update(
        {
            "AUTHSVC_DATABASE_URL": database_url,
            "AUTHSVC_KEK": TEST_KEK,
            "AUTHSVC_ISSUER": TEST_ISSUER,
            "AUTHSVC_SYNC_INTERVAL_SECONDS": "0.2",
            # On-demand rotations wait until the next key has been published for the lead
            # (authsvc.keys.rotator); tests rotate back to back unless they test the lead.
            "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run_cli(
    env: Mapping[str, str], *args: str, input_text: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*authsvc_command(), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        input=input_text,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"authsvc {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def create_service(env: Mapping[str, str], name: str, *grants: str, admin: bool = False) -> str:
    """`authsvc services create NAME --grant AUDIENCE=SCOPE…` (with `--admin`); its secret."""
    args = ["services", "create", name, "--json"]
    for grant in grants:
        args += ["--grant", grant]
    if admin:
        args.append("--admin")
    return str(json.loads(run_cli(env, *args).stdout)["service_secret"])


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    address: str
    env: dict[str, str]
    output: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None
    _channel: grpc.Channel | None = None
    # Set for a TLS server: `channel` (and so `stub`, `issue`) then speaks TLS.
    credentials: grpc.ChannelCredentials | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = self.open_channel(self.credentials)
        return self._channel

    def open_channel(self, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        """A new channel of the caller's own (plaintext when `credentials` is None)."""
        if credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, credentials)

    @property
    def stub(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, check=check)

    def create_service(
        self,
        name: str,
        audiences: list[str],
        scopes: list[str] | None = None,
        *,
        admin: bool = False,
    ) -> str:
        args = ["services", "create", name, "--json"]
        for a in audiences:
            args += ["--audience", a]
        for s in scopes or []:
            args += ["--scope", s]
        if admin:
            args.append("--admin")
        return str(json.loads(self.cli(*args).stdout)["service_secret"])

    def issue(
        self,
        service_id: str,
        secret: str,
        audience: str,
        scopes: list[str] | None = None,
        ttl: int = 0,
    ) -> auth_pb2.IssueTokenResponse:
        return self.stub.IssueToken(  # type: ignore[no-any-return]
            auth_pb2.IssueTokenRequest(
                service_id=service_id,
                service_secret=secret,
                audience=audience,
                scopes=scopes or [],
                ttl_seconds=ttl,
            ),
            timeout=10,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.close_output()
        return code

    def close_output(self) -> None:
        if self.pump is not None:
            self.pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _pump(stream: object, sink: queue.Queue[str], keep: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        keep.append(line)
        sink.put(line)


def start_server(
    env: Mapping[str, str],
    *extra_args: str,
    timeout: float = 60,
    credentials: grpc.ChannelCredentials | None = None,
) -> RunningServer:
    """Start `authsvc serve --listen 127.0.0.1:0` and wait until it reports its port.

    With TLS in `env` (AUTHSVC_TLS_CERT/KEY), pass the client's `credentials` for `channel`.
    """
    proc = subprocess.Popen(
        [*authsvc_command(), "serve", "--listen", "127.0.0.1:0", *extra_args],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines, output), daemon=True)
    pump.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith("authsvc listening on "):
            address = line.split()[3]
            return RunningServer(
                proc=proc,
                address=address,
                env=dict(env),
                output=output,
                pump=pump,
                credentials=credentials,
            )
    proc.kill()
    proc.wait()
    pump.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    raise AssertionError("authsvc serve did not start:\n" + "".join(output)[-4000:])


@contextmanager
def running_server(env: Mapping[str, str], *extra_args: str) -> Iterator[RunningServer]:
    server = start_server(env, *extra_args)
    try:
        yield server
    finally:
        server.stop()
