"""Delegated tokens (RFC 8693 `act`) in the verifier and the issuer: the chain is read exactly,
handed out nearest actor first, and every link is checked on every use."""

from __future__ import annotations

from typing import Any

import pytest

from authsvc.tokens.issuer import TokenIssuer
from authsvc_client.claims import MAX_DELEGATION_DEPTH
from authsvc_client.revocations import RevocationEntry, RevocationSet
from tests.unit.test_verifier import AUD, DROP, ISSUER, NOW, Env, env, good, make, reason

__all__ = ["env"]  # the module-scoped key fixture, shared with test_verifier


def _act(*actors: str) -> dict[str, Any] | None:
    act: dict[str, Any] | None = None
    for actor in reversed(actors):
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    return act


def delegated(env: Env, actors: tuple[str, ...] = ("svc-b0",), **over: Any) -> str:
    claims: dict[str, Any] = {
        "act": _act(*actors),
        "parent_jtis": [f"parent-{i}" for i in range(len(actors))],
        "client_id": actors[0],
    }
    claims.update(over)
    return good(env, **claims)


class TestVerifier:
    def test_the_chain_is_handed_out_nearest_actor_first(self, env: Env) -> None:
        result = make(env).verify(delegated(env, ("orders", "front-gw")), audience=AUD)
        assert result.valid and result.claims is not None
        assert result.claims.actors == ("orders", "front-gw")
        assert result.claims.subject == "svc-a"
        assert result.claims.client_id == "orders"

    @pytest.mark.parametrize(
        "over",
        [
            {"act": {"sub": ""}},
            {"act": {"sub": "orders", "extra": 1}},
            {"act": {"act": {"sub": "x"}}},
            {"act": ["orders"]},
            {"act": "orders"},
            {"act": {"sub": 7}},
            {"parent_jtis": DROP},
            {"parent_jtis": ["a", "b"]},
            {"parent_jtis": [""]},
            {"parent_jtis": "parent-0"},
            {"client_id": "svc-a"},  # a delegated token's client is its current actor
        ],
    )
    def test_a_malformed_chain_is_malformed(self, env: Env, over: dict[str, Any]) -> None:
        assert reason(make(env).verify(delegated(env, **over), audience=AUD)) == "MALFORMED"

    def test_parents_without_act_or_a_chain_beyond_the_bound_is_malformed(self, env: Env) -> None:
        verifier = make(env)
        assert reason(verifier.verify(good(env, parent_jtis=["x"]), audience=AUD)) == "MALFORMED"
        too_long = tuple(f"a{i}" for i in range(MAX_DELEGATION_DEPTH + 1))
        assert reason(verifier.verify(delegated(env, too_long), audience=AUD)) == "MALFORMED"
        at_bound = tuple(f"a{i}" for i in range(MAX_DELEGATION_DEPTH))
        assert verifier.verify(delegated(env, at_bound), audience=AUD).valid

    def test_a_revoked_parent_revokes_it_cached_or_not(self, env: Env) -> None:
        revocations = RevocationSet()
        verifier = make(env, revocations=revocations)
        token = delegated(env, ("orders", "billing"))
        assert verifier.verify(token, audience=AUD).valid  # now cached
        revocations.add(RevocationEntry(1, "parent-1", None, None, NOW + 900))
        assert reason(verifier.verify(token, audience=AUD)) == "REVOKED"

    def test_an_actor_revoked_or_disabled_stops_its_delegated_tokens(self, env: Env) -> None:
        revocations = RevocationSet()
        disabled: set[str] = set()
        verifier = make(
            env, revocations=revocations, is_subject_enabled=lambda s: s not in disabled
        )
        token = delegated(env, ("orders",))
        assert verifier.verify(token, audience=AUD).valid
        disabled.add("orders")
        assert reason(verifier.verify(token, audience=AUD)) == "SERVICE_DISABLED"
        disabled.clear()
        revocations.add(RevocationEntry(2, None, "orders", NOW + 1, NOW + 900))
        assert reason(verifier.verify(token, audience=AUD)) == "REVOKED"


class TestIssuer:
    def test_the_issuer_nests_act_and_self_verifies(self, env: Env) -> None:
        issuer = TokenIssuer(ISSUER)
        issued = issuer.issue(
            private_key=env.key,
            kid=env.kid,
            subject="front",
            audience=AUD,
            scopes=("read",),
            ttl_seconds=60,
            now=float(NOW),
        )
        unsigned = issuer.prepare(
            key_bits=2048,
            kid=env.kid,
            subject="front",
            audience=AUD,
            scopes=("read",),
            ttl_seconds=60,
            now=float(NOW),
            actors=("billing", "orders"),
            parent_jtis=("jti-1", issued.claims.jti),
        )
        signed = issuer.sign(unsigned, env.key)
        assert signed.claims.actors == ("billing", "orders")
        assert signed.claims.client_id == "billing"
        body = signed.token.split(".")[1]
        assert body  # the self-verification inside sign() already compared the claims

    def test_one_parent_per_actor(self, env: Env) -> None:
        with pytest.raises(ValueError, match="one parent jti per actor"):
            TokenIssuer(ISSUER).prepare(
                key_bits=2048,
                kid=env.kid,
                subject="front",
                audience=AUD,
                scopes=(),
                ttl_seconds=60,
                now=float(NOW),
                actors=("orders",),
                parent_jtis=(),
            )
