"""Start authsvc (dev mode), billing and orders; show auth, denial, revocation and rotation."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

HERE = Path(__file__).resolve().parent
ISSUER = "https://authsvc.demo.invalid"


def authsvc() -> list[str]:
    script = Path(sys.executable).with_name("authsvc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "authsvc.cli"]


def start(cmd: list[str], env: dict[str, str], banner: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(  # noqa: S603 - our own commands
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(banner):
            # keep reading so the child never blocks on a full pipe
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split()[3]
    raise SystemExit(f"{cmd[-1]} did not start")


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.strip().splitlines() if "=" in line)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="authsvc-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    env.update(AUTHSVC_DEV="1", AUTHSVC_DEV_DIR=str(folder), AUTHSVC_ISSUER=ISSUER,
               PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[str]] = []
    try:
        server, target = start([*authsvc(), "serve", "--listen", "127.0.0.1:0"], env,
                               "authsvc listening on ")
        procs.append(server)
        print(f"1. authsvc (dev mode) on {target}")

        def cli(*args: str) -> str:
            return subprocess.run(  # noqa: S603 - our own commands
                [*authsvc(), *args], env=env, check=True, capture_output=True, text=True
            ).stdout

        orders_env = env_lines(cli("services", "create", "orders", "--audience", "billing",
                                   "--scope", "billing.write", "--format", "env"))
        print("   registered service orders (its secret stays in this process's memory)")
        # billing validates locally; its revocation feed is served to registered services only.
        billing_env = env_lines(cli("services", "create", "billing", "--audience", "orders",
                                    "--format", "env"))

        svc_env = {**env, "AUTHSVC_TARGET": target}
        billing, billing_addr = start([sys.executable, str(HERE / "billing.py")],
                                      {**svc_env, **billing_env}, "billing listening on ")
        procs.append(billing)
        orders, orders_addr = start(
            [sys.executable, str(HERE / "orders.py")],
            {**svc_env, **orders_env, "BILLING_TARGET": billing_addr},
            "orders listening on ",
        )
        procs.append(orders)
        print(f"   billing on {billing_addr}, orders on {orders_addr}")

        place = grpc.insecure_channel(orders_addr).unary_unary("/demo.Orders/Place")
        print("2. authenticated call orders -> billing:", place(b"42", timeout=10).decode())

        local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        billing_ch = grpc.secure_channel(billing_addr, local)
        charge = billing_ch.unary_unary("/demo.Billing/Charge")
        try:
            charge(b"1", timeout=5)
        except grpc.RpcError as exc:
            print(f"3. call without a token denied: {exc.code().name} ({exc.details()})")

        stub = auth_pb2_grpc.AuthServiceStub(  # type: ignore[no-untyped-call]
            grpc.insecure_channel(target)
        )
        token = stub.IssueToken(auth_pb2.IssueTokenRequest(
            service_id="orders", service_secret=orders_env["AUTHSVC_SERVICE_SECRET"],
            audience="billing"), timeout=5).access_token
        md = [("authorization", f"Bearer {token}")]
        print("4. token accepted before revocation:", charge(b"7", metadata=md, timeout=5).decode())
        started = time.monotonic()
        stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=5)
        while True:
            try:
                charge(b"7", metadata=md, timeout=5)
                time.sleep(0.005)
            except grpc.RpcError as exc:
                took = (time.monotonic() - started) * 1000
                print(f"   revoked token denied {took:.0f} ms later: {exc.code().name}")
                break

        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}

        def traffic() -> None:
            while not stop.is_set():
                try:
                    place(b"1", timeout=10)
                    counts["ok"] += 1
                except grpc.RpcError:
                    counts["failed"] += 1

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        rotated = cli("keys", "rotate").strip()
        new_token = stub.IssueToken(auth_pb2.IssueTokenRequest(
            service_id="orders", service_secret=orders_env["AUTHSVC_SERVICE_SECRET"],
            audience="billing"), timeout=5).access_token
        reply = charge(b"3", metadata=[("authorization", f"Bearer {new_token}")], timeout=5)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
        print(f"5. signing key rotated under traffic ({rotated}); token from the new key: "
              f"{reply.decode()}")
        print(f"   calls during rotation: {counts['ok']} ok, {counts['failed']} failed")
        if counts["failed"]:
            raise SystemExit("demo failed: calls failed during rotation")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
