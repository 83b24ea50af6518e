"""TrustRegistry without a gRPC server: real SQLite storage, real keys in real JWK Set files.

A trust is checked as a serving replica will load it (TrustedIssuer's rules), stores the keys
it checked (not the file, which may change later), and its removal takes the federated
subjects bound to it along (issue 14).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from authsvc.errors import AlreadyExists, InvalidArgument, NotFound
from authsvc.server.app import Core, build_core, service_registry
from authsvc.usecases.audit import Origin
from authsvc.usecases.federation import TrustStore
from authsvc.usecases.trusts import TrustRegistry, trust_key_ids
from authsvc.workload import StaticKeys, TrustedIssuer
from authsvc.workload.public_keys import parse_jwk_set
from authsvc_client.assertions import jwk_thumbprint
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings
from tests.support.workload import (
    Route,
    jwk_of,
    jwk_set,
    jwks_server,
    new_ec,
    new_ed25519,
    new_rsa,
    sign,
)

OPS = Origin(actor="ops-admin", peer="ipv4:10.0.0.9", request_id="req-1")
ISSUER = "https://kubernetes.default.svc.cluster.local"


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = build_core(in_process_settings(tmp_path), FakeClock())
    try:
        yield core
    finally:
        core.dispose()


@pytest.fixture
def trusts(core: Core) -> TrustRegistry:
    return TrustRegistry(core.repo, core.clock, core.trail)


def _audit(core: Core, action: str) -> list[tuple[str, str, str, str]]:
    events = reversed(core.repo.list_audit_events(limit=1000))
    return [(e.actor, e.target, e.outcome, e.detail) for e in events if e.action == action]


def _file(folder: Path, body: bytes, name: str = "jwks.json") -> Path:
    path = folder / name
    path.write_bytes(body)
    return path


class TestAdd:
    def test_a_file_trust_stores_the_keys_it_checked(
        self, core: Core, trusts: TrustRegistry, tmp_path: Path
    ) -> None:
        rsa_key, ec_key = new_rsa(), new_ec()
        # An Ed25519 key cannot sign federated tokens (RS256/ES256 only): skipped, not stored.
        body = jwk_set(
            jwk_of(rsa_key, kid="k8s-2026", use="sig"), jwk_of(ec_key), jwk_of(new_ed25519())
        )
        path = _file(tmp_path, body)
        record = trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=path)
        assert (record.name, record.issuer, record.audience) == ("k8s", ISSUER, "authsvc")
        assert record.jwks_url is None and record.max_lifetime_seconds == 86400
        ec_kid = jwk_thumbprint(ec_key.public_key())
        assert trust_key_ids(record) == ("k8s-2026", ec_kid)
        # What a replica will verify with: these two keys, whatever the file says later.
        path.write_bytes(jwk_set(jwk_of(new_rsa(), kid="swapped")))
        [stored] = trusts.list()
        assert stored == record
        assert stored.jwks_json is not None
        keys = parse_jwk_set(json.loads(stored.jwks_json)).keys
        assert [k.key_id for k in keys] == [jwk_thumbprint(rsa_key.public_key()), ec_kid]
        # Stored with a `kid` each: its own, else its thumbprint.
        assert [k.jwk_kid for k in keys] == ["k8s-2026", ec_kid]
        assert _audit(core, "add_trust") == [
            (
                "ops-admin",
                "trust:k8s",
                "ok",
                f"issuer={ISSUER} audience=authsvc jwks=file keys=k8s-2026,{ec_kid} "
                "max_lifetime=86400",
            )
        ]

    def test_a_url_trust_is_checked_for_shape_and_audited_by_host_only(
        self, core: Core, trusts: TrustRegistry
    ) -> None:
        url = "https://oidc.example.org/keys?sig=abc123"
        record = trusts.add(
            "gke",
            "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c",
            "authsvc",
            origin=OPS,
            jwks_url=url,
            max_lifetime_seconds=3600,
        )
        assert (record.jwks_url, record.jwks_json, record.max_lifetime_seconds) == (url, None, 3600)
        assert trust_key_ids(record) is None
        [(_, target, _, detail)] = _audit(core, "add_trust")
        assert target == "trust:gke"
        assert "jwks=url host=oidc.example.org" in detail
        assert "abc123" not in detail

    @pytest.mark.parametrize(
        ("name", "issuer", "audience", "lifetime", "named"),
        [
            ("K8s", ISSUER, "authsvc", 3600, "trust name must be"),
            ("k8s=prod", ISSUER, "authsvc", 3600, "trust name must be"),
            ("k8s", "", "authsvc", 3600, "issuer is required"),
            ("k8s", ISSUER, "", 3600, "audience is required"),
            ("k8s", f" {ISSUER}", "authsvc", 3600, "issuer"),
            ("k8s", ISSUER, "authsvc", 0, "max_lifetime"),
            ("k8s", ISSUER, "authsvc", 8 * 24 * 3600, "max_lifetime"),
        ],
    )
    def test_the_rules_of_a_trusted_issuer(
        self,
        core: Core,
        trusts: TrustRegistry,
        name: str,
        issuer: str,
        audience: str,
        lifetime: int,
        named: str,
    ) -> None:
        with pytest.raises(InvalidArgument, match=named):
            trusts.add(
                name,
                issuer,
                audience,
                origin=OPS,
                jwks_url="https://oidc.example.org/keys",
                max_lifetime_seconds=lifetime,
            )
        assert trusts.list() == []
        assert _audit(core, "add_trust") == []

    def test_exactly_one_key_source(self, trusts: TrustRegistry, tmp_path: Path) -> None:
        path = _file(tmp_path, jwk_set(jwk_of(new_ec())))
        with pytest.raises(InvalidArgument, match="exactly one"):
            trusts.add("k8s", ISSUER, "authsvc", origin=OPS)
        with pytest.raises(InvalidArgument, match="exactly one"):
            trusts.add(
                "k8s", ISSUER, "authsvc", origin=OPS, jwks_file=path, jwks_url="https://a.b/k"
            )
        assert trusts.list() == []

    @pytest.mark.parametrize(
        ("body", "named"),
        [
            (b"{not json", "not JSON"),
            (json.dumps(jwk_of(new_ec())).encode(), "'keys' array"),
            (jwk_set(jwk_of(new_ed25519())), "no RSA"),
        ],
    )
    def test_a_file_that_is_not_a_usable_jwk_set(
        self, trusts: TrustRegistry, tmp_path: Path, body: bytes, named: str
    ) -> None:
        with pytest.raises(InvalidArgument, match=named):
            trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=_file(tmp_path, body))
        with pytest.raises(InvalidArgument, match="cannot read"):
            trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=tmp_path / "missing")
        assert trusts.list() == []

    @pytest.mark.parametrize(
        "url", ["http://oidc.example.org/keys", "https://user:pw@oidc.example.org/k", "ftp://x/y"]
    )
    def test_a_jwks_url_must_be_https_without_user_info(
        self, trusts: TrustRegistry, url: str
    ) -> None:
        with pytest.raises(InvalidArgument, match="jwks_url") as exc:
            trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_url=url)
        assert "pw@" not in str(exc.value)

    def test_a_name_or_an_issuer_is_taken_once(self, trusts: TrustRegistry) -> None:
        trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_url="https://a.example/k")
        with pytest.raises(AlreadyExists):
            trusts.add("k8s", ISSUER + "/other", "authsvc", origin=OPS, jwks_url="https://b/k")
        # Two trusts with one issuer would make `iss` ambiguous.
        with pytest.raises(AlreadyExists):
            trusts.add("k8s-2", ISSUER, "authsvc", origin=OPS, jwks_url="https://b.example/k")
        assert [t.name for t in trusts.list()] == ["k8s"]

    def test_what_it_stores_loads_as_a_trusted_issuer(
        self, trusts: TrustRegistry, tmp_path: Path
    ) -> None:
        path = _file(tmp_path, jwk_set(jwk_of(new_rsa(), kid="a")))
        record = trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=path)
        assert record.jwks_json is not None
        keys = parse_jwk_set(json.loads(record.jwks_json)).keys
        issuer = TrustedIssuer(
            record.name,
            record.issuer,
            record.audience,
            StaticKeys(keys),
            record.max_lifetime_seconds,
        )
        assert [k.algorithms for k in issuer.keys.ensure_loaded()] == [("RS256", "PS256")]


class TestRemove:
    def test_removing_a_trust_unbinds_its_subjects(
        self, core: Core, trusts: TrustRegistry, tmp_path: Path
    ) -> None:
        path = _file(tmp_path, jwk_set(jwk_of(new_ec())))
        trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=path)
        registry = service_registry(core)
        registry.create(
            OPS,
            "orders",
            ["billing"],
            secret=False,
            federated_subjects=[("k8s", "system:serviceaccount:prod:orders")],
        )
        registry.create(
            OPS,
            "billing",
            ["orders"],
            federated_subjects=[("k8s", "system:serviceaccount:prod:billing")],
        )
        assert trusts.remove("k8s", OPS) == 2
        assert trusts.list() == []
        assert registry.credentials_of("orders").kinds == ()
        assert registry.credentials_of("billing").kinds == ("secret",)
        # A trust added again under the name inherits nothing.
        trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_file=path)
        assert registry.credentials_of("billing").federated == ()
        assert _audit(core, "remove_trust") == [
            ("ops-admin", "trust:k8s", "ok", "federated_subjects_unbound=2")
        ]

    def test_an_unknown_trust_is_not_found(self, core: Core, trusts: TrustRegistry) -> None:
        with pytest.raises(NotFound):
            trusts.remove("ghost", OPS)
        assert _audit(core, "remove_trust") == []


class TestServing:
    def test_a_refreshed_set_with_no_rs256_or_es256_key_keeps_the_last_good_keys(
        self, core: Core, trusts: TrustRegistry
    ) -> None:
        clock = core.clock
        assert isinstance(clock, FakeClock)
        ec_key = new_ec()
        subject = "system:serviceaccount:prod:orders"
        with jwks_server() as issuer:
            issuer.routes["/keys"] = Route(jwk_set(jwk_of(ec_key, kid="p256")))
            url = issuer.url("/keys", host="127.0.0.1")
            trusts.add("k8s", ISSUER, "authsvc", origin=OPS, jwks_url=url)
            store = TrustStore(core.repo, clock, core.settings)
            store.reload()

            def verified() -> str:
                now = clock.now()
                claims = {"iss": ISSUER, "sub": subject, "aud": "authsvc"}
                token = sign({**claims, "iat": now, "exp": now + 600}, ec_key, "ES256", kid="p256")
                return store.verify(token, now=now).subject

            assert verified() == subject  # the first load
            # The issuer now publishes keys that parse but cannot sign a federated token.
            issuer.routes["/keys"] = Route(
                jwk_set(jwk_of(new_ed25519(), kid="ed"), jwk_of(new_rsa(), kid="ps", alg="PS256"))
            )
            clock.advance(core.settings.jwks_refresh_seconds)
            assert store.refresh_due() == 0
            assert issuer.hits["/keys"] == 2
            assert verified() == subject
