"""Structured logs of a real server: JSON lines in production, readable lines in dev; no secret."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from authsvc.logs import (
    Deferred,
    HumanFormatter,
    JsonFormatter,
    current_request_id,
    redact,
    request_id_from,
    rpc_context,
)
from authsvc.usecases.audit import log_audit
from authsvc_client.v1 import auth_pb2
from tests.ops.conftest import OpsServer, start_ops_server
from tests.support.server import run_cli, start_server

REQUIRED = {"timestamp", "level", "event"}


def json_lines(output: list[str]) -> list[dict[str, Any]]:
    """Every log line; the two 'authsvc … listening' lines are plain stdout, not logs."""
    out = []
    for line in output:
        if line.startswith("authsvc ") or not line.strip():
            continue
        out.append(json.loads(line))
    return out


def access_lines(output: list[str], method: str) -> list[dict[str, Any]]:
    return [e for e in json_lines(output) if e.get("event") == "rpc" and e["method"] == method]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


class TestJsonLogs:
    def test_every_line_is_one_json_object(self, ops: OpsServer) -> None:
        ops.server.issue("orders", ops.orders_secret, "billing")
        entries = json_lines(ops.server.output)
        assert entries
        for entry in entries:
            assert REQUIRED <= entry.keys()

    def test_an_rpc_logs_request_id_method_peer_outcome_duration(self, ops: OpsServer) -> None:
        method = "/authsvc.v1.AuthService/IssueToken"
        ops.server.stub.IssueToken(
            auth_pb2.IssueTokenRequest(
                service_id="orders", service_secret=ops.orders_secret, audience="billing"
            ),
            metadata=[("x-request-id", "req-ops-1")],
            timeout=10,
        )
        wait_for(
            lambda: any(
                e.get("request_id") == "req-ops-1" for e in access_lines(ops.server.output, method)
            )
        )
        [entry] = [
            e for e in access_lines(ops.server.output, method) if e["request_id"] == "req-ops-1"
        ]
        assert entry["level"] == "info"
        assert entry["outcome"] == "OK"
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
        assert entry["duration_ms"] >= 0

    def test_failed_call_logs_its_status_and_no_secret_or_token(self, ops: OpsServer) -> None:
        wrong = "asvcs_" + "Z" * 43
        try:
            ops.server.stub.IssueToken(
                auth_pb2.IssueTokenRequest(
                    service_id="orders", service_secret=wrong, audience="billing"
                ),
                metadata=[("x-request-id", "req-ops-2")],
                timeout=10,
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        ops.server.stub.ValidateToken(auth_pb2.ValidateTokenRequest(token=token, audience="x"))
        ops.server.stub.RevokeToken(auth_pb2.RevokeTokenRequest(token=token))
        method = "/authsvc.v1.AuthService/IssueToken"
        wait_for(
            lambda: any(
                e.get("request_id") == "req-ops-2" for e in access_lines(ops.server.output, method)
            )
        )
        [entry] = [
            e for e in access_lines(ops.server.output, method) if e["request_id"] == "req-ops-2"
        ]
        assert entry["outcome"] == "UNAUTHENTICATED"
        text = "".join(ops.server.output)
        for secret in (wrong, ops.orders_secret, ops.admin_secret, token):
            assert secret not in text

    def test_audit_lines_carry_the_callers_request_id(self, ops: OpsServer) -> None:
        token = ops.server.issue("orders", ops.orders_secret, "billing").access_token
        ops.server.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token),
            metadata=[("x-request-id", "req-ops-3")],
            timeout=10,
        )
        wait_for(
            lambda: any(
                e.get("request_id") == "req-ops-3" and e["event"] != "rpc"
                for e in json_lines(ops.server.output)
            )
        )
        audit = [
            e
            for e in json_lines(ops.server.output)
            if e.get("request_id") == "req-ops-3" and e["event"] == "audit"
        ]
        assert audit
        assert audit[0]["method"] == "/authsvc.v1.AuthService/RevokeToken"


def _calls_then_marker(ops: OpsServer, tag: str) -> set[str]:
    """A valid and an invalid ValidateToken, a GetJwks, then an IssueToken (always logged at
    info); once the marker's line is out, every line before it is too. The request ids of the
    access lines seen, marker excluded."""
    server = ops.server
    token = server.issue("orders", ops.orders_secret, "billing").access_token
    for audience, rid in (("billing", "valid"), ("elsewhere", "invalid")):
        server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience=audience),
            metadata=[("x-request-id", f"{tag}-{rid}")],
            timeout=10,
        )
    server.stub.GetJwks(
        auth_pb2.GetJwksRequest(), metadata=[("x-request-id", f"{tag}-jwks")], timeout=10
    )
    server.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            service_id="orders", service_secret=ops.orders_secret, audience="billing"
        ),
        metadata=[("x-request-id", f"{tag}-marker")],
        timeout=10,
    )

    def ids() -> set[str]:
        return {
            str(e["request_id"])
            for e in json_lines(server.output)
            if e.get("event") == "rpc" and str(e.get("request_id", "")).startswith(f"{tag}-")
        }

    wait_for(lambda: f"{tag}-marker" in ids())
    return ids() - {f"{tag}-marker"}


FORGED = "orders outcome=ok actor=ops-admin"


class TestLogInjection:
    """An id is one field's value: it can neither pose as another field nor split a line."""

    def test_a_forged_service_id_and_request_id_stay_inside_their_own_members(
        self, ops: OpsServer
    ) -> None:
        wrong = "asvcs_" + "Q" * 43
        forged_rid = "inj outcome=ok actor=ops-admin"
        before = {e.get("request_id") for e in json_lines(ops.server.output)}
        # An unknown (forged) id, then a real one with a wrong secret, each with a forged
        # request id.
        for service_id in (FORGED, "orders"):
            try:
                ops.server.stub.IssueToken(
                    auth_pb2.IssueTokenRequest(
                        service_id=service_id, service_secret=wrong, audience="billing"
                    ),
                    metadata=[("x-request-id", forged_rid)],
                    timeout=10,
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED

        def mine() -> list[dict[str, Any]]:
            return [
                e
                for e in json_lines(ops.server.output)
                if e.get("actor") == "orders"
                and e.get("outcome") == "bad_credentials"
                and e.get("request_id") not in before
            ]

        wait_for(lambda: bool(mine()))
        [entry] = mine()
        assert entry["event"] == "audit"
        assert entry["target"] == "orders"
        # The caller's id did not fit the grammar: the call got a fresh one, which the access
        # line shares.
        assert entry["request_id"] != forged_rid
        assert all(forged_rid not in line for line in ops.server.output)
        # The forged service id never becomes text an event could be misread from: unknown ids
        # are audited under "*", and every event text is constant.
        for e in json_lines(ops.server.output):
            assert FORGED not in str(e.get("event")), e
            assert "outcome=ok" not in str(e.get("event")), e
        method = "/authsvc.v1.AuthService/IssueToken"

        def shared() -> bool:
            lines = access_lines(ops.server.output, method)
            return any(e["request_id"] == entry["request_id"] for e in lines)

        wait_for(shared)
        assert shared()

    def test_dev_lines_quote_a_value_that_holds_spaces_quotes_or_control_characters(
        self,
    ) -> None:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(HumanFormatter())
        logger = logging.getLogger("authsvc.server")
        logger.addHandler(handler)
        saved = logger.level
        logger.setLevel(logging.INFO)
        actor = FORGED + '\nfake line outcome="ok"\x1b[2J'
        try:
            log_audit(
                action="issue_token",
                actor=actor,
                target="service:orders",
                outcome="bad_credentials",
                peer="ipv4:127.0.0.1",
                request_id="r-1",
            )
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved)
        [line] = stream.getvalue().splitlines()
        assert "\x1b" not in line
        fields = line[line.index("[") + 1 : line.rindex("]")]
        # A logfmt reader sees each field once, the forged pairs only inside the quoted actor.
        pairs = dict(token.split("=", 1) for token in shlex.split(fields))
        assert set(pairs) == {"action", "actor", "target", "outcome", "peer", "request_id"}
        assert pairs["outcome"] == "bad_credentials"
        quoted = fields.index("actor=") + len("actor=")
        assert json.JSONDecoder().raw_decode(fields, quoted)[0] == actor
        assert line.split(" INFO authsvc.server ", 1)[1].startswith("audit [")

    def test_only_a_safe_request_id_is_kept(self) -> None:
        for kept in ("req-1", "A.b_c-9", "x" * 64):
            assert request_id_from([("x-request-id", kept)]) == kept
        for refused in (
            "a b",
            "a=b",
            "x" * 65,
            "line\nbreak",
            "esc\x1b[0m",
            'quote"d',
            "",
            "caf\u00e9",
        ):
            fresh = request_id_from([("x-request-id", refused)])
            assert fresh != refused
            assert len(fresh) == 32 and int(fresh, 16) >= 0

    def test_a_deferred_request_id_is_made_once_and_only_when_read(self) -> None:
        made: list[str] = []

        def fresh() -> str:
            made.append(f"id{len(made)}")
            return made[-1]

        with rpc_context(request_id=Deferred(fresh), method="/m"):
            assert made == []  # a call that logs nothing makes no id
            record = logging.LogRecord("t", logging.INFO, __file__, 1, "rpc", (), None)
            first = json.loads(JsonFormatter().format(record))["request_id"]
            assert current_request_id() == first == "id0"
            assert json.loads(JsonFormatter().format(record))["request_id"] == "id0"
        assert made == ["id0"]


