"""Promise: no token string or request message makes ValidateToken or RevokeToken fail with
INTERNAL (or any unexpected status), and nothing but a genuine token ever validates. Property
tests against the real server, with a bounded budget so they run in CI."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authsvc_client.v1 import auth_pb2
from tests.security.forge import (
    AUDIENCE,
    OwnKey,
    Target,
    attacker_key,
    claims,
    header,
    rpc_code,
    sign,
)

pytestmark = pytest.mark.usefixtures("after_each_batch")

BUDGET = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no example files written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
VALIDATE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
REVOKE_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
REGISTERED = {"ops-admin", "orders", "billing"}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
token_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=B64URL + ".=+/ ", max_size=600),
    st.lists(st.text(alphabet=B64URL, max_size=200), min_size=1, max_size=6).map(".".join),
)


class Mutation:
    """Edits applied to a genuine token; each one yields some other string."""

    @staticmethod
    def strategy() -> st.SearchStrategy[list[tuple[str, int, str]]]:
        edit = st.tuples(
            st.sampled_from(["replace", "insert", "delete", "swap", "truncate"]),
            st.integers(min_value=0, max_value=10_000),
            st.text(alphabet=B64URL + ".=+/ \x00é", min_size=1, max_size=4),
        )
        return st.lists(edit, min_size=1, max_size=4)

    @staticmethod
    def apply(token: str, edits: list[tuple[str, int, str]]) -> str:
        for kind, where, text in edits:
            i = where % (len(token) + 1)
            if kind == "replace":
                token = token[:i] + text + token[i + len(text) :]
            elif kind == "insert":
                token = token[:i] + text + token[i:]
            elif kind == "delete":
                token = token[:i] + token[i + len(text) :]
            elif kind == "truncate":
                token = token[:i]
            else:
                parts = token.split(".")
                j = where % len(parts)
                parts[0], parts[j] = parts[j], parts[0]
                token = ".".join(parts)
        return token


def validate_status(
    target: Target, token: str, audience: str = AUDIENCE, scopes: list[str] | None = None
) -> tuple[grpc.StatusCode, auth_pb2.ValidateTokenResponse | None]:
    try:
        return grpc.StatusCode.OK, target.validate(token, audience, scopes)
    except grpc.RpcError as exc:
        return rpc_code(exc), None


def assert_refused(target: Target, token: str) -> None:
    code, response = validate_status(target, token)
    assert code in VALIDATE_CODES
    if response is not None:
        assert not response.valid
        assert response.reason != auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
        assert auth_pb2.ValidationFailure.Name(response.reason)


@pytest.fixture(scope="module")
def attacker() -> RSAPrivateKey:
    return attacker_key()


@pytest.fixture(scope="module")
def own_key(target: Target) -> OwnKey:
    return target.active_key()


@pytest.fixture(scope="module")
def genuine(target: Target) -> str:
    """One genuine token for the whole module: no edit may revoke or replace it."""
    return target.genuine()


@pytest.fixture(scope="module")
def admin_md(target: Target) -> list[tuple[str, str]]:
    return target.world.admin_md()


class TestValidateTokenFuzz:
    @BUDGET
    @given(token=token_text)
    def test_arbitrary_token_text_is_refused_never_an_error(
        self, target: Target, token: str
    ) -> None:
        assert_refused(target, token)

    @BUDGET
    @given(edits=Mutation.strategy())
    def test_edited_genuine_token_never_validates(
        self, target: Target, genuine: str, edits: list[tuple[str, int, str]]
    ) -> None:
        token = Mutation.apply(genuine, edits)
        assume(token != genuine)
        assert_refused(target, token)

    @BUDGET
    @given(hdr=st.dictionaries(st.text(max_size=8), json_values, max_size=5), body=json_values)
    def test_arbitrary_json_signed_by_an_attacker_never_validates(
        self, target: Target, attacker: RSAPrivateKey, hdr: dict[str, Any], body: Any
    ) -> None:
        assert_refused(target, sign(attacker, hdr, json.dumps(body)))

    @BUDGET
    @given(
        changes=st.dictionaries(
            st.sampled_from(
                ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "client_id", "x"]
            ),
            json_values,
            min_size=1,
            max_size=3,
        ),
        header_changes=st.dictionaries(
            st.sampled_from(["alg", "typ", "kid", "jku"]), json_values, max_size=2
        ),
    )
    def test_claims_signed_by_authsvc_with_any_values_never_error(
        self,
        target: Target,
        own_key: OwnKey,
        changes: dict[str, Any],
        header_changes: dict[str, Any],
    ) -> None:
        # Signed by our own key, so some combinations are legitimately valid; what must hold
        # is an answer (never INTERNAL), and validity only with well-typed, exact claims.
        key = own_key
        body = claims(**changes)
        token = sign(key.private, header(key.kid, **header_changes), body)
        code, response = validate_status(target, token)
        assert code in VALIDATE_CODES
        if response is not None and response.valid:
            assert body["iss"] == claims()["iss"] and body["aud"] == AUDIENCE
            assert type(body["exp"]) is int and body["sub"] == body["client_id"]
            assert header(key.kid, **header_changes) == header(key.kid) or set(header_changes) <= {
                "typ"
            }

    @BUDGET
    @given(
        token=token_text,
        audience=st.text(max_size=200),
        scopes=st.lists(st.text(max_size=30), max_size=70),
    )
    def test_arbitrary_validate_requests_answer_ok_or_invalid_argument(
        self, target: Target, token: str, audience: str, scopes: list[str]
    ) -> None:
        code, response = validate_status(target, token, audience, scopes)
        assert code in VALIDATE_CODES
        assert response is None or not response.valid


class TestRevokeTokenFuzz:
    @BUDGET
    @given(
        which=st.sampled_from(["token", "jti", "service_id", None]),
        value=token_text,
        reason=st.text(max_size=400),
        as_admin=st.booleans(),
        authorization=st.one_of(st.none(), st.text(alphabet=B64URL + ". ", max_size=100)),
    )
    def test_arbitrary_revoke_requests_never_error(
        self,
        target: Target,
        admin_md: list[tuple[str, str]],
        which: str | None,
        value: str,
        reason: str,
        as_admin: bool,
        authorization: str | None,
    ) -> None:
        assume(value not in REGISTERED)
        request = auth_pb2.RevokeTokenRequest(reason=reason)
        if which is not None:
            setattr(request, which, value)
        metadata: list[tuple[str, str]] = []
        if as_admin:
            metadata = admin_md
        elif authorization is not None and authorization.strip():
            metadata = [("authorization", authorization.strip())]
        try:
            response = target.world.server.stub.RevokeToken(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            assert rpc_code(exc) in REVOKE_CODES
            return
        if which == "token":
            assert not response.revoked  # no fuzzed string is a genuine token

    @BUDGET
    @given(edits=Mutation.strategy())
    def test_presenting_an_edited_token_revokes_nothing_and_the_original_lives(
        self, target: Target, genuine: str, edits: list[tuple[str, int, str]]
    ) -> None:
        # Only a valid token (or one already revoked) revokes anything when presented, and no
        # edit of a token is valid: the shared genuine token must survive every example.
        token = Mutation.apply(genuine, edits)
        assume(token != genuine)
        try:
            assert not target.revoke(token)
        except grpc.RpcError as exc:
            assert rpc_code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        assert target.validate(genuine).valid
