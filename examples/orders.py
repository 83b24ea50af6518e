"""Demo service: orders charges billing as itself (Place) and on its caller's behalf (Checkout).

Place is public and charges with orders' own token (call credentials from the environment).
Checkout needs a caller's token (scope orders.write); its handler exchanges that token for one
addressed to billing (RFC 8693, the client package's Delegator), so billing sees the caller as
`sub` and orders as the actor.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from authsvc_client import (
    AuthServerInterceptor,
    AuthsvcClientError,
    LocalValidator,
    TokenRefused,
    TokenSource,
    call_credentials,
)
from authsvc_client.delegation import Delegator
from authsvc_client.interceptors import MethodRule

PLACE = "/demo.Orders/Place"
CHECKOUT = "/demo.Orders/Checkout"


def main() -> None:
    # The two-line change: a token source from the environment, and call credentials on the
    # outgoing channel (AUTHSVC_SERVICE_ID, AUTHSVC_SERVICE_SECRET, AUTHSVC_TARGET).
    source = TokenSource.from_env("billing", ["billing.write"])
    local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    billing = grpc.secure_channel(
        os.environ["BILLING_TARGET"],
        grpc.composite_channel_credentials(local, call_credentials(source)),
    )
    charge = billing.unary_unary("/demo.Billing/Charge")
    # Calls on a caller's behalf carry the exchanged token as metadata, so this channel has no
    # call credentials of its own (two authorization values would be refused).
    on_behalf = grpc.secure_channel(os.environ["BILLING_TARGET"], local)
    charge_for_caller = on_behalf.unary_unary("/demo.Billing/Charge")
    # orders acts with its own login (AUTHSVC_SERVICE_ID / _SECRET), the same the source uses.
    delegator = Delegator.from_env()

    def place(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            reply: bytes = charge(request, timeout=5)
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"billing refused: {exc.details()}")
        return b"order placed; " + reply

    def checkout(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            # ExchangeToken of the incoming token (cached per caller token, audience, scopes).
            metadata = delegator.metadata("billing", ["billing.write"], timeout=5)
        except AuthsvcClientError as exc:  # messages name the reason, never a token
            code = grpc.StatusCode.PERMISSION_DENIED
            context.abort(code if isinstance(exc, TokenRefused) else grpc.StatusCode.UNAVAILABLE,
                          f"cannot act on the caller's behalf: {exc}")
        try:
            reply: bytes = charge_for_caller(request, metadata=metadata, timeout=5)
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"billing refused: {exc.details()}")
        return b"checked out; " + reply

    validator = LocalValidator(
        grpc.insecure_channel(os.environ["AUTHSVC_TARGET"]), "orders", os.environ["AUTHSVC_ISSUER"]
    )
    if not validator.wait_ready(15):
        raise SystemExit("orders: authsvc not reachable")
    interceptor = AuthServerInterceptor(
        validator, {CHECKOUT: MethodRule(["orders.write"])}, public_methods=[PLACE]
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=16), interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Orders",
                {
                    "Place": grpc.unary_unary_rpc_method_handler(place),
                    "Checkout": grpc.unary_unary_rpc_method_handler(checkout),
                },
            ),
        )
    )
    # Local credentials (as billing): front's call credentials travel only on a secured channel.
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    )
    server.start()
    print(f"orders listening on 127.0.0.1:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    delegator.close()
    validator.close()
    on_behalf.close()
    billing.close()
    source.close()


if __name__ == "__main__":
    main()