class TestAccessLineLevels:
    def test_successful_validations_and_key_reads_stay_at_debug(self, ops: OpsServer) -> None:
        """The fleet's bulk of calls: counted and timed in /metrics, not one info line each;
        a token found invalid still logs its line."""
        assert _calls_then_marker(ops, "lvl") == {"lvl-invalid"}

    def test_access_log_all_logs_them_at_info(self, tmp_path: Path) -> None:
        loud = start_ops_server(tmp_path, AUTHSVC_ACCESS_LOG_ALL="true")
        try:
            assert _calls_then_marker(loud, "all") == {"all-valid", "all-invalid", "all-jwks"}
            levels = {
                e["level"]
                for e in json_lines(loud.server.output)
                if str(e.get("request_id", "")).startswith("all-") and e.get("event") == "rpc"
            }
            assert levels == {"info"}
        finally:
            loud.server.stop()


class TestDevLogs:
    def test_dev_mode_logs_are_readable_lines(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
        env["PYTHONUNBUFFERED"] = "1"
        server = start_server(env, "--dev", "--dev-dir", str(tmp_path / "dev"))
        try:
            server.stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(token="x.y.z", audience="billing"), timeout=10
            )
            wait_for(lambda: any("ValidateToken" in line for line in server.output))
        finally:
            server.stop()
        [line] = [line for line in server.output if "ValidateToken" in line]
        assert " INFO authsvc.access rpc " in line
        assert "outcome=OK" in line
        assert not line.lstrip().startswith("{")
        assert run_cli(env, "keys", "list", "--dev", "--dev-dir", str(tmp_path / "dev")).stdout


