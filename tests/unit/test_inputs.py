"""authsvc.inputs: the one copy of the input rules (the RPCs and the CLI are tested end to end)."""

from __future__ import annotations

import pytest

from authsvc.errors import InvalidArgument
from authsvc.inputs import (
    MAX_ID_LENGTH,
    MAX_SCOPE_LENGTH,
    check_audiences,
    check_name,
    check_new_service_id,
    check_scopes,
    check_service_id,
)
from authsvc_client.claims import SCOPE_CLAIM


class TestNewServiceIds:
    @pytest.mark.parametrize("sid", ["orders", "a", "pay-v2.eu_1", "9lives", "o" * MAX_ID_LENGTH])
    def test_the_grammar_admits(self, sid: str) -> None:
        check_new_service_id(sid)

    @pytest.mark.parametrize(
        "sid",
        [
            "",
            "Orders",
            "\u043erders",
            "\uff4frders",
            " orders",
            "orders\n",
            "\x1b[31morders",
            "o" * (MAX_ID_LENGTH + 1),
            ".orders",
            "or ders",
            "asvcs_abc",
        ],
    )
    def test_the_grammar_refuses_without_echoing(self, sid: str) -> None:
        with pytest.raises(InvalidArgument) as exc:
            check_new_service_id(sid)
        assert "service_id" in str(exc.value)
        if sid:
            assert sid not in str(exc.value)

    @pytest.mark.parametrize("sid", ["Orders", "\u043erders"])
    def test_an_existing_id_outside_the_grammar_may_still_name_a_service(self, sid: str) -> None:
        check_service_id(sid)
        check_name(sid, "service_id")


class TestAudiencesAndScopes:
    @pytest.mark.parametrize("audience", ["b\u00eflling", "a b", ""])
    def test_registration_audiences_are_printable_ascii(self, audience: str) -> None:
        with pytest.raises(InvalidArgument):
            check_audiences([audience])

    @pytest.mark.parametrize(
        "scope",
        ["a b", "caf\u00e9", "", 'q"', "back\\slash", "tab\t", "line\n", "del\x7f", "nul\x00"],
    )
    def test_scopes_follow_rfc6749(self, scope: str) -> None:
        with pytest.raises(InvalidArgument):
            check_scopes([scope], "scopes")

    def test_a_scope_is_at_most_max_scope_length_characters(self) -> None:
        check_scopes(["s" * MAX_SCOPE_LENGTH], "scopes")
        with pytest.raises(InvalidArgument, match=f"at most {MAX_SCOPE_LENGTH} characters"):
            check_scopes(["s" * (MAX_SCOPE_LENGTH + 1)], "scopes")

    def test_good_ones_pass(self) -> None:
        check_audiences(["billing", "https://x.example/api"])
        check_scopes(["billing.read", "authsvc.admin"], "scopes")
        # RFC 6749 section 3.3's edges: %x21, %x23-5B and %x5D-7E.
        check_scopes(["!", "#", "[", "]", "~", "a:b/c=d"], "scopes")

    @pytest.mark.parametrize("scope", ["billing.read", "!#[]~", 'q"', "tab\t", "", "caf\u00e9"])
    def test_a_scope_the_server_accepts_is_one_the_verifier_accepts(self, scope: str) -> None:
        """One grammar: a scope that passes the input rule is a valid `scope` claim, and the
        other way round, so the server never issues a token its own verifier refuses."""
        try:
            check_scopes([scope], "scopes")
            accepted = True
        except InvalidArgument:
            accepted = False
        assert accepted == (SCOPE_CLAIM.fullmatch(scope) is not None)
