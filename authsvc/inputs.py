"""Input rules for names, service ids and scopes: one copy for the RPCs, the CLI and scripts.

Nothing here knows gRPC; a broken rule raises InvalidArgument, whose message names the field and
the rule, never the value (it may be a pasted secret).

Two strengths on purpose. A *new* service id must match SERVICE_ID_GRAMMAR: lower-case ASCII
letters, digits, `-`, `.` and `_`, starting with a letter or digit, so look-alikes (`Orders`,
Cyrillic `\u043erders`, full-width `\uff4frders`) cannot be registered beside `orders`. An id
that only *names* an existing service (a login, a lookup) gets the looser `check_name`, because
databases written before the grammar may hold ids outside it and those must keep working.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from authsvc.crypto.secrets import SECRET_PREFIX
from authsvc.errors import InvalidArgument
from authsvc_client.claims import SCOPE_TOKEN

__all__ = [
    "MAX_AUDIENCES",
    "MAX_ID_LENGTH",
    "MAX_SCOPES",
    "MAX_SCOPE_LENGTH",
    "SERVICE_ID_GRAMMAR",
    "check_audiences",
    "check_grace_period",
    "check_name",
    "check_new_service_id",
    "check_scopes",
    "check_service_id",
    "parse_grant",
]

MAX_ID_LENGTH = 128
MAX_SCOPES = 64
# RFC 6749 sets no length; long URL-style names fit (Google's run to ~70). Without a bound,
# one registered scope could make every token of its audience too long to issue.
MAX_SCOPE_LENGTH = 256
# Audiences one service may be granted; each carries at most MAX_SCOPES scopes.
MAX_AUDIENCES = 64
SERVICE_ID_GRAMMAR = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}")


def check_name(value: str, field: str, *, required: bool = True) -> None:
    """A name that refers to something: printable, no surrounding blanks, bounded."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required")
        return
    if len(value) > MAX_ID_LENGTH or not value.isprintable() or value != value.strip():
        raise InvalidArgument(f"{field} must be at most {MAX_ID_LENGTH} printable characters")


def check_service_id(value: str) -> None:
    """A service id presented to name an existing service (login, rotation, lookup)."""
    check_name(value, "service_id")
    # A secret pasted into the id field (swapped arguments) would otherwise be written to the
    # audit log as the actor; the prefix makes it recognisable, so refuse it unlogged.
    if value.startswith(SECRET_PREFIX):
        raise InvalidArgument("service_id looks like a service secret")


def check_new_service_id(value: str) -> None:
    """A service id about to be registered: the strict grammar (see the module docstring)."""
    if value.startswith(SECRET_PREFIX) or not value:
        check_service_id(value)
    if not SERVICE_ID_GRAMMAR.fullmatch(value):
        raise InvalidArgument(
            f"service_id must be 1-{MAX_ID_LENGTH} characters of a-z, 0-9, '-', '.' and '_', "
            "starting with a letter or digit"
        )


def check_audiences(audiences: Sequence[str], field: str = "audiences") -> None:
    """Audiences granted at registration: printable ASCII, no blanks, so none is a look-alike."""
    for audience in audiences:
        check_name(audience, field)
        if not audience.isascii() or any(c.isspace() for c in audience):
            raise InvalidArgument(f"{field}: each audience is printable ASCII without spaces")


def check_scopes(scopes: Sequence[str], field: str) -> None:
    """Requested or required scopes: each an RFC 6749 scope-token (`SCOPE_TOKEN`, the grammar
    the verifier holds the `scope` claim to)."""
    if len(scopes) > MAX_SCOPES:
        raise InvalidArgument(f"{field}: at most {MAX_SCOPES} scopes")
    for s in scopes:
        if len(s) > MAX_SCOPE_LENGTH:
            raise InvalidArgument(f"{field}: each scope is at most {MAX_SCOPE_LENGTH} characters")
        if SCOPE_TOKEN.fullmatch(s) is None:
            raise InvalidArgument(f"{field}: each scope is printable ASCII without spaces")


def parse_grant(text: str, field: str) -> tuple[str, str]:
    """`AUDIENCE=SCOPE` (the CLI's `--grant` and `--revoke-grant`) as (audience, scope).

    The audience ends at the first `=` (audiences rarely hold one, and a scope-token may). An
    empty scope (`AUDIENCE=`) names the audience alone: `--grant billing=` grants billing with
    no scope, for scopeless tokens.
    """
    audience, sep, scope = text.partition("=")
    if not sep:
        raise InvalidArgument(f"{field} takes AUDIENCE=SCOPE")
    check_audiences([audience], field)
    if scope:
        check_scopes([scope], field)
    return audience, scope


def check_grace_period(seconds: int, maximum: int) -> None:
    if seconds < 0:
        raise InvalidArgument("grace_period_seconds must not be negative")
    if seconds > maximum:
        raise InvalidArgument(f"grace_period_seconds must not exceed {maximum}")
