"""Every admin RPC refuses every caller that is not an admin, and a refused call changes nothing.

The methods come from the served contract (`auth_pb2.DESCRIPTOR`), not from a list kept here.
Each is public by design (PUBLIC: the request carries its own proof, or it only publishes), a
follower's (FOLLOWER: any registered service's token for audience authsvc), or an admin's (every
other). A new RPC fails `test_every_method_of_the_contract_is_classified` until it is placed in
one of them, and `test_an_unclassified_or_admin_method_refuses_a_bare_call` probes it at once.

Each admin method, and each admin variant of a public method (RevokeToken by jti or service_id,
RotateServiceSecret without current_secret), is called on one real `authsvc serve` by callers
that are not admins: no token, a malformed header, a forged or unsigned token, a token for
another audience, a revoked, expired or disabled admin's token (UNAUTHENTICATED: the token is not
a valid admin token), and valid tokens for authsvc without the admin scope (PERMISSION_DENIED),
as `authsvc.usecases.callers.Callers.admin` intends. The refused calls aim at what the test
watches (the service orders, the jti of its live token, a disabled service), and afterwards
ListServices, ListSigningKeys, that token, orders' secret and the audit trail are unchanged. The
same requests with an admin token succeed (positive controls on throwaway targets; the
compromise rotation, which ends every token, last), so no refusal comes from a malformed request.

No assertion message holds a token or a secret: callers are named, never shown, and every
assertion tests a local computed before it, so that pytest's report of a failed assertion
(which shows the arguments of the calls in it) shows none either.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authsvc.storage.engine import make_engine
from authsvc.storage.repository import Repository
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN, World, make_world
from tests.security.forge import attacker_key, claims, header, segment, sign, unb64url

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
ADMIN_AUDIENCE = "authsvc"  # the server's own name, by default
# authsvc_client.claims.ADMIN_SCOPE and ACCESS_TOKEN_TYPE (the contract's names), spelled out:
# mypy run on this file alone does not see the client package.
ADMIN_SCOPE = "authsvc.admin"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

# Public by design (DESIGN.md, "The gRPC contract"), and why.
PUBLIC: dict[str, str] = {
    "IssueToken": "the request carries the caller's own credential (secret, assertion, "
    "or the call's verified client certificate)",
    "ExchangeToken": "the subject token and the actor's own credential are the proof",
    "ValidateToken": "every service checks the tokens presented to it; answers only a verdict",
    "ValidateTokenStream": "ValidateToken over one stream",
    "GetJwks": "publishes public keys only",
    "RevokeToken": "by token: presenting it is enough (RFC 7009); by jti or service_id: admin, "
    "tested below",
    "RotateServiceSecret": "with current_secret: the service itself; without: admin, tested below",
}
# Any registered service's token for the server's own audience, no scope (Callers.follower).
FOLLOWER: dict[str, str] = {
    "WatchRevocations": "local validators follow revocations with a scopeless token for authsvc",
}
# The other services on the port, all public: load balancers probe health; reflection
# describes the public contract.
OTHER_SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}
# The RevokeToken targets (its `target` oneof): who may use each.
REVOKE_TARGETS = {"token": "public", "jti": "admin", "service_id": "admin"}

_IDS = itertools.count()


# -- calling any method of the contract by name ------------------------------------------------


def invoke(
    channel: grpc.Channel,
    method: str,
    request: Message,
    metadata: Sequence[tuple[str, str]],
    timeout: float = 15,
) -> Any:
    """Call `method` the way its descriptor says (unary or streaming either side); a stream's
    answers are consumed to the end and returned as a list."""
    m = SERVICE.methods_by_name[method]
    assert request.DESCRIPTOR.full_name == m.input_type.full_name, method
    path = f"/{SERVICE.full_name}/{m.name}"
    serialize = type(request).SerializeToString
    deserialize = GetMessageClass(m.output_type).FromString
    md = tuple(metadata)
    if m.client_streaming and m.server_streaming:
        multi = channel.stream_stream(path, serialize, deserialize)
        return list(multi(iter([request]), metadata=md, timeout=timeout))
    if m.client_streaming:
        upload = channel.stream_unary(path, serialize, deserialize)
        return upload(iter([request]), metadata=md, timeout=timeout)
    if m.server_streaming:
        download = channel.unary_stream(path, serialize, deserialize)
        return list(download(request, metadata=md, timeout=timeout))
    unary = channel.unary_unary(path, serialize, deserialize)
    return unary(request, metadata=md, timeout=timeout)


def outcome(
    channel: grpc.Channel, method: str, request: Message, metadata: Sequence[tuple[str, str]]
) -> tuple[grpc.StatusCode, str]:
    """The call's status code and message (OK, "" when it succeeds); never its answer."""
    try:
        invoke(channel, method, request, metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or ""
        return code, details
    return OK, ""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _kid(token: str) -> str:
    return str(json.loads(unb64url(token.split(".")[0]))["kid"])


# -- the module's server and what it holds ----------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a refused admin call must not change (ListServices, ListSigningKeys, audit)."""

    services: tuple[bytes, ...]
    service_ids: tuple[str, ...]
    keys: tuple[bytes, ...]
    key_states: tuple[tuple[str, str], ...]
    audit_id: int


@dataclass(repr=False)
class Setup:
    world: World
    repo: Repository
    reader_secret: str
    elsewhere_secret: str
    revoked_admin: str
    expired_admin: str
    disabled_admin: str
    attacker: RSAPrivateKey

    def __repr__(self) -> str:  # holds secrets and tokens: failures print reprs
        return "Setup()"

    @property
    def channel(self) -> grpc.Channel:
        return self.world.server.channel

    @property
    def stub(self) -> Any:
        return self.world.server.stub

    def token(self, service_id: str, secret: str, audience: str, ttl: int = 0) -> str:
        return str(self.world.server.issue(service_id, secret, audience, ttl=ttl).access_token)

    def admin_md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.world.admin_token())

    def validate(
        self, token: str, audience: str, scopes: Sequence[str] = ()
    ) -> auth_pb2.ValidateTokenResponse:
        response: auth_pb2.ValidateTokenResponse = self.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(
                token=token, audience=audience, required_scopes=list(scopes)
            ),
            timeout=10,
        )
        return response

    def jti(self, token: str, audience: str) -> str:
        response = self.validate(token, audience)
        assert response.valid, "a freshly issued token does not validate"
        return str(response.claims.jti)

    def create(self, service_id: str, **fields: Any) -> str:
        """A service registered by the admin over CreateService; its secret."""
        reply = self.stub.CreateService(
            auth_pb2.CreateServiceRequest(service_id=service_id, **fields),
            metadata=self.admin_md(),
            timeout=10,
        )
        return str(reply.service_secret)

    def disable(self, service_id: str) -> None:
        self.stub.DisableService(
            auth_pb2.DisableServiceRequest(service_id=service_id),
            metadata=self.admin_md(),
            timeout=10,
        )

    def audit_id(self) -> int:
        rows = self.repo.list_audit_events(limit=1)
        return rows[0].id if rows else 0

    def audit_since(self, audit_id: int) -> list[tuple[str, str, str, str]]:
        """(actor, action, target, outcome) of every audit row after `audit_id`."""
        rows = self.repo.list_audit_events(limit=10_000)
        return [(r.actor, r.action, r.target, r.outcome) for r in rows if r.id > audit_id]

    def snapshot(self) -> Snapshot:
        md = self.admin_md()
        services = self.stub.ListServices(
            auth_pb2.ListServicesRequest(), metadata=md, timeout=10
        ).services
        keys = self.stub.ListSigningKeys(
            auth_pb2.ListSigningKeysRequest(), metadata=md, timeout=10
        ).keys
        return Snapshot(
            services=tuple(s.SerializeToString(deterministic=True) for s in services),
            service_ids=tuple(s.service_id for s in services),
            keys=tuple(k.SerializeToString(deterministic=True) for k in keys),
            key_states=tuple((k.key_id, k.state) for k in keys),
            audit_id=self.audit_id(),
        )

    def scopes_of(self, service_id: str, secret: str) -> list[str]:
        """The scopes of the service's next token for authsvc."""
        issued = self.world.server.issue(service_id, secret, ADMIN_AUDIENCE)
        return list(issued.scopes)

    def logs_in(self, service_id: str, secret: str) -> grpc.StatusCode:
        try:
            self.token(service_id, secret, ADMIN_AUDIENCE)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return OK


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One server for the module (SQLite), with a zero leeway so that a token expires at once.

    Besides make_world's ops-admin, orders and billing: reader (a grant for authsvc with scope
    authsvc.read, not the admin one), elsewhere (scope authsvc.admin, but granted for audience
    billing only), dormant (disabled), and three admin tokens that no longer work: one revoked,
    one expired, one of an admin service since disabled.
    """
    folder = tmp_path_factory.mktemp("authsvc-admin-authz")
    world, server = make_world(folder, AUTHSVC_LEEWAY_SECONDS="0")
    engine = make_engine(server.env["AUTHSVC_DATABASE_URL"])
    try:
        expiring = world.server.issue(ADMIN, world.admin_secret, ADMIN_AUDIENCE, ttl=1)
        setup = Setup(
            world=world,
            repo=Repository(engine),
            reader_secret="",
            elsewhere_secret="",
            revoked_admin="",
            expired_admin=expiring.access_token,
            disabled_admin="",
            attacker=attacker_key(),
        )
        setup.reader_secret = setup.create(
            "reader", audiences=[ADMIN_AUDIENCE], scopes=["authsvc.read"]
        )
        setup.elsewhere_secret = setup.create(
            "elsewhere", grants=[auth_pb2.Grant(audience="billing", scopes=[ADMIN_SCOPE])]
        )
        setup.create("dormant", audiences=["billing"])
        setup.disable("dormant")
        # An admin (the grant `--admin` gives: authsvc.admin for authsvc only), then disabled.
        old_secret = setup.create("ops-admin-old", grants=GRANT_ADMIN)
        setup.disabled_admin = setup.token("ops-admin-old", old_secret, ADMIN_AUDIENCE)
        setup.disable("ops-admin-old")
        setup.revoked_admin = world.admin_token()
        revoked = setup.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=setup.revoked_admin), timeout=10
        )
        assert revoked.revoked
        time.sleep(max(0.0, expiring.expires_at.seconds + 1.2 - time.time()))
        yield setup
    finally:
        engine.dispose()
        server.stop()


# -- the callers that are not admins ----------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    # What an admin RPC answers it (Callers.admin): UNAUTHENTICATED when the call has no valid
    # admin token at all, PERMISSION_DENIED for a valid token for authsvc without the scope.
    refused_with: grpc.StatusCode
    # Whether WatchRevocations lets it follow (Callers.follower).
    follows: bool
    # What ValidateToken says of its token for authsvc with the admin scope (None: no token).
    reason: int | None
    metadata: tuple[tuple[str, str], ...] = field(repr=False)
    token: str = field(default="", repr=False)


def _forged_admin(s: Setup, alg: str) -> str:
    """ops-admin's claims for authsvc with the admin scope, under the active key's kid, signed
    by an attacker's key (RS256) or not at all (alg none)."""
    kid = _kid(s.world.admin_token())
    body = claims(sub=ADMIN, client_id=ADMIN, aud=ADMIN_AUDIENCE, scope=ADMIN_SCOPE)
    if alg == "none":
        return f"{segment(header(kid, alg='none'))}.{segment(body)}."
    return sign(s.attacker, header(kid), body)


