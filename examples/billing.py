"""Demo callee: a billing service that accepts only authsvc tokens minted for "billing".

It listens on loopback with local credentials and, when BILLING_TLS_CERT, BILLING_TLS_KEY and
BILLING_TLS_CLIENT_CA are set, on a second port over mTLS (a client certificate required):
there the interceptor reads the caller's certificate, so a certificate-bound token is accepted
only from the certificate it was issued to (RFC 8705 section 3).
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from authsvc_client import AuthServerInterceptor, LocalValidator, current_claims
from authsvc_client.interceptors import MethodRule

CHARGE = "/demo.Billing/Charge"
CHARGE_RULE = MethodRule(["billing.write"], max_delegation_depth=1, allowed_actors=["orders"])


def charge(request: bytes, _context: grpc.ServicerContext) -> bytes:
    claims = current_claims()
    caller = claims.subject if claims is not None else "?"
    amount = request.decode() or "0"
    if claims is not None and claims.actors:
        # A delegated token: `sub` is who asked, `actors` who passed it on, nearest first.
        through = " through ".join(reversed(claims.actors))
        print(f"billing: charge {amount} asked by {caller} through {through}", flush=True)
        return f"charged {amount} for {caller} through {through}".encode()
    return f"charged {amount} for {caller}".encode()


def mtls_credentials() -> grpc.ServerCredentials | None:
    names = ("BILLING_TLS_KEY", "BILLING_TLS_CERT", "BILLING_TLS_CLIENT_CA")
    if not all(os.environ.get(n) for n in names):
        return None
    key, cert, ca = (Path(os.environ[n]).read_bytes() for n in names)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def main() -> None:
    # Local validation: keys from GetJwks, revocations from WatchRevocations. The feed is
    # authenticated as this service, from AUTHSVC_SERVICE_ID / _SECRET / AUTHSVC_TARGET.
    validator = LocalValidator(
        grpc.insecure_channel(os.environ["AUTHSVC_TARGET"]),
        "billing",
        os.environ["AUTHSVC_ISSUER"],
    )
    if not validator.wait_ready(15):
        raise SystemExit("billing: authsvc not reachable")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=16),
        # Direct callers, or a caller's token passed on by orders only (one hop at most).
        interceptors=[AuthServerInterceptor(validator, {CHARGE: CHARGE_RULE})],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Billing", {"Charge": grpc.unary_unary_rpc_method_handler(charge)}
            ),
        )
    )
    # Call credentials travel only over a secured channel: local credentials on loopback.
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    )
    mtls = mtls_credentials()
    mtls_port = server.add_secure_port("127.0.0.1:0", mtls) if mtls is not None else None
    server.start()
    also = f" mtls 127.0.0.1:{mtls_port}" if mtls_port else ""
    print(f"billing listening on 127.0.0.1:{port}{also}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    validator.close()


if __name__ == "__main__":
    main()