class TestRedaction:
    """The formatter's last line of defence, for a message that slipped through with a secret."""

    def test_tokens_secrets_and_bearer_values_are_scrubbed(self) -> None:
        jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvcmRlcnMifQ.c2lnbmF0dXJl"
        text = f"got {jwt} and asvcs_abcDEF123_-x and Authorization: Bearer opaque123"
        out = redact(text)
        assert jwt not in out
        assert "asvcs_abcDEF123" not in out
        assert "opaque123" not in out
        assert "Bearer [REDACTED]" in out

    def test_each_shape_is_scrubbed_alone_in_any_casing_and_clean_text_is_untouched(
        self,
    ) -> None:
        for text, hidden in (
            ("token eyJhbGciOi.eyJzdWIi.c2ln here", "eyJhbGciOi.eyJzdWIi.c2ln"),
            ("secret asvcs_abcDEF123_-x here", "asvcs_abcDEF123"),
            ("authorization: BEARER opaque123", "opaque123"),
            ("authorization: bEaReR opaque123", "opaque123"),
        ):
            assert hidden not in redact(text) and "[REDACTED]" in redact(text)
        clean = "rpc outcome=OK method=/authsvc.v1.AuthService/ValidateToken"
        assert redact(clean) is clean

    def test_exception_text_is_left_out_of_json_lines(self) -> None:
        hidden = "-".join(["secret", "value", "in", "message"])
        try:
            raise ValueError(hidden)
        except ValueError:
            record = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
        with rpc_context(request_id="r1", method="/m"):
            line = JsonFormatter().format(record)
        entry = json.loads(line)
        assert entry["exc_type"] == "ValueError"
        assert entry["request_id"] == "r1"
        assert hidden not in line


class TestJsonTimestamps:
    def test_the_timestamp_is_iso_8601_utc_to_the_millisecond(self) -> None:
        """The formatter caches each second's text; every line must still read as if
        datetime.isoformat had written it, across second boundaries and out-of-order records."""
        formatter = JsonFormatter()
        for created in (
            1_900_000_000.0,
            1_900_000_000.25,
            1_899_999_999.5,
            1_900_000_001.75,
            0.125,
        ):
            record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", (), None)
            record.created = created
            expected = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
            assert json.loads(formatter.format(record))["timestamp"] == expected
