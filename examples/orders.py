"""Demo caller: an orders service that charges through billing with authsvc call credentials."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from authsvc_client import TokenSource, call_credentials

PLACE = "/demo.Orders/Place"


def main() -> None:
    # The two-line change: a token source from the environment, and call credentials on the
    # outgoing channel (AUTHSVC_SERVICE_ID, AUTHSVC_SERVICE_SECRET, AUTHSVC_TARGET).
    source = TokenSource.from_env("billing", ["billing.write"])
    creds = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        call_credentials(source),
    )
    billing = grpc.secure_channel(os.environ["BILLING_TARGET"], creds)
    charge = billing.unary_unary("/demo.Billing/Charge")

    def place(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            reply: bytes = charge(request, timeout=5)
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"billing refused: {exc.details()}")
        return b"order placed; " + reply

    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Orders", {"Place": grpc.unary_unary_rpc_method_handler(place)}
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
    billing.close()
    source.close()


if __name__ == "__main__":
    main()