def non_admins(s: Setup) -> list[Caller]:
    """Every caller an admin RPC must refuse, with fresh tokens (so a compromise rotation run
    before does not turn a PERMISSION_DENIED case into an UNAUTHENTICATED one)."""
    w = s.world
    follower = w.follower_token()  # billing's scopeless token for authsvc
    reader = s.token("reader", s.reader_secret, ADMIN_AUDIENCE)
    other_audience = s.token("orders", w.orders_secret, "billing")
    elsewhere = s.token("elsewhere", s.elsewhere_secret, "billing")
    forged = _forged_admin(s, "RS256")
    unsigned = _forged_admin(s, "none")
    u, d, v = UNAUTHENTICATED, PERMISSION_DENIED, auth_pb2

    def holding(name: str, code: grpc.StatusCode, reason: int, token: str) -> Caller:
        follows = code == PERMISSION_DENIED  # a valid token for authsvc
        return Caller(name, code, follows, reason, bearer(token), token)

    basic = (("authorization", "Basic b3BzLWFkbWluOmFkbWlu"),)
    two = (*bearer(follower), *bearer(w.admin_token()))
    return [
        Caller("no authorization metadata", u, False, None, ()),
        Caller("a Basic authorization header", u, False, None, basic),
        Caller("two Bearer headers, the second an admin token", u, False, None, two),
        holding("a bearer value that is no JWT", u, v.MALFORMED, "not.a.jwt"),
        holding("admin claims signed by an attacker's key", u, v.BAD_SIGNATURE, forged),
        holding("admin claims with alg none", u, v.BAD_SIGNATURE, unsigned),
        holding("orders' token for audience billing", u, v.WRONG_AUDIENCE, other_audience),
        holding("scope authsvc.admin for audience billing", u, v.WRONG_AUDIENCE, elsewhere),
        holding("a revoked admin token", u, v.REVOKED, s.revoked_admin),
        holding("an expired admin token", u, v.EXPIRED, s.expired_admin),
        holding("a disabled admin's token", u, v.SERVICE_DISABLED, s.disabled_admin),
        holding("billing's scopeless token for authsvc", d, v.INSUFFICIENT_SCOPE, follower),
        holding("reader's authsvc.read token for authsvc", d, v.INSUFFICIENT_SCOPE, reader),
    ]


