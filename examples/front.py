"""Demo caller with no shared secret: front logs in with a signed assertion (RFC 7523) and
checks out at orders, which charges billing on front's behalf.

Its environment holds AUTHSVC_SERVICE_ID, AUTHSVC_SERVICE_KEY_FILE (an owner-only private
key whose public half authsvc has registered), AUTHSVC_ISSUER and AUTHSVC_TARGET; no secret.
"""

from __future__ import annotations

import os

import grpc

from authsvc_client import TokenSource, call_credentials, login_from_env

CHECKOUT = "/demo.Orders/Checkout"


def main() -> None:
    for name in ("AUTHSVC_SERVICE_SECRET", "AUTHSVC_SERVICE_SECRET_FILE"):
        if os.environ.get(name):
            raise SystemExit(f"front: {name} is set, but front is a secretless service")
    kind = login_from_env().login.kind  # the one login the environment configures
    with TokenSource.from_env("orders", ["orders.write"]) as source:
        source.token(timeout=10)
        print(
            f"front: logged in without a secret (credential: {kind}, from "
            "AUTHSVC_SERVICE_KEY_FILE)",
            flush=True,
        )
        creds = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
            call_credentials(source),
        )
        with grpc.secure_channel(os.environ["ORDERS_TARGET"], creds) as orders:
            reply = orders.unary_unary(CHECKOUT)(b"5", timeout=10)
    print(f"front: checkout -> {reply.decode()}", flush=True)


if __name__ == "__main__":
    main()
