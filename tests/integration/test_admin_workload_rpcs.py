"""The admin service RPCs with workload credentials (issue 14), on a real `authsvc serve`.

CreateService registers public keys, certificate SANs and federated subjects, with or without
a secret; UpdateService adds and removes them; every RPC that returns a Service shows them by
id (key ids, SANs, subjects: never key material). Refusals are the same statuses and messages
the CLI gives, as they come from one use case.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client.assertions import PrivateKey, jwk_thumbprint
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import World, make_world
from tests.support.workload import (
    jwk_of,
    jwk_set,
    new_ec,
    new_ed25519,
    new_rsa,
    private_pem,
    public_pem,
)

SPIFFE = "spiffe://example.org/ns/prod/sa/{}"
SUBJECT = "system:serviceaccount:prod:{}"
# Service ids for the cases that share the module's server.
_IDS = itertools.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A running server with an admin, and a trust `k8s` added with the CLI."""
    folder = tmp_path_factory.mktemp("authsvc")
    w, server = make_world(folder)
    jwks = folder / "k8s.json"
    jwks.write_bytes(jwk_set(jwk_of(new_rsa(), kid="k8s-1")))
    server.cli(
        "trust", "add", "k8s", "--issuer", "https://kubernetes.default.svc",
        "--audience", "authsvc", "--jwks-file", str(jwks),
    )  # fmt: skip
    try:
        yield w
    finally:
        server.stop()


def _kid(key: PrivateKey) -> str:
    return jwk_thumbprint(key.public_key())


def _pem(key: PrivateKey) -> str:
    return public_pem(key).decode("ascii")


def _subject(trust: str, subject: str) -> auth_pb2.FederatedSubject:
    return auth_pb2.FederatedSubject(trust=trust, subject=subject)


def _create(world: World, **fields: Any) -> auth_pb2.CreateServiceResponse:
    return world.server.stub.CreateService(  # type: ignore[no-any-return]
        auth_pb2.CreateServiceRequest(**fields), metadata=world.admin_md(), timeout=10
    )


def _update(world: World, service_id: str, **fields: Any) -> auth_pb2.Service:
    reply = world.server.stub.UpdateService(
        auth_pb2.UpdateServiceRequest(service_id=service_id, **fields),
        metadata=world.admin_md(),
        timeout=10,
    )
    return reply.service


def _listed(world: World, service_id: str) -> auth_pb2.Service:
    reply = world.server.stub.ListServices(
        auth_pb2.ListServicesRequest(), metadata=world.admin_md(), timeout=10
    )
    [service] = [s for s in reply.services if s.service_id == service_id]
    return service


def _credentials(service: auth_pb2.Service) -> tuple[Any, ...]:
    return (
        service.has_secret,
        list(service.public_key_ids),
        list(service.tls_sans),
        [(f.trust, f.subject) for f in service.federated_subjects],
    )


def _refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), str(exc.value.details())  # type: ignore[attr-defined]


