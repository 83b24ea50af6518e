"""Federation against a real third-party OIDC issuer: panva's node-oidc-provider.

The peer (../shared/peers/oidc-provider) is copied to a temporary folder before `npm ci`
(shared/ is read-only in CI), started on loopback, and asked for a JWT with client credentials.
authsvc fetches its JWKS over loopback http and verifies the token with federation.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.federation import JWT_TOKEN_TYPE, FederationVerifier, TrustedIssuer
from authsvc.workload.jwks_fetch import FetchPolicy, JwksCache
from authsvc.workload.public_keys import key_from_jwk
from authsvc_client.v1 import auth_pb2
from tests.support.clock import FakeClock
from tests.support.server import base_env, run_cli, running_server

PEER = Path(__file__).resolve().parents[3] / "shared" / "peers" / "oidc-provider"
if not PEER.exists():
    PEER = Path("/work/shared/peers/oidc-provider")
AUDIENCE = "https://authsvc.test/"
CLIENT_ID = "orders-workload"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None or not PEER.exists(),
    reason="node/npm or the oidc-provider peer is missing",
)


@dataclass
class Provider:
    issuer: str
    secret: str = field(repr=False)

    def token(self) -> str:
        body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "api:read"})
        basic = base64.b64encode(f"{CLIENT_ID}:{self.secret}".encode()).decode()
        request = urllib.request.Request(
            f"{self.issuer}/token",
            data=body.encode(),
            headers={"Authorization": f"Basic {basic}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            token: str = json.loads(response.read())["access_token"]
            return token


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    folder = tmp_path_factory.mktemp("oidc-provider")
    for name in ("package.json", "package-lock.json", "server.mjs"):
        shutil.copy(PEER / name, folder / name)
    installed = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        capture_output=True,
        timeout=240,
        check=False,
    )
    if installed.returncode != 0:
        pytest.skip("npm ci failed (no package registry reachable?)")
    secret = base64.urlsafe_b64encode(os.urandom(24)).decode()
    port_file = folder / "port"
    env = {
        **os.environ,
        "PORT_FILE": str(port_file),
        "RESOURCE_JWT": AUDIENCE,
        "CLIENT_ID": CLIENT_ID,
        "CLIENT_SECRET": secret,
    }
    process = subprocess.Popen(
        ["node", "server.mjs"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            if port_file.exists() and port_file.read_text().strip():
                break
            if process.poll() is not None:
                pytest.fail("oidc-provider exited before listening")
            time.sleep(0.25)
        else:
            pytest.fail("oidc-provider did not start")
        yield Provider(f"http://127.0.0.1:{port_file.read_text().strip()}", secret)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def verifier_for(
    provider: Provider, audience: str = AUDIENCE
) -> tuple[FederationVerifier, JwksCache]:
    cache = JwksCache(
        f"{provider.issuer}/jwks",
        clock=FakeClock(time.time()),
        policy=FetchPolicy(timeout=10),
        name="node",
    )
    trust = TrustedIssuer("node-oidc", provider.issuer, audience, cache, max_lifetime=3600)
    return FederationVerifier([trust]), cache


class TestNodeOidcProvider:
    def test_its_token_verifies(self, provider: Provider) -> None:
        verifier, cache = verifier_for(provider)
        identity = verifier.verify(provider.token(), now=time.time())
        assert (identity.trust_name, identity.subject) == ("node-oidc", CLIENT_ID)
        assert identity.exp > time.time()
        assert cache.status().key_count == 1

    def test_its_kid_is_our_rfc7638_thumbprint(self, provider: Provider) -> None:
        """The peer names its key with jose's calculateJwkThumbprint: an independent RFC 7638
        implementation agrees with ours (and so with authsvc_client's kid)."""
        with urllib.request.urlopen(f"{provider.issuer}/jwks", timeout=30) as response:
            jwk = json.loads(response.read())["keys"][0]
        assert key_from_jwk(jwk).key_id == jwk["kid"]

    def test_another_audience_is_refused(self, provider: Provider) -> None:
        verifier, _ = verifier_for(provider, audience="https://someone-else.test/")
        with pytest.raises(WorkloadAuthError) as caught:
            verifier.verify(provider.token(), now=time.time())
        assert caught.value.reason == Reason.WRONG_AUDIENCE

    def test_tampered_and_expired(self, provider: Provider) -> None:
        verifier, _ = verifier_for(provider)
        token = provider.token()
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["sub"] = "billing-workload"
        forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        for bad, expected, now in (
            (f"{header}.{forged_payload}.{signature}", Reason.BAD_SIGNATURE, time.time()),
            (token, Reason.EXPIRED, claims["exp"] + 61),
        ):
            with pytest.raises(WorkloadAuthError) as caught:
                verifier.verify(bad, now=now)
            assert caught.value.reason == expected


class TestExchangeThroughAuthsvc:
    """The whole path: `authsvc trust add --jwks-url` of the peer, a service bound to its
    client's subject, and ExchangeToken of the peer's own JWT access token."""

    def test_a_peer_token_exchanges_for_the_bound_service(
        self, provider: Provider, tmp_path: Path
    ) -> None:
        env = base_env(f"sqlite:///{tmp_path / 'authsvc.db'}")
        run_cli(env, "db", "upgrade")
        run_cli(
            env, "trust", "add", "node-oidc", "--issuer", provider.issuer, "--audience", AUDIENCE,
            "--jwks-url", f"{provider.issuer}/jwks", "--max-lifetime", "3600",
        )  # fmt: skip
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--scope", "billing.read",
            "--federated-subject", f"node-oidc={CLIENT_ID}", "--no-secret",
        )  # fmt: skip
        with running_server(env) as server:
            reply = server.stub.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(
                    subject_token=provider.token(),
                    subject_token_type=JWT_TOKEN_TYPE,
                    audience="billing",
                ),
                timeout=30,
            )
            checked = server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token=reply.access_token, audience="billing"),
                timeout=10,
            )
            assert checked.valid and checked.claims.subject == "orders"
            assert list(checked.claims.scopes) == ["billing.read"]
            # The peer's token for another subject binds to nothing here.
            token = provider.token()
            header, payload, signature = token.split(".")
            with pytest.raises(grpc.RpcError) as caught:
                server.stub.ExchangeToken(
                    auth_pb2.ExchangeTokenRequest(
                        subject_token=f"{header}.{payload[:-2]}AA.{signature}",
                        subject_token_type=JWT_TOKEN_TYPE,
                        audience="billing",
                    ),
                    timeout=30,
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
