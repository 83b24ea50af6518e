"""authsvc.workload.federation with a test issuer whose keys the test holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.errors import InvalidArgument
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.federation import (
    FederationVerifier,
    StaticKeys,
    TrustedIssuer,
    load_jwks_file,
)
from authsvc.workload.jwks_fetch import FetchPolicy, JwksCache
from authsvc.workload.public_keys import key_from_jwk
from tests.support.clock import FakeClock
from tests.support.workload import (
    Route,
    b64url,
    hmac_forged,
    jwk_of,
    jwk_set,
    jwks_server,
    new_ec,
    new_ed25519,
    new_rsa,
    public_pem,
    sign,
    unsigned,
)

NOW = 1_900_000_000
CLUSTER_A = "https://oidc.cluster-a.example"
CLUSTER_B = "https://oidc.cluster-b.example"
SUB = "system:serviceaccount:prod:orders"
A_KEY = new_rsa()
B_KEY = new_ec()


def k8s_claims(iss: str | None = CLUSTER_A, **over: Any) -> dict[str, Any]:
    """A Kubernetes projected service-account token's claims (no jti)."""
    base: dict[str, Any] = {
        "iss": iss,
        "sub": SUB,
        "aud": ["authsvc"],
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 3600,
        "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "orders"}},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def trust(name: str, issuer: str, key: Any, kid: str, **kw: Any) -> TrustedIssuer:
    return TrustedIssuer(
        name, issuer, "authsvc", StaticKeys((key_from_jwk(jwk_of(key, kid=kid)),)), **kw
    )


@pytest.fixture(scope="module")
def verifier() -> FederationVerifier:
    return FederationVerifier(
        [trust("cluster-a", CLUSTER_A, A_KEY, "a1"), trust("cluster-b", CLUSTER_B, B_KEY, "b1")]
    )


def reason(verifier: FederationVerifier, token: str, now: float = NOW) -> Reason:
    with pytest.raises(WorkloadAuthError) as caught:
        verifier.verify(token, now=now)
    return caught.value.reason


class TestValid:
    def test_kubernetes_token(self, verifier: FederationVerifier) -> None:
        token = sign(k8s_claims(), A_KEY, "RS256", kid="a1")
        identity = verifier.verify(token, now=NOW + 10)
        assert (identity.trust_name, identity.subject, identity.exp) == (
            "cluster-a",
            SUB,
            NOW + 3600,
        )

    def test_es256_and_string_audience_and_no_iat(self, verifier: FederationVerifier) -> None:
        token = sign(k8s_claims(CLUSTER_B, aud="authsvc", iat=None), B_KEY, "ES256", kid="b1")
        assert verifier.verify(token, now=NOW).trust_name == "cluster-b"

    def test_reused_until_exp_without_jti(self, verifier: FederationVerifier) -> None:
        token = sign(k8s_claims(), A_KEY, "RS256", kid="a1")
        for now in (NOW, NOW + 1800, NOW + 3600 + 59):
            assert verifier.verify(token, now=now).subject == SUB

    def test_without_kid_the_trust_keys_are_tried(self, verifier: FederationVerifier) -> None:
        assert verifier.verify(sign(k8s_claims(), A_KEY, "RS256"), now=NOW)


class TestRefused:
    def test_two_issuers_with_the_same_sub_are_never_confused(
        self, verifier: FederationVerifier
    ) -> None:
        """Cluster A's key cannot speak for cluster B, even naming B's kid; each result
        names its trust."""
        forged = sign(k8s_claims(CLUSTER_B), A_KEY, "RS256", kid="b1")
        assert reason(verifier, forged) in {Reason.ALGORITHM_NOT_ALLOWED, Reason.BAD_SIGNATURE}
        same_type = sign(k8s_claims(CLUSTER_B), new_ec(), "ES256", kid="b1")
        assert reason(verifier, same_type) == Reason.BAD_SIGNATURE
        a = verifier.verify(sign(k8s_claims(), A_KEY, "RS256", kid="a1"), now=NOW)
        b = verifier.verify(sign(k8s_claims(CLUSTER_B), B_KEY, "ES256", kid="b1"), now=NOW)
        assert (a.trust_name, a.subject) == ("cluster-a", SUB)
        assert (b.trust_name, b.subject) == ("cluster-b", SUB)

    def test_unknown_or_inexact_issuer(self, verifier: FederationVerifier) -> None:
        for iss in ("https://oidc.cluster-c.example", CLUSTER_A + "/", CLUSTER_A.upper(), None):
            token = sign(k8s_claims(iss=iss), A_KEY, "RS256", kid="a1")
            assert reason(verifier, token) == Reason.UNKNOWN_ISSUER

    def test_audience(self, verifier: FederationVerifier) -> None:
        for aud in (
            ["other"],
            "other",
            [],
            "authsvc-prod",
            ["authsvc2", "x"],
            None,
            {"authsvc": 1},
        ):
            token = sign(k8s_claims(aud=aud), A_KEY, "RS256", kid="a1")
            assert reason(verifier, token) == Reason.WRONG_AUDIENCE, aud
        ok = sign(k8s_claims(aud=["vault", "authsvc"]), A_KEY, "RS256", kid="a1")
        assert verifier.verify(ok, now=NOW)

    def test_expiry_and_times(self, verifier: FederationVerifier) -> None:
        token = sign(k8s_claims(), A_KEY, "RS256", kid="a1")
        assert reason(verifier, token, now=NOW + 3600 + 60) == Reason.EXPIRED
        assert reason(verifier, token, now=NOW - 61) == Reason.NOT_YET_VALID
        future_iat = sign(k8s_claims(nbf=None, iat=NOW + 120), A_KEY, "RS256", kid="a1")
        assert reason(verifier, future_iat) == Reason.ISSUED_IN_FUTURE
        no_exp = sign(k8s_claims(exp=None), A_KEY, "RS256", kid="a1")
        assert reason(verifier, no_exp) == Reason.MISSING_CLAIM

    def test_lifetime_ceiling(self, verifier: FederationVerifier) -> None:
        day = 24 * 3600
        at_ceiling = sign(k8s_claims(exp=NOW + day), A_KEY, "RS256", kid="a1")
        assert verifier.verify(at_ceiling, now=NOW)
        too_long = sign(k8s_claims(exp=NOW + day + 1), A_KEY, "RS256", kid="a1")
        assert reason(verifier, too_long) == Reason.LIFETIME_TOO_LONG
        no_iat = sign(k8s_claims(iat=None, nbf=None, exp=NOW + 2 * day), A_KEY, "RS256", kid="a1")
        assert reason(verifier, no_iat) == Reason.LIFETIME_TOO_LONG
        short = FederationVerifier([trust("a", CLUSTER_A, A_KEY, "a1", max_lifetime=600)])
        assert (
            reason(short, sign(k8s_claims(), A_KEY, "RS256", kid="a1")) == Reason.LIFETIME_TOO_LONG
        )

    def test_tampering(self, verifier: FederationVerifier) -> None:
        token = sign(k8s_claims(), A_KEY, "RS256", kid="a1")
        header, _, signature = token.split(".")
        payload = b64url(json.dumps(k8s_claims(sub="system:serviceaccount:prod:admin")).encode())
        assert reason(verifier, f"{header}.{payload}.{signature}") == Reason.BAD_SIGNATURE
        other_key = sign(k8s_claims(), new_rsa(), "RS256", kid="a1")
        assert reason(verifier, other_key) == Reason.BAD_SIGNATURE

    def test_algorithms_other_than_rs256_es256(self, verifier: FederationVerifier) -> None:
        ps256 = sign(k8s_claims(), A_KEY, "PS256", kid="a1")
        assert reason(verifier, ps256) == Reason.ALGORITHM_NOT_ALLOWED
        none = unsigned(k8s_claims(), kid="a1")
        assert reason(verifier, none) == Reason.MALFORMED  # RFC 7519 section 6: empty signature
        assert reason(verifier, none + "c2ln") == Reason.ALGORITHM_NOT_ALLOWED
        for secret in (public_pem(A_KEY), json.dumps(jwk_of(A_KEY)).encode()):
            forged = hmac_forged(k8s_claims(), secret, kid="a1")
            assert reason(verifier, forged) == Reason.ALGORITHM_NOT_ALLOWED
        eddsa = sign(k8s_claims(), new_ed25519(), "EdDSA", kid="a1")
        assert reason(verifier, eddsa) == Reason.ALGORITHM_NOT_ALLOWED

    def test_subject(self, verifier: FederationVerifier) -> None:
        for sub, expected in (
            (None, Reason.MISSING_CLAIM),
            ("", Reason.MISSING_CLAIM),
            (5, Reason.MISSING_CLAIM),
            ("a\nb", Reason.WRONG_SUBJECT),
        ):
            token = sign(k8s_claims(sub=sub), A_KEY, "RS256", kid="a1")
            assert reason(verifier, token) == expected


class TestConfiguration:
    def test_duplicate_issuer_or_name(self) -> None:
        with pytest.raises(InvalidArgument, match="same issuer"):
            FederationVerifier(
                [trust("a", CLUSTER_A, A_KEY, "a1"), trust("b", CLUSTER_A, B_KEY, "b1")]
            )
        with pytest.raises(InvalidArgument, match="taken"):
            FederationVerifier(
                [trust("a", CLUSTER_A, A_KEY, "a1"), trust("a", CLUSTER_B, B_KEY, "b1")]
            )

    def test_audience_is_mandatory(self) -> None:
        with pytest.raises(InvalidArgument, match="audience"):
            TrustedIssuer("a", CLUSTER_A, "", StaticKeys(()))

    def test_long_issuer_urls_fit(self) -> None:
        gke = (
            "https://container.googleapis.com/v1/projects/"
            + "p" * 60
            + "/locations/europe-west4/clusters/"
            + "c" * 40
        )
        assert len(gke) > 128
        assert TrustedIssuer("gke", gke, "authsvc", StaticKeys(())).issuer == gke
        for bad in ("", " " + CLUSTER_A, "x" * 1025, "a\nb"):
            with pytest.raises(InvalidArgument, match="issuer"):
                TrustedIssuer("a", bad, "authsvc", StaticKeys(()))

    def test_jwks_file(self, tmp_path: Path) -> None:
        path = tmp_path / "jwks.json"
        path.write_bytes(jwk_set(jwk_of(A_KEY, kid="a1"), jwk_of(new_ed25519(), kid="ed")))
        keys = load_jwks_file(path)
        assert [k.jwk_kid for k in keys.keys] == ["a1"]  # Ed25519 cannot sign RS256/ES256
        path.write_bytes(jwk_set(jwk_of(new_ed25519())))
        with pytest.raises(InvalidArgument, match="no RSA"):
            load_jwks_file(path)
        path.write_bytes(b"nope")
        with pytest.raises(InvalidArgument, match="not JSON"):
            load_jwks_file(path)


@pytest.fixture()
def rolling_issuer() -> Iterator[tuple[str, Any]]:
    with jwks_server() as server:
        server.routes["/keys"] = Route(jwk_set(jwk_of(A_KEY, kid="old")))
        yield server.url("/keys", host="127.0.0.1"), server


class TestKeyRoll:
    def test_an_unknown_kid_refreshes_the_jwks_once(self, rolling_issuer: tuple[str, Any]) -> None:
        url, server = rolling_issuer
        clock = FakeClock(NOW)
        cache = JwksCache(url, clock=clock, policy=FetchPolicy(timeout=10.0), name="cluster-a")
        verifier = FederationVerifier([TrustedIssuer("cluster-a", CLUSTER_A, "authsvc", cache)])
        assert verifier.verify(sign(k8s_claims(), A_KEY, "RS256", kid="old"), now=NOW)
        new_key: rsa.RSAPrivateKey = new_rsa()
        server.routes["/keys"] = Route(
            jwk_set(jwk_of(A_KEY, kid="old"), jwk_of(new_key, kid="new"))
        )
        token = sign(k8s_claims(), new_key, "RS256", kid="new")
        assert verifier.verify(token, now=NOW).subject == SUB
        assert server.hits["/keys"] == 2
        # made-up kids do not make authsvc hammer the issuer
        for i in range(5):
            assert (
                reason(verifier, sign(k8s_claims(), new_rsa(1024 + 1024), "RS256", kid=f"x{i}"))
                == Reason.BAD_SIGNATURE
            )
        assert server.hits["/keys"] == 2