class TestCreateService:
    def test_a_secretless_service_with_every_kind_of_credential(self, world: World) -> None:
        ec_key, ed_key = new_ec(), new_ed25519()
        reply = _create(
            world,
            service_id="rpc-orders",
            audiences=["billing"],
            scopes=["billing.read"],
            no_secret=True,
            public_keys=[_pem(ec_key), json.dumps(jwk_of(ed_key))],
            tls_sans=[SPIFFE.format("orders"), "Orders.Example.ORG"],
            federated_subjects=[_subject("k8s", SUBJECT.format("orders"))],
        )
        assert reply.service_secret == ""
        expected = (
            False,
            [_kid(ec_key), _kid(ed_key)],
            [SPIFFE.format("orders"), "orders.example.org"],
            [("k8s", SUBJECT.format("orders"))],
        )
        assert _credentials(reply.service) == expected
        assert _credentials(_listed(world, "rpc-orders")) == expected
        assert list(reply.service.audiences) == ["billing"]
        # Services registered the old way: a secret and nothing else.
        assert _credentials(_listed(world, "orders")) == (True, [], [], [])

    def test_a_secret_beside_a_key(self, world: World) -> None:
        key = new_rsa()
        reply = _create(
            world, service_id="rpc-mixed", audiences=["billing"], public_keys=[_pem(key)]
        )
        assert reply.service_secret
        # The secret works as before.
        world.server.issue("rpc-mixed", reply.service_secret, "billing")
        assert _credentials(reply.service) == (True, [_kid(key)], [], [])

    @pytest.mark.parametrize(
        ("fields", "code", "named"),
        [
            ({"no_secret": True}, grpc.StatusCode.INVALID_ARGUMENT, "public_keys, tls_sans"),
            (
                {"public_keys": ["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]},
                grpc.StatusCode.INVALID_ARGUMENT,
                "public_keys: public key: not a PEM public key",
            ),
            ({"tls_sans": ["*.example.org"]}, grpc.StatusCode.INVALID_ARGUMENT, "wildcards"),
            (
                {"federated_subjects": [_subject("ghost", "x")]},
                grpc.StatusCode.FAILED_PRECONDITION,
                "no trust named 'ghost'",
            ),
            (
                {"federated_subjects": [_subject("k8s", "")]},
                grpc.StatusCode.INVALID_ARGUMENT,
                "a subject is 1-256 characters",
            ),
        ],
    )
    def test_refusals_register_nothing(
        self, world: World, fields: dict[str, Any], code: grpc.StatusCode, named: str
    ) -> None:
        got, details = _refused(
            lambda: _create(world, service_id="rpc-refused", audiences=["billing"], **fields)
        )
        assert (got, named in details) == (code, True), details
        reply = world.server.stub.ListServices(
            auth_pb2.ListServicesRequest(), metadata=world.admin_md(), timeout=10
        )
        assert "rpc-refused" not in [s.service_id for s in reply.services]

    def test_a_private_key_is_refused_without_echoing_it(self, world: World) -> None:
        pem = private_pem(new_ec()).decode("ascii")
        code, details = _refused(
            lambda: _create(
                world, service_id="rpc-leak", audiences=["b"], no_secret=True, public_keys=[pem]
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "private key" in details
        assert pem.splitlines()[1][:20] not in details
        server_log = "".join(world.server.output)
        assert pem.splitlines()[1][:20] not in server_log

    def test_a_federated_subject_bound_to_another_service(self, world: World) -> None:
        subject = _subject("k8s", SUBJECT.format("payments"))
        _create(world, service_id="rpc-payments", audiences=["b"], federated_subjects=[subject])
        code, details = _refused(
            lambda: _create(
                world, service_id="rpc-payments-2", audiences=["b"], federated_subjects=[subject]
            )
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert "bound to service 'rpc-payments'" in details


class TestUpdateService:
    def test_credentials_only_then_with_grants(self, world: World) -> None:
        old, new = new_ec(), new_rsa()
        _create(
            world,
            service_id="rpc-roll",
            audiences=["billing"],
            no_secret=True,
            public_keys=[_pem(old)],
        )
        service = _update(
            world,
            "rpc-roll",
            add_public_keys=[json.dumps(jwk_of(new))],
            remove_public_key_ids=[_kid(old)],
            add_tls_sans=[SPIFFE.format("roll")],
            add_federated_subjects=[_subject("k8s", SUBJECT.format("roll"))],
        )
        assert _credentials(service) == (
            False,
            [_kid(new)],
            [SPIFFE.format("roll")],
            [("k8s", SUBJECT.format("roll"))],
        )
        service = _update(
            world,
            "rpc-roll",
            add_scopes=["billing.read"],
            remove_tls_sans=[SPIFFE.format("roll")],
            remove_federated_subjects=[_subject("k8s", SUBJECT.format("roll"))],
        )
        assert _credentials(service) == (False, [_kid(new)], [], [])
        assert [list(g.scopes) for g in service.grants] == [["billing.read"]]
        assert _credentials(_listed(world, "rpc-roll")) == _credentials(service)

    @pytest.mark.parametrize(
        ("fields", "code", "named"),
        [
            ({}, grpc.StatusCode.INVALID_ARGUMENT, "nothing to change"),
            (
                {"remove_public_key_ids": ["nope"]},
                grpc.StatusCode.FAILED_PRECONDITION,
                "public key nope is not registered",
            ),
            (
                {"add_tls_sans": [SPIFFE.format("x")], "remove_tls_sans": [SPIFFE.format("x")]},
                grpc.StatusCode.INVALID_ARGUMENT,
                "named both to add and to remove",
            ),
            (
                {"remove_tls_sans": [SPIFFE.format("last")]},
                grpc.StatusCode.FAILED_PRECONDITION,
                "no way to log in",
            ),
        ],
    )
    def test_refusals_change_nothing(
        self, world: World, fields: dict[str, Any], code: grpc.StatusCode, named: str
    ) -> None:
        name = f"rpc-upd-{next(_IDS)}"
        _create(
            world,
            service_id=name,
            audiences=["billing"],
            no_secret=True,
            tls_sans=[SPIFFE.format("last")],
        )
        before = _listed(world, name)
        got, details = _refused(lambda: _update(world, name, **fields))
        assert (got, named in details) == (code, True), details
        assert _listed(world, name) == before

    def test_an_unknown_service(self, world: World) -> None:
        code, _ = _refused(lambda: _update(world, "ghost", add_tls_sans=[SPIFFE.format("g")]))
        assert code == grpc.StatusCode.NOT_FOUND


class TestDisableAndEnable:
    def test_they_show_the_credentials_too(self, world: World) -> None:
        key = new_ec()
        _create(
            world,
            service_id="rpc-toggle",
            audiences=["billing"],
            no_secret=True,
            public_keys=[_pem(key)],
        )
        md = world.admin_md()
        stub = world.server.stub
        disabled = stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id="rpc-toggle"), metadata=md, timeout=10
        ).service
        assert disabled.disabled and _credentials(disabled) == (False, [_kid(key)], [], [])
        enabled = stub.EnableService(
            auth_pb2.EnableServiceRequest(service_id="rpc-toggle"), metadata=md, timeout=10
        ).service
        assert not enabled.disabled and _credentials(enabled) == _credentials(disabled)


def test_a_trust_removed_with_the_cli_unbinds_what_list_services_shows(
    world: World, tmp_path: Path
) -> None:
    jwks = tmp_path / "gke.json"
    jwks.write_bytes(jwk_set(jwk_of(new_ec())))
    world.server.cli(
        "trust", "add", "gke", "--issuer", "https://container.googleapis.com/v1/x",
        "--audience", "authsvc", "--jwks-file", str(jwks),
    )  # fmt: skip
    _create(
        world,
        service_id="rpc-gke",
        audiences=["billing"],
        federated_subjects=[_subject("gke", SUBJECT.format("gke"))],
    )
    assert _credentials(_listed(world, "rpc-gke"))[3] == [("gke", SUBJECT.format("gke"))]
    world.server.cli("trust", "remove", "gke")
    assert _credentials(_listed(world, "rpc-gke")) == (True, [], [], [])