# -- the admin calls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What an admin call acts on. The refused calls aim at what the test watches (orders, the
    jti of orders' live token, the disabled dormant), so one that got through would show."""

    service: str  # updated, disabled, revoked, its secret rotated
    jti: str  # revoked by jti
    disabled: str  # enabled
    new_service: str  # created
    secret: str = field(default="", repr=False)  # `service`'s (positive controls)
    token: str = field(default="", repr=False)  # a live token of `service` for billing


@dataclass(frozen=True)
class Before:
    snapshot: Snapshot
    active_kid: str


Check = Callable[[Setup, Targets, Any, Before], None]


@dataclass(frozen=True)
class AdminCase:
    id: str
    method: str
    build: Callable[[Targets], Message]
    action: str | None  # its audit row's action (None: a read, not audited)
    check: Check  # what the admin's accepted call did


def _reason(s: Setup, token: str) -> str:
    return str(auth_pb2.ValidationFailure.Name(s.validate(token, "billing").reason))


def _listed(s: Setup, t: Targets, r: Any, b: Before) -> None:
    states = {x.service_id: x.disabled for x in r.services}
    assert states.get("orders") is False and states.get(t.service) is False, "ListServices"
    assert states.get(t.disabled) is True, "ListServices does not show the disabled service"


def _keys_listed(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert [k.key_id for k in r.keys if k.state == "active"] == [b.active_kid], "ListSigningKeys"


def _created(s: Setup, t: Targets, r: Any, b: Before) -> None:
    created, has_secret = r.service.service_id, bool(r.service_secret)
    assert created == t.new_service and has_secret, "CreateService"
    scopes = s.scopes_of(t.new_service, r.service_secret)
    assert scopes == [ADMIN_SCOPE], "the created service is no admin"


def _updated(s: Setup, t: Targets, r: Any, b: Before) -> None:
    granted = {g.audience: list(g.scopes) for g in r.service.grants}
    assert granted.get(ADMIN_AUDIENCE) == [ADMIN_SCOPE], "UpdateService did not grant"
    scopes = s.scopes_of(t.service, t.secret)
    assert scopes == [ADMIN_SCOPE], "the updated service's next login is no admin"


def _disabled(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert r.service.disabled, "DisableService"
    reason = _reason(s, t.token)
    assert reason == "SERVICE_DISABLED", "the disabled service's token"


def _enabled(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert r.service.service_id == t.disabled and not r.service.disabled, "EnableService"


def _revoked(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert r.revoked, "RevokeToken"
    reason = _reason(s, t.token)
    assert reason == "REVOKED", "the revoked token still validates"


def _secret_rotated(s: Setup, t: Targets, r: Any, b: Before) -> None:
    new, old = s.logs_in(t.service, r.service_secret), s.logs_in(t.service, t.secret)
    assert new == OK, "the new secret does not log in"
    assert old == UNAUTHENTICATED, "the old secret still logs in"


def _key_rotated(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert r.key_id and r.key_id != b.active_kid, "RotateSigningKey kept the active key"
    valid, signer = s.validate(t.token, "billing").valid, _kid(s.world.admin_token())
    assert valid, "a token of the previous key stopped"
    assert signer == r.key_id, "the new key does not sign"


def _key_rotated_revoking(s: Setup, t: Targets, r: Any, b: Before) -> None:
    assert r.key_id and r.key_id != b.active_kid, "RotateSigningKey kept the active key"
    valid = s.validate(t.token, "billing").valid
    assert not valid, "a token of the revoked key validates"


GRANT_ADMIN = [auth_pb2.Grant(audience=ADMIN_AUDIENCE, scopes=[ADMIN_SCOPE])]

# The compromise rotation ends every token issued before it: last, for the positive controls.
CASES: tuple[AdminCase, ...] = (
    AdminCase(
        "ListServices", "ListServices", lambda t: auth_pb2.ListServicesRequest(), None, _listed
    ),
    AdminCase(
        "ListSigningKeys",
        "ListSigningKeys",
        lambda t: auth_pb2.ListSigningKeysRequest(),
        None,
        _keys_listed,
    ),
    # An escalation attempt: a new service holding the admin scope.
    AdminCase(
        "CreateService",
        "CreateService",
        lambda t: auth_pb2.CreateServiceRequest(service_id=t.new_service, grants=GRANT_ADMIN),
        "create_service",
        _created,
    ),
    # An escalation attempt: orders given the admin scope.
    AdminCase(
        "UpdateService",
        "UpdateService",
        lambda t: auth_pb2.UpdateServiceRequest(service_id=t.service, grants=GRANT_ADMIN),
        "update_service",
        _updated,
    ),
    AdminCase(
        "DisableService",
        "DisableService",
        lambda t: auth_pb2.DisableServiceRequest(service_id=t.service),
        "disable_service",
        _disabled,
    ),
    AdminCase(
        "EnableService",
        "EnableService",
        lambda t: auth_pb2.EnableServiceRequest(service_id=t.disabled),
        "enable_service",
        _enabled,
    ),
    AdminCase(
        "RevokeToken[jti]",
        "RevokeToken",
        lambda t: auth_pb2.RevokeTokenRequest(jti=t.jti, reason="admin authorization test"),
        "revoke_token",
        _revoked,
    ),
    AdminCase(
        "RevokeToken[service_id]",
        "RevokeToken",
        lambda t: auth_pb2.RevokeTokenRequest(service_id=t.service, reason="test"),
        "revoke_service_tokens",
        _revoked,
    ),
    AdminCase(
        "RotateServiceSecret[no current_secret]",
        "RotateServiceSecret",
        lambda t: auth_pb2.RotateServiceSecretRequest(service_id=t.service, grace_period_seconds=0),
        "rotate_secret",
        _secret_rotated,
    ),
    AdminCase(
        "RotateSigningKey",
        "RotateSigningKey",
        lambda t: auth_pb2.RotateSigningKeyRequest(),
        "rotate_signing_key",
        _key_rotated,
    ),
    AdminCase(
        "RotateSigningKey[revoke_previous]",
        "RotateSigningKey",
        lambda t: auth_pb2.RotateSigningKeyRequest(revoke_previous=True),
        "rotate_signing_key",
        _key_rotated_revoking,
    ),
)
# Methods that are admin only; RevokeToken and RotateServiceSecret have admin variants above.
ADMIN_ONLY = {c.method for c in CASES} - set(PUBLIC)
# Every AuthService method that is not public: probed by a bare call, a new one included.
GATED = sorted(m.name for m in SERVICE.methods if m.name not in PUBLIC)


def _active_kid(s: Setup) -> str:
    keys = s.stub.ListSigningKeys(
        auth_pb2.ListSigningKeysRequest(), metadata=s.admin_md(), timeout=10
    ).keys
    return str(next(k.key_id for k in keys if k.state == "active"))


# -- the contract is classified -----------------------------------------------------------------


class TestClassification:
    def test_every_method_of_the_contract_is_classified(self) -> None:
        served = {m.name for m in SERVICE.methods}
        known = set(PUBLIC) | set(FOLLOWER) | ADMIN_ONLY
        assert not set(PUBLIC) & ADMIN_ONLY and not set(FOLLOWER) & (set(PUBLIC) | ADMIN_ONLY)
        unlisted, gone = sorted(served - known), sorted(known - served)
        assert not unlisted, (
            f"AuthService methods {unlisted} are neither public (PUBLIC, with the reason), a "
            "follower's (FOLLOWER) nor tested as admin (CASES): classify each, and give an admin "
            "one a check in the servicer (AuthServicer._admin) and a case here"
        )
        assert not gone, f"{gone} are classified here but not in the contract any more"

    def test_every_revoke_target_is_classified(self) -> None:
        oneof = auth_pb2.RevokeTokenRequest.DESCRIPTOR.oneofs_by_name["target"]
        assert {f.name for f in oneof.fields} == set(REVOKE_TARGETS), (
            "RevokeTokenRequest.target changed: classify the new target in REVOKE_TARGETS "
            "and test an admin one in CASES"
        )
        admin = {k for k, v in REVOKE_TARGETS.items() if v == "admin"}
        assert {c.id for c in CASES} >= {f"RevokeToken[{k}]" for k in admin}

    def test_the_port_serves_no_other_service(self, s: Setup) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {x.name for x in next(answers).list_services_response.service}
        assert names == {SERVICE.full_name} | OTHER_SERVICES, (
            f"the port serves {sorted(names - {SERVICE.full_name} - OTHER_SERVICES)} too: "
            "classify them"
        )
        health = health_pb2_grpc.HealthStub(s.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- the callers are what they claim to be ------------------------------------------------------


class TestTheCallers:
    def test_each_token_is_refused_as_an_admin_token_for_its_stated_reason(self, s: Setup) -> None:
        wrong = []
        for caller in non_admins(s):
            if caller.reason is None:
                continue
            got = s.validate(caller.token, ADMIN_AUDIENCE, [ADMIN_SCOPE])
            if got.valid or got.reason != caller.reason:
                name = auth_pb2.ValidationFailure.Name(got.reason)
                wrong.append(f"{caller.name}: {'valid' if got.valid else name}")
        assert not wrong, f"callers not what they claim: {wrong}"
        # And the real admin token is one.
        valid = s.validate(s.world.admin_token(), ADMIN_AUDIENCE, [ADMIN_SCOPE]).valid
        assert valid, "the real admin token is no admin token"

    def test_the_tokens_that_lack_only_the_scope_are_valid_for_authsvc(self, s: Setup) -> None:
        for caller in non_admins(s):
            if caller.refused_with == PERMISSION_DENIED:
                valid = s.validate(caller.token, ADMIN_AUDIENCE).valid
                assert valid, f"{caller.name} is not valid for {ADMIN_AUDIENCE}"


# -- the admin calls refuse non-admins and change nothing ----------------------------------------


class TestNonAdminsAreRefused:
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
    def test_every_non_admin_is_refused_and_nothing_changes(
        self, s: Setup, case: AdminCase
    ) -> None:
        w = s.world
        sentinel = s.token("orders", w.orders_secret, "billing")
        targets = Targets(
            service="orders",
            jti=s.jti(sentinel, "billing"),
            disabled="dormant",
            new_service=f"intruder-{next(_IDS)}",
        )
        request = case.build(targets)
        callers = non_admins(s)
        before = s.snapshot()

        wrong = []
        for caller in callers:
            code, details = outcome(s.channel, case.method, request, caller.metadata)
            if code != caller.refused_with:
                wrong.append(f"{caller.name}: {code.name} ({details!r})")
        expected = {c.name: c.refused_with.name for c in callers}
        assert not wrong, f"{case.id} answered {wrong}; expected {expected}"

        after = s.snapshot()
        assert after.service_ids == before.service_ids, (
            f"{case.id}: refused calls changed the services: "
            f"{sorted(set(after.service_ids) ^ set(before.service_ids))}"
        )
        changed = [
            sid
            for sid, a, b in zip(after.service_ids, after.services, before.services, strict=True)
            if a != b
        ]
        assert not changed, f"{case.id}: refused calls changed services {changed}"
        assert after.keys == before.keys, (
            f"{case.id}: refused calls changed the signing keys: "
            f"{before.key_states} -> {after.key_states}"
        )
        reason = _reason(s, sentinel)
        assert reason == "VALIDATION_FAILURE_UNSPECIFIED", (
            f"{case.id}: orders' live token stopped validating ({reason})"
        )
        login = s.logs_in("orders", w.orders_secret)
        assert login == OK, f"{case.id}: orders' secret stopped logging in ({login.name})"
        done = [
            row
            for row in s.audit_since(before.audit_id)
            if row[3] == "ok" and row[1] != "issue_token"
        ]
        assert not done, f"{case.id}: refused calls left audit rows {done}"


# -- the same calls succeed with an admin token ---------------------------------------------------


class TestAnAdminIsAccepted:
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
    def test_the_same_request_with_an_admin_token_succeeds(self, s: Setup, case: AdminCase) -> None:
        n = next(_IDS)
        service, off = f"pc-{n}", f"pc-{n}-off"
        secret = s.create(service, audiences=["billing"])
        s.create(off, audiences=["billing"])
        s.disable(off)
        token = s.token(service, secret, "billing")
        targets = Targets(
            service=service,
            jti=s.jti(token, "billing"),
            disabled=off,
            new_service=f"pc-{n}-new",
            secret=secret,
            token=token,
        )
        before = Before(s.snapshot(), _active_kid(s))
        try:
            response = invoke(s.channel, case.method, case.build(targets), s.admin_md())
        except grpc.RpcError as exc:
            pytest.fail(f"{case.id} refused the admin: {exc.code().name} {exc.details()!r}")
        case.check(s, targets, response, before)
        if case.action is not None:
            rows = [
                row
                for row in s.audit_since(before.snapshot.audit_id)
                if row[1] == case.action and row[3] == "ok"
            ]
            assert [row[0] for row in rows] == [ADMIN], (
                f"{case.id}: expected one ok audit row of {case.action} by {ADMIN}, got {rows}"
            )


# -- whatever is not public refuses a bare call; the follower's stream ---------------------------


class TestGatedMethods:
    @pytest.mark.parametrize("method", GATED)
    def test_an_unclassified_or_admin_method_refuses_a_bare_call(
        self, s: Setup, method: str
    ) -> None:
        """Every method not in PUBLIC, from the descriptor (a new one too), with an empty request:
        no token is UNAUTHENTICATED; a follower's token is PERMISSION_DENIED, unless it is the
        follower's method."""
        request = GetMessageClass(SERVICE.methods_by_name[method].input_type)()
        code, details = outcome(s.channel, method, request, ())
        assert code == UNAUTHENTICATED, f"{method} without a token: {code.name} ({details!r})"
        if method not in FOLLOWER:
            code, details = outcome(s.channel, method, request, bearer(s.world.follower_token()))
            assert code == PERMISSION_DENIED, (
                f"{method} with a follower's token: {code.name} ({details!r})"
            )

    def test_watch_revocations_follows_for_any_registered_service_only(self, s: Setup) -> None:
        # At least one revocation is in force (the revoked admin token), so a follower gets a
        # first event from the replay.
        callers = [
            *non_admins(s),
            Caller("an admin", OK, True, None, s.admin_md()),
        ]
        wrong = []
        for caller in callers:
            stream = s.stub.WatchRevocations(
                auth_pb2.WatchRevocationsRequest(after_cursor=0),
                metadata=caller.metadata,
                timeout=10,
            )
            try:
                next(stream)
                got = OK
            except grpc.RpcError as exc:
                got = exc.code()
            finally:
                stream.cancel()
            expected = OK if caller.follows else UNAUTHENTICATED
            if got != expected:
                wrong.append(f"{caller.name}: {got.name}, expected {expected.name}")
        assert not wrong, f"WatchRevocations: {wrong}"


# -- what is public is public -------------------------------------------------------------------


def _public_requests(s: Setup) -> dict[str, Message]:
    """A valid request for each public method, sent without any authorization metadata."""
    w, n = s.world, next(_IDS)
    token = s.token("orders", w.orders_secret, "billing")
    throwaway = s.token("orders", w.orders_secret, "billing")
    self_rotating = s.create(f"self-{n}", audiences=["billing"])
    # Delegation: front calls mid, which calls back on front's behalf.
    front = s.create(f"front-{n}", audiences=[f"mid-{n}", f"back-{n}"])
    mid = s.create(f"mid-{n}", audiences=[f"back-{n}"])
    subject = s.token(f"front-{n}", front, f"mid-{n}")
    validate = auth_pb2.ValidateTokenRequest(token=token, audience="billing")
    return {
        "IssueToken": auth_pb2.IssueTokenRequest(
            service_id="orders", service_secret=w.orders_secret, audience="billing"
        ),
        "ExchangeToken": auth_pb2.ExchangeTokenRequest(
            subject_token=subject,
            subject_token_type=ACCESS_TOKEN_TYPE,
            audience=f"back-{n}",
            service_id=f"mid-{n}",
            service_secret=mid,
        ),
        "ValidateToken": validate,
        "ValidateTokenStream": validate,
        "GetJwks": auth_pb2.GetJwksRequest(),
        "RevokeToken": auth_pb2.RevokeTokenRequest(token=throwaway),
        "RotateServiceSecret": auth_pb2.RotateServiceSecretRequest(
            service_id=f"self-{n}", current_secret=self_rotating
        ),
    }


class TestPublicMethods:
    def test_each_public_method_answers_without_any_token(self, s: Setup) -> None:
        requests = _public_requests(s)
        methods = sorted(requests)
        assert methods == sorted(PUBLIC), "a public method without a request here"
        wrong = []
        for method, request in requests.items():
            code, details = outcome(s.channel, method, request, ())
            if code != OK:
                wrong.append(f"{method}: {code.name} ({details!r})")
        assert not wrong, f"public methods refused a call without a token: {wrong}"
