"""Promise (SECURITY.md): the client package sends a secret in plaintext only to this host.

`channel_for_target` gives loopback and Unix-socket targets a plaintext channel and every other
target TLS; a target that only looks local (a name starting with "localhost", several
addresses, a DNS authority) must get TLS, since a mistake there sends a secret in clear.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from authsvc_client.tokens import _is_local_target, channel_for_target
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

LOCAL = [
    "localhost:50051",
    "127.0.0.1:50051",
    "127.8.9.10:1",
    "[::1]:50051",
    "ipv4:127.0.0.1:50051",
    "ipv6:[::1]:50051",
    "dns:///localhost:50051",
    "unix:/run/authsvc.sock",
    "unix-abstract:authsvc",
]
OFF_HOST = [
    "10.0.0.5:50051",
    "authsvc.prod:443",
    "authsvc.prod",
    "LOCALHOST.evil.example:1",
    "localhost.evil.example:1",
    "localhost.:1",
    "127.0.0.1.nip.io:1",
    "ipv4:127.0.0.1:1,10.0.0.5:1",
    "dns://8.8.8.8/localhost:1",
    "[2001:db8::1]:443",
    "::ffff:10.0.0.5",
    "",
]


@pytest.mark.parametrize("target", LOCAL)
def test_loopback_and_unix_targets_are_local(target: str) -> None:
    assert _is_local_target(target)


@pytest.mark.parametrize("target", OFF_HOST)
def test_anything_else_is_not(target: str) -> None:
    assert not _is_local_target(target)


def _own_non_loopback_address() -> str:
    """An address of this host that is not loopback (no packet is sent: UDP connect only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only
        except OSError:
            pytest.skip("this host has no route off loopback, so no non-loopback address")
        address = str(probe.getsockname()[0])
    if address.startswith("127.") or address == "0.0.0.0":
        pytest.skip("this host has no non-loopback IPv4 address")
    return address


@pytest.fixture
def listener() -> Iterator[tuple[str, list[bytes]]]:
    """A raw TCP listener on a non-loopback address of this host: what a client sends first."""
    host = _own_non_loopback_address()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(4)
    server.settimeout(10)
    received: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                received.append(conn.recv(64))
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"{host}:{server.getsockname()[1]}", received
    finally:
        server.close()
        thread.join(timeout=10)


def test_an_off_host_target_gets_tls_before_any_byte_of_the_call(
    listener: tuple[str, list[bytes]],
) -> None:
    target, received = listener
    secret = "asvcs_" + "s" * 43  # a stand-in: it must never arrive
    with channel_for_target(target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    service_id="orders", service_secret=secret, audience="billing"
                ),
                timeout=3,
            )
    assert received, "the client never connected"
    first = received[0]
    assert first[:1] == b"\x16", "the first byte is not a TLS handshake record"
    assert not first.startswith(b"PRI * HTTP/2.0")
    assert secret.encode() not in first
