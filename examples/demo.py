"""Start authsvc (dev mode), billing and orders; show auth, denial, revocation, rotation, a
secretless login, a delegation chain and a stolen certificate-bound token refused.

Certificate logins need authsvc over mTLS, and an mTLS authsvc (AUTHSVC_TLS_CLIENT_CA)
requires a client certificate of every caller. Rather than giving every demo service a
certificate (which would also bind all their tokens), the demo keeps the plaintext dev authsvc
for steps 1-6 and starts a second replica on the same AUTHSVC_DEV_DIR with TLS and the demo's
client CA (examples/demo_pki.py). Both replicas read one SQLite database (the services the CLI
registers, the signing keys under the one dev KEK); the demo checks that they publish the same
JWK Set, billing, whose validator follows the first replica, accepts the second's tokens, and
a token revoked at the second is refused by billing a sync interval later.
Billing adds an mTLS port where the bound token is checked against the caller's certificate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from demo_pki import DemoCa, Pair, signing_key

from authsvc_client import TokenSource, login_from_env
from authsvc_client.binding import certificate_thumbprint
from authsvc_client.unverified import unverified_payload
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

HERE = Path(__file__).resolve().parent
ISSUER = "https://authsvc.demo.invalid"
TRUST_DOMAIN = "spiffe://demo.invalid"
_PRINT = threading.Lock()


def say(*parts: object) -> None:
    """print(), one whole line at a time (children's lines are echoed from other threads)."""
    with _PRINT:
        print(*parts, flush=True)


def authsvc() -> list[str]:
    script = Path(sys.executable).with_name("authsvc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "authsvc.cli"]


class Child:
    """A child process whose output is read until its banner, then drained (and echoed,
    indented, when `echo`), so that it never blocks on a full pipe."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], banner: str, *,
                 echo: bool = False) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own commands
            cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.echo = echo
        self.lines: list[str] = []
        self._seen = threading.Condition()
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(banner):
                self.banner = line.split()
                break
        else:
            raise SystemExit(f"{Path(cmd[-1]).name} did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def address(self) -> str:
        return self.banner[3]

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.echo:
                say("  ", line.rstrip())
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 5.0) -> bool:
        """Whether the child printed a line containing `text` (so echoes keep their place)."""
        with self._seen:
            return self._seen.wait_for(lambda: any(text in x for x in self.lines), timeout)

    def stop(self) -> None:
        self.proc.terminate()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_echoed(cmd: list[str], env: Mapping[str, str], timeout: float = 30.0) -> int:
    """Run a one-shot child, echoing its output (indented) as it comes; its exit status."""
    proc = subprocess.Popen(  # noqa: S603 - our own script
        cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            say("  ", line.rstrip())
        return proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def env_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.strip().splitlines() if "=" in line)


def mtls(ca: Path, pair: Pair) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=pair.key.read_bytes(),
        certificate_chain=pair.cert.read_bytes(),
    )


def kids(jwks_json: str) -> list[str]:
    return sorted(key["kid"] for key in json.loads(jwks_json)["keys"])


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="authsvc-demo-"))
    try:
        run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path) -> None:
    folder, pki_dir = root / "authsvc", root / "pki"
    pki_dir.mkdir(mode=0o700)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    base["PYTHONUNBUFFERED"] = "1"
    env = {**base, "AUTHSVC_DEV": "1", "AUTHSVC_DEV_DIR": str(folder), "AUTHSVC_ISSUER": ISSUER}
    children: list[Child] = []
    try:
        server = Child([*authsvc(), "serve", "--listen", "127.0.0.1:0"], env,
                       "authsvc listening on ")
        children.append(server)
        target = server.address
        say(f"1. authsvc (dev mode) on {target}")

        def cli(*args: str) -> str:
            return subprocess.run(  # noqa: S603 - our own commands
                [*authsvc(), *args], env=env, check=True, capture_output=True, text=True
            ).stdout

        orders_env = env_lines(cli("services", "create", "orders", "--audience", "billing",
                                   "--scope", "billing.write", "--format", "env"))
        say("   registered service orders (its secret stays in this process's memory)")
        # billing validates locally; its revocation feed is served to registered services only.
        billing_env = env_lines(cli("services", "create", "billing", "--audience", "orders",
                                    "--format", "env"))

        ca = DemoCa(pki_dir)
        billing_tls = ca.server("billing")
        svc_env = {**env, "AUTHSVC_TARGET": target}
        billing = Child(
            [sys.executable, str(HERE / "billing.py")],
            {**svc_env, **billing_env, "BILLING_TLS_CERT": str(billing_tls.cert),
             "BILLING_TLS_KEY": str(billing_tls.key), "BILLING_TLS_CLIENT_CA": str(ca.cert)},
            "billing listening on ", echo=True,
        )
        children.append(billing)
        billing_addr, billing_mtls = billing.address, billing.banner[5]
        orders = Child(
            [sys.executable, str(HERE / "orders.py")],
            {**svc_env, **orders_env, "BILLING_TARGET": billing_addr},
            "orders listening on ", echo=True,
        )
        children.append(orders)
        say(f"   billing on {billing_addr} (mTLS on {billing_mtls}), orders on {orders.address}")

        local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        place = grpc.secure_channel(orders.address, local).unary_unary("/demo.Orders/Place")
        say("2. authenticated call orders -> billing:", place(b"42", timeout=10).decode())

        billing_ch = grpc.secure_channel(billing_addr, local)
        charge = billing_ch.unary_unary("/demo.Billing/Charge")
        try:
            charge(b"1", timeout=5)
        except grpc.RpcError as exc:
            say(f"3. call without a token denied: {exc.code().name} ({exc.details()})")

        stub = auth_pb2_grpc.AuthServiceStub(  # type: ignore[no-untyped-call]
            grpc.insecure_channel(target)
        )
        token = stub.IssueToken(auth_pb2.IssueTokenRequest(
            service_id="orders", service_secret=orders_env["AUTHSVC_SERVICE_SECRET"],
            audience="billing"), timeout=5).access_token
        md = [("authorization", f"Bearer {token}")]
        say("4. token accepted before revocation:", charge(b"7", metadata=md, timeout=5).decode())
        started = time.monotonic()
        stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token), timeout=5)
        while True:
            try:
                charge(b"7", metadata=md, timeout=5)
                time.sleep(0.005)
            except grpc.RpcError as exc:
                took = (time.monotonic() - started) * 1000
                say(f"   revoked token denied {took:.0f} ms later: {exc.code().name}")
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
        say(f"5. signing key rotated under traffic ({rotated}); token from the new key: "
            f"{reply.decode()}")
        say(f"   calls during rotation: {counts['ok']} ok, {counts['failed']} failed")
        if counts["failed"]:
            raise SystemExit("demo failed: calls failed during rotation")

        # 6. front -> orders -> billing: front logs in with a key (no secret), orders
        # exchanges front's token for one addressed to billing, on front's behalf.
        front_key = signing_key(pki_dir, "front")
        cli("services", "create", "front", "--grant", "orders=orders.write",
            "--grant", "billing=billing.write", "--jwk-file", str(front_key.public),
            "--no-secret")
        front_env = {**base, "AUTHSVC_TARGET": target, "AUTHSVC_ISSUER": ISSUER,
                     "AUTHSVC_SERVICE_ID": "front",
                     "AUTHSVC_SERVICE_KEY_FILE": str(front_key.private),
                     "ORDERS_TARGET": orders.address}
        say("6. delegation chain front -> orders -> billing (front registered with a public "
            "key, --no-secret)")
        returncode = run_echoed([sys.executable, str(HERE / "front.py")], front_env)
        if returncode != 0:
            raise SystemExit(f"demo failed: front exited with {returncode}")
        if not billing.wait_for("asked by front through orders"):
            raise SystemExit("demo failed: billing did not see front's delegated charge")

        # 7. A certificate-bound token, and a thief replaying it with another certificate.
        ledger_pair = ca.workload("ledger", f"{TRUST_DOMAIN}/ledger")
        thief_pair = ca.workload("thief", f"{TRUST_DOMAIN}/thief")
        cli("services", "create", "ledger", "--audience", "billing", "--scope", "billing.write",
            "--tls-san", f"{TRUST_DOMAIN}/ledger", "--no-secret")
        replica_tls = ca.server("authsvc")
        replica = Child(
            [*authsvc(), "serve", "--listen", "127.0.0.1:0"],
            {**env, "AUTHSVC_TLS_CERT": str(replica_tls.cert),
             "AUTHSVC_TLS_KEY": str(replica_tls.key), "AUTHSVC_TLS_CLIENT_CA": str(ca.cert)},
            "authsvc listening on ",
        )
        children.append(replica)
        # The replica's stub presents ledger's certificate (an mTLS authsvc wants one).
        replica_ch = grpc.secure_channel(replica.address, mtls(ca.cert, ledger_pair))
        replica_stub = auth_pb2_grpc.AuthServiceStub(replica_ch)  # type: ignore[no-untyped-call]
        replica_jwks = replica_stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5).jwks_json
        first_jwks = stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5).jwks_json
        if kids(replica_jwks) != kids(first_jwks):
            raise SystemExit("demo failed: the two replicas publish different signing keys")
        say(f"7. second authsvc replica on {replica.address} (mTLS, same AUTHSVC_DEV_DIR): "
            f"same JWK Set as the first ({len(kids(first_jwks))} keys)")
        ledger_env = {**base, "AUTHSVC_TARGET": replica.address, "AUTHSVC_SERVICE_ID": "ledger",
                      "AUTHSVC_TLS_CLIENT_CERT": str(ledger_pair.cert),
                      "AUTHSVC_TLS_CLIENT_KEY": str(ledger_pair.key),
                      "AUTHSVC_TLS_CA": str(ca.cert)}
        kind = login_from_env(ledger_env).login.kind
        with TokenSource.from_env("billing", ["billing.write"], environ=ledger_env) as source:
            bound = source.token(timeout=10)
        say(f"   ledger logged in without a secret (credential: {kind}, "
            f"SAN {TRUST_DOMAIN}/ledger)")
        payload = unverified_payload(bound) or {}
        cnf = payload.get("cnf", {}).get("x5t#S256", "")
        mine = cnf == certificate_thumbprint(ledger_pair.cert.read_bytes())
        say(f"   its token is bound to its certificate: cnf.x5t#S256 {cnf} "
            f"({'ledger' if mine else 'NOT ledger'}'s certificate)")
        bearer = [("authorization", f"Bearer {bound}")]
        with grpc.secure_channel(billing_mtls, mtls(ca.cert, ledger_pair)) as holder:
            reply = holder.unary_unary("/demo.Billing/Charge")(b"9", metadata=bearer, timeout=5)
        say(f"   holder, over its own certificate: {reply.decode()}")
        with grpc.secure_channel(billing_mtls, mtls(ca.cert, thief_pair)) as thief:
            try:
                thief.unary_unary("/demo.Billing/Charge")(b"9", metadata=bearer, timeout=5)
                raise SystemExit("demo failed: the stolen bound token was accepted")
            except grpc.RpcError as exc:
                say(f"   thief replaying it with another certificate of the same CA: "
                    f"{exc.code().name} ({exc.details()})")
        # The holder revokes it at the replica (by the token, over its certificate); billing
        # follows the first replica, which reads the revocation from the shared database.
        started = time.monotonic()
        replica_stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=bound), timeout=5)
        with grpc.secure_channel(billing_mtls, mtls(ca.cert, ledger_pair)) as holder:
            denied = None
            while denied is None and time.monotonic() - started < 10:
                try:
                    holder.unary_unary("/demo.Billing/Charge")(b"9", metadata=bearer, timeout=5)
                    time.sleep(0.01)
                except grpc.RpcError as exc:
                    denied = exc
        if denied is None:
            raise SystemExit("demo failed: the revoked bound token was still accepted")
        say(f"   revoked at the mTLS replica, denied by billing (which follows the first) "
            f"{(time.monotonic() - started) * 1000:.0f} ms later: {denied.code().name} "
            f"({denied.details()})")
        replica_ch.close()
    finally:
        # Services first, authsvc last: a service outliving authsvc would log its lost feed.
        for child in reversed(children):
            child.stop()
            child.wait()


if __name__ == "__main__":
    main()
