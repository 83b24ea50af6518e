"""Secretless credentials in the login batch, on a real SQLite database: each kind
authenticates only its own service, fails like a wrong secret, and names itself in the audit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jwt import algorithms as jwt_algorithms
from sqlalchemy import select

from authsvc.clock import to_datetime
from authsvc.crypto.secrets import SECRET_PREFIX
from authsvc.errors import ResourceExhausted, Unauthenticated
from authsvc.inputs import MAX_ID_LENGTH
from authsvc.server.app import Core, build_core
from authsvc.storage.models import AuthFailureRow
from authsvc.storage.records import AudienceGrant, CredentialRecord, ServiceRecord, TrustRecord
from authsvc.storage.repository import LoginBatch
from authsvc.usecases import logins as logins_module
from authsvc.usecases.audit import Origin
from authsvc.usecases.federation import TrustStore
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.logins import (
    AssertionCredential,
    CertificateCredential,
    Credential,
    FederatedCredential,
    Login,
    SecretCredential,
    Verdict,
)
from authsvc.usecases.tokens import TokenRequest
from authsvc.workload.assertions import verify_assertion
from authsvc.workload.certificates import match_certificate
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.public_keys import parse_public_key
from authsvc_client.assertions import ALGORITHMS_BY_KTY, AssertionSigner, PrivateKey
from tests.support.clock import FakeClock
from tests.support.inprocess import in_process_settings
from tests.support.workload import (
    WorkloadCa,
    jwk_of,
    jwk_set,
    new_ec,
    new_ed25519,
    new_rsa,
    public_pem,
    sign,
)

ISSUER = "https://authsvc.unit.invalid"
SPIFFE = "spiffe://example.org/ns/prod/sa/orders"
K8S = "https://k8s.unit.invalid"
SUBJECT = "system:serviceaccount:prod:orders"


@dataclass
class World:
    core: Core
    logins: LoginBatcher
    clock: FakeClock
    key: PrivateKey = field(repr=False)
    issuer_key: PrivateKey = field(repr=False)
    ca: WorkloadCa

    def login(self, credential: Credential) -> str:
        """The service id the credential logs in as (its grant audited as IssueToken's is);
        raises Unauthenticated."""
        origin = Origin("", "ipv4:10.0.0.9", "req")
        return self.logins.settle_sync(Login(credential, origin, "issue_token"), _Granting())

    def assertion(self, service_id: str = "orders", key: PrivateKey | None = None) -> str:
        signer = AssertionSigner(service_id, ISSUER, key or self.key, clock=self.clock.now)
        return signer.sign()

    def details(self) -> list[str]:
        return [e.detail for e in self.core.repo.list_audit_events(limit=100)]


class _Granting:
    """A policy granting any authenticated service: the login's own outcome is under test."""

    def decide(self, service: ServiceRecord) -> Verdict[str]:
        return Verdict.grant(service.service_id, "billing")

    def complete(self, prepared: str) -> str:
        return prepared


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = in_process_settings(tmp_path, AUTHSVC_ISSUER=ISSUER)
    clock = FakeClock(time.time())
    core = build_core(settings, clock)
    key, issuer_key, ca = new_ec(), new_rsa(), WorkloadCa.create("unit")
    now = to_datetime(clock.now())
    registered = parse_public_key(public_pem(key))
    core.repo.create_trust(
        TrustRecord(
            "cluster",
            K8S,
            "authsvc",
            jwk_set(jwk_of(issuer_key, kid="k1")).decode(),
            None,
            3600,
            now,
        ),
        now,
    )
    core.repo.create_service(
        "orders",
        (AudienceGrant("billing", ()),),
        None,
        now,
        credentials=(
            CredentialRecord("public_key", registered.key_id, registered.to_json()),
            CredentialRecord("tls_san", SPIFFE, SPIFFE),
            CredentialRecord("federated", "cluster", SUBJECT),
        ),
    )
    core.repo.create_service("billing", (AudienceGrant("orders", ()),), b"\x01" * 32, now)
    logins = LoginBatcher(core.repo, settings, clock)
    try:
        yield World(core, logins, clock, key, issuer_key, ca)
    finally:
        logins.close()
        core.dispose()


def _assertion(world: World, text: str, service_id: str = "orders") -> AssertionCredential:
    return AssertionCredential(service_id, text, ISSUER, 30)


class TestAssertion:
    def test_a_registered_key_logs_in_once_per_jti(self, world: World) -> None:
        text = world.assertion()
        assert world.login(_assertion(world, text)) == "orders"
        with pytest.raises(Unauthenticated, match="invalid service credentials"):
            world.login(_assertion(world, text))
        details = world.details()
        assert any(d.startswith("credential=assertion key=") for d in details)
        assert any("credential=assertion reason=replayed" in d for d in details)

    def test_after_the_assertion_expires_its_jti_may_be_pruned(self, world: World) -> None:
        world.login(_assertion(world, world.assertion()))
        assert world.core.repo.prune_used_assertions(to_datetime(world.clock.now())) == 0
        world.clock.advance(3600)
        assert world.core.repo.prune_used_assertions(to_datetime(world.clock.now())) == 1

    def test_another_key_or_service_is_refused(self, world: World) -> None:
        with pytest.raises(Unauthenticated):
            world.login(_assertion(world, world.assertion(key=new_ec())))
        # billing has no key at all: its assertion never verifies.
        with pytest.raises(Unauthenticated):
            world.login(_assertion(world, world.assertion("billing"), "billing"))
        assert "credential=assertion reason=no_key" in world.details()

    def test_a_secretless_service_never_matches_a_secret(self, world: World) -> None:
        credential = SecretCredential.present(world.core.hasher, "orders", "anything")
        with pytest.raises(Unauthenticated):
            world.login(credential)
        assert "credential=secret reason=no_secret" in world.details()


# The assertion algorithms authsvc accepts (authsvc_client.assertions.ALGORITHMS_BY_KTY), each
# with the pyjwt class that verifies it: the stand-in keys (authsvc.usecases.logins) must cost a
# signature check for every one of them.
_ALGORITHMS = {
    "RS256": "RSAAlgorithm",
    "PS256": "RSAPSSAlgorithm",
    "ES256": "ECAlgorithm",
    "EdDSA": "OKPAlgorithm",
}
_VERIFIERS = (
    jwt_algorithms.RSAAlgorithm,
    jwt_algorithms.RSAPSSAlgorithm,
    jwt_algorithms.ECAlgorithm,
    jwt_algorithms.OKPAlgorithm,
)
# What a login's assertion may claim as `sub` (the request naming no service): an unknown id, a
# known id with no registered key (a secret-only service), a known id whose keys are all of
# another type than the assertion's `alg`, and three no service id could be.
# case -> (the sub, the service id the login is then for: "" for no service at all)
_SUBJECTS = {
    "unknown_id": ("ghost", "ghost"),
    "known_id_without_keys": ("billing", "billing"),
    "known_id_with_keys_of_another_type": ("other-type", "other-type"),
    "sub_too_long": ("o" * (MAX_ID_LENGTH + 1), ""),
    "sub_a_pasted_secret": (SECRET_PREFIX + "A" * 43, ""),
    "sub_with_a_control_character": ("bad\nid", ""),
}
_PEER = "ipv4:10.0.0.9"


def _new_key(kty: str) -> PrivateKey:
    if kty == "RSA":
        return new_rsa()
    return new_ec() if kty == "EC" else new_ed25519()


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[PrivateKey, PrivateKey]]:
    """Per key type: (the key a known service registers, another key no one registered)."""
    return {kty: (_new_key(kty), _new_key(kty)) for kty in ALGORITHMS_BY_KTY}


