"""Demo callee: a billing service that accepts only authsvc tokens minted for "billing"."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from authsvc_client import AuthServerInterceptor, LocalValidator, current_claims

CHARGE = "/demo.Billing/Charge"


def charge(request: bytes, _context: grpc.ServicerContext) -> bytes:
    claims = current_claims()
    caller = claims.subject if claims is not None else "?"
    return f"charged {request.decode() or '0'} for {caller}".encode()


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
        interceptors=[AuthServerInterceptor(validator, {CHARGE: ["billing.write"]})],
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
    server.start()
    print(f"billing listening on 127.0.0.1:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    validator.close()


if __name__ == "__main__":
    main()