def _kty(alg: str) -> str:
    return next(kty for kty, algs in ALGORITHMS_BY_KTY.items() if alg in algs)


def _register_key(world: World, sid: str, key: PrivateKey, now: datetime) -> None:
    """A service for billing whose one credential is `key`'s public half."""
    public = parse_public_key(public_pem(key))
    world.core.repo.create_service(
        sid,
        (AudienceGrant("billing", ()),),
        None,
        now,
        credentials=(CredentialRecord("public_key", public.key_id, public.to_json()),),
    )


class TestUnknownIdsCostWhatKnownOnesDo:
    """DESIGN: a wrong id costs what a wrong credential does, whether the id exists or not.
    Counted, not timed: the statements each check runs on the real database, the calls of
    the assertion verifier, and the signature verifications made (pyjwt's, by algorithm)."""

    def _work(
        self, world: World, monkeypatch: pytest.MonkeyPatch, credential: Credential
    ) -> tuple[list[str], int, list[str]]:
        statements: list[str] = []
        verified: list[int] = []
        signatures: list[str] = []
        rows, verify = LoginBatch._rows, verify_assertion

        def counting_rows(batch: LoginBatch, name: str, values: Any) -> list[Any]:
            statements.append(name)
            return rows(batch, name, values)

        def counting_verify(*args: Any, **kwargs: Any) -> Any:
            verified.append(1)
            return verify(*args, **kwargs)

        def counting(cls: type[Any]) -> Any:
            real = cls.__dict__["verify"]

            def counted(self: Any, msg: bytes, key: Any, sig: bytes) -> bool:
                signatures.append(cls.__name__)
                return bool(real(self, msg, key, sig))

            return counted

        monkeypatch.setattr(LoginBatch, "_rows", counting_rows)
        monkeypatch.setattr(logins_module, "verify_assertion", counting_verify)
        for cls in _VERIFIERS:
            monkeypatch.setattr(cls, "verify", counting(cls))
        with world.core.repo.login_batch(to_datetime(world.clock.now()), 60) as batch:
            service = batch.service(credential.service_id)
            statements.clear()  # the service lookup is every kind's, known id or not
            match = credential.check(batch, service)
        monkeypatch.undo()
        assert not match.ok
        return statements, len(verified), signatures

    def _presented(self, world: World, assertion: str) -> Credential:
        """The credential IssueToken makes of an assertion sent without a service_id: the
        unverified `sub` says whose keys to try (authsvc.usecases.tokens)."""
        request = TokenRequest("", "", "billing", client_assertion=assertion)
        request.check()  # a well-formed request: whatever `sub` says is decided in the login
        return request.credential(world.core.hasher, ISSUER, 30)

    def _failure_keys(self, world: World) -> set[str]:
        with world.core.repo.engine.connect() as conn:
            return set(conn.execute(select(AuthFailureRow.key)).scalars())

    def test_the_known_id_baseline_is_one_failed_signature_check(
        self,
        world: World,
        monkeypatch: pytest.MonkeyPatch,
        keys: dict[str, tuple[PrivateKey, PrivateKey]],
    ) -> None:
        """The comparison below is fair: a known id with a key of each type refuses another
        key's assertion after exactly one signature check of that algorithm."""
        # Every algorithm authsvc accepts is tried here (a new one fails until it is added).
        assert set(_ALGORITHMS) == {a for algs in ALGORITHMS_BY_KTY.values() for a in algs}
        now = to_datetime(world.clock.now())
        for alg, verifier in _ALGORITHMS.items():
            registered, wrong = keys[_kty(alg)]
            sid = f"known-{alg.lower()}"
            _register_key(world, sid, registered, now)
            signer = AssertionSigner(
                sid, ISSUER, wrong, clock=world.clock.now, rsa_pss=alg == "PS256"
            )
            credential = self._presented(world, signer.sign())
            assert credential.service_id == sid
            assert self._work(world, monkeypatch, credential) == (["workload"], 1, [verifier])
            # The right key does log in: the baseline refuses only for the key.
            right = AssertionSigner(
                sid, ISSUER, registered, clock=world.clock.now, rsa_pss=alg == "PS256"
            )
            assert world.login(self._presented(world, right.sign())) == sid

    @pytest.mark.parametrize("case", list(_SUBJECTS))
    @pytest.mark.parametrize("alg", list(_ALGORITHMS))
    def test_an_assertion_naming_no_service_with_keys(
        self,
        world: World,
        monkeypatch: pytest.MonkeyPatch,
        keys: dict[str, tuple[PrivateKey, PrivateKey]],
        alg: str,
        case: str,
    ) -> None:
        registered, wrong = keys[_kty(alg)]
        another = keys["EC" if _kty(alg) != "EC" else "OKP"][0]
        now = to_datetime(world.clock.now())
        for sid, key in (("known", registered), ("other-type", another)):
            _register_key(world, sid, key, now)

        def assertion(sub: str) -> str:
            pss = alg == "PS256"
            return AssertionSigner(sub, ISSUER, wrong, clock=world.clock.now, rsa_pss=pss).sign()

        sub, service_id = _SUBJECTS[case]
        statements, calls, signatures = self._work(
            world, monkeypatch, self._presented(world, assertion("known"))
        )
        # A known id's refused login: its key query, one signature check of `alg`.
        assert (statements, calls, signatures) == (["workload"], 1, [_ALGORITHMS[alg]])
        credential = self._presented(world, assertion(sub))
        assert credential.service_id == service_id
        same_statements, same_calls, same_signatures = self._work(world, monkeypatch, credential)
        assert (same_statements, same_signatures) == (statements, signatures)
        # The verifier is called once; for keys of another type twice: they refuse `alg`
        # before any signature check, then the stand-ins spend it (the first call only read
        # the header).
        assert same_calls == (2 if case == "known_id_with_keys_of_another_type" else 1)

        # Refused as any wrong credential; an id no service has is audited on the peer's
        # aggregated row, a known one on a row of its own.
        with pytest.raises(Unauthenticated, match="invalid service credentials"):
            world.login(credential)
        rows = [
            r for r in world.core.repo.list_audit_events(limit=100) if r.action == "issue_token"
        ]
        if service_id in ("billing", "other-type"):
            reason = "no_key" if service_id == "billing" else "algorithm_not_allowed"
            assert [(r.actor, r.outcome, r.count, r.detail) for r in rows] == [
                (service_id, "bad_credentials", 1, f"credential=assertion reason={reason}")
            ]
        else:
            assert [(r.actor, r.target, r.outcome, r.peer, r.count, r.detail) for r in rows] == [
                ("*", "*", "unknown_service", _PEER, 1, "credential=assertion reason=no_key")
            ]
            # The id the caller chose (or pasted) is written nowhere in the trail.
            assert not any(sub in f"{r.actor} {r.target} {r.detail}" for r in rows)
        # The failure counts for the peer, and for the id only when a service could have it:
        # no throttle key is named after a `sub` no service id could be.
        failure_keys = self._failure_keys(world)
        assert failure_keys == {f"peer:{_PEER}"} | ({f"id:{service_id}"} if service_id else set())
        assert service_id or not any(sub in key for key in failure_keys)

    def test_a_certificate_for_an_unknown_id(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cert = world.ca.issue(uris=("spiffe://example.org/ns/prod/sa/ghost",)).decode()
        parsed: list[int] = []
        real = match_certificate

        def counting_match(*args: Any, **kwargs: Any) -> Any:
            parsed.append(1)
            return real(*args, **kwargs)

        outcomes = []
        for service_id in ("orders", "ghost"):
            monkeypatch.setattr(logins_module, "match_certificate", counting_match)
            statements, _, _ = self._work(
                world, monkeypatch, CertificateCredential(service_id, cert)
            )
            outcomes.append((statements, len(parsed)))
            parsed.clear()
        assert outcomes[0] == outcomes[1] == (["workload"], 1)


class TestCertificate:
    def test_the_registered_spiffe_id_logs_in(self, world: World) -> None:
        cert = world.ca.issue(uris=(SPIFFE,)).decode()
        assert world.login(CertificateCredential("orders", cert)) == "orders"
        assert f"credential=certificate san={SPIFFE}" in world.details()

    def test_another_identity_or_service_is_refused(self, world: World) -> None:
        other = world.ca.issue(uris=("spiffe://example.org/ns/prod/sa/billing",)).decode()
        right = world.ca.issue(uris=(SPIFFE,)).decode()
        for credential in (
            CertificateCredential("orders", other),
            CertificateCredential("billing", right),
        ):
            with pytest.raises(Unauthenticated):
                world.login(credential)


class TestFederated:
    def _store(self, world: World) -> TrustStore:
        store = TrustStore(world.core.repo, world.clock, world.core.settings)
        store.reload()
        return store

    def _token(self, world: World, **claims: object) -> str:
        now = int(world.clock.now())
        body = {"iss": K8S, "sub": SUBJECT, "aud": ["authsvc"], "iat": now, "exp": now + 600}
        return sign({**body, **claims}, world.issuer_key, "RS256", kid="k1")

    def test_the_bound_subject_logs_in_as_its_service(self, world: World) -> None:
        identity = self._store(world).verify(self._token(world), now=world.clock.now())
        assert world.login(FederatedCredential(identity)) == "orders"
        assert f"credential=federated trust=cluster subject={SUBJECT}" in world.details()
        with pytest.raises(Unauthenticated):
            world.login(FederatedCredential(identity, named_service_id="billing"))

    def test_an_unbound_subject_or_a_refused_token_fails_like_an_unknown_id(
        self, world: World
    ) -> None:
        store = self._store(world)
        unbound = store.verify(
            self._token(world, sub="system:serviceaccount:x:y"), now=world.clock.now()
        )
        for credential in (
            FederatedCredential(unbound),
            FederatedCredential(None, Reason.BAD_SIGNATURE),
        ):
            with pytest.raises(Unauthenticated):
                world.login(credential)

    def test_a_removed_trust_is_gone_after_reload(self, world: World) -> None:
        store = self._store(world)
        token = self._token(world)
        store.verify(token, now=world.clock.now())
        world.core.repo.delete_trust("cluster", to_datetime(world.clock.now()))
        store.reload()
        with pytest.raises(WorkloadAuthError) as caught:
            store.verify(token, now=world.clock.now())
        assert caught.value.reason is Reason.UNKNOWN_ISSUER
        assert world.core.repo.fetch_federated_binding("cluster", SUBJECT) is None

    def test_a_stored_trust_that_no_longer_parses_is_skipped(self, world: World) -> None:
        now = to_datetime(world.clock.now())
        world.core.repo.create_trust(
            TrustRecord(
                "broken",
                "https://broken.invalid",
                "authsvc",
                json.dumps({"keys": []}),
                None,
                60,
                now,
            ),
            now,
        )
        store = self._store(world)
        assert store.trust_names == ("cluster",)

    def test_failures_bound_to_no_service_count_for_the_peer_only(self, world: World) -> None:
        # Every unbound or unverifiable federated token has no service id: were they counted
        # under one id key, a few of them anywhere in the fleet would throttle all the others.
        settings = world.core.settings.with_overrides(
            throttle_id_failures=2, throttle_peer_failures=5
        )
        logins = LoginBatcher(world.core.repo, settings, world.clock)
        origin = Origin("", "ipv4:10.0.0.9", "req")
        try:
            for _ in range(5):
                with pytest.raises(Unauthenticated):
                    logins.authenticate_sync(
                        Login(
                            FederatedCredential(None, Reason.BAD_SIGNATURE), origin, "issue_token"
                        )
                    )
            # The peer's own limit still binds it.
            with pytest.raises(ResourceExhausted):
                logins.authenticate_sync(
                    Login(FederatedCredential(None, Reason.BAD_SIGNATURE), origin, "issue_token")
                )
        finally:
            logins.close()
