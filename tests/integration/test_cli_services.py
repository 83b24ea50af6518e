"""`authsvc services create --grant`, `update`, `enable` and `list`: the CLI over ServiceRegistry.

Each command works on the database directly (like `services create`), is audited as `cli` from
`local`, and its change reaches a running server's next login.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import sqlite_env
from tests.support.server import RunningServer, run_cli, running_server


def _fail(env: dict[str, str], *args: str) -> str:
    """A refused command: exit 2, no traceback, one `authsvc: ...` line on stderr."""
    proc: subprocess.CompletedProcess[str] = run_cli(env, *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("authsvc: "), proc.stderr
    return lines[0]


def _listed(env: dict[str, str], name: str) -> dict[str, Any]:
    [service] = [
        s
        for s in json.loads(run_cli(env, "services", "list", "--json").stdout)
        if s["service_id"] == name
    ]
    return service


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = sqlite_env(tmp_path)
    run_cli(env, "db", "upgrade")
    return env


class TestServicesCommands:
    def test_create_with_grants_then_update_and_list(self, env: dict[str, str]) -> None:
        run_cli(
            env, "services", "create", "orders", "--audience", "billing",
            "--scope", "billing.read", "--grant", "inventory=inventory.admin", "--json",
        )  # fmt: skip
        assert _listed(env, "orders")["grants"] == {
            "billing": ["billing.read"],
            "inventory": ["inventory.admin"],
        }
        out = run_cli(
            env, "services", "update", "orders", "--add-audience", "search",
            "--add-scope", "audit.read", "--revoke-grant", "inventory=inventory.admin", "--json",
        ).stdout  # fmt: skip
        shown = json.loads(out)
        # The revoke applies first: the new audience gets the union of what is left.
        assert shown["grants"] == {
            "billing": ["billing.read", "audit.read"],
            "inventory": ["audit.read"],
            "search": ["billing.read", "audit.read"],
        }
        assert shown == _listed(env, "orders")
        assert shown["audiences"] == ["billing", "inventory", "search"]
        assert shown["scopes"] == ["billing.read", "audit.read"]
        text = run_cli(env, "services", "list").stdout
        assert (
            "orders\tenabled\taudiences=billing,inventory,search"
            "\tscopes=billing.read,audit.read"
            "\tgrants=billing=billing.read,audit.read inventory=audit.read"
            " search=billing.read,audit.read\n"
        ) in text

    def test_every_change_is_audited_as_the_cli(self, env: dict[str, str]) -> None:
        run_cli(env, "services", "create", "orders", "--grant", "billing=")
        run_cli(env, "services", "update", "orders", "--grant", "billing=billing.read")
        run_cli(env, "services", "disable", "orders")
        assert "enabled" in run_cli(env, "services", "enable", "orders").stdout
        rows = json.loads(run_cli(env, "audit", "list", "--json").stdout)
        mine = [
            (r["action"], r["actor"], r["peer"], r["outcome"], r["detail"])
            for r in reversed(rows)
            if r["target"] == "service:orders"
        ]
        assert mine == [
            ("create_service", "cli", "local", "ok", "billing="),
            ("update_service", "cli", "local", "ok", "billing=billing.read"),
            ("disable_service", "cli", "local", "ok", ""),
            ("enable_service", "cli", "local", "ok", ""),
        ]
        assert _listed(env, "orders")["disabled"] is False

    @pytest.mark.parametrize(
        ("args", "named"),
        [
            (["--grant", "billing"], "--grant takes AUDIENCE=SCOPE"),
            (["--revoke-grant", "billing="], "revoke_grants"),
            ([], "nothing to change"),
            (["--remove-scope", "billing.write"], "scope billing.write is not granted"),
            (["--add-scope", "x", "--remove-scope", "x"], "named both to add and to remove: x"),
            (["--remove-audience", "billing"], "at least one audience"),
        ],
    )
    def test_refused_updates_say_why_and_change_nothing(
        self, env: dict[str, str], args: list[str], named: str
    ) -> None:
        run_cli(env, "services", "create", "orders", "--audience", "billing", "--scope", "b.r")
        before = _listed(env, "orders")
        assert named in _fail(env, "services", "update", "orders", *args)
        assert _listed(env, "orders") == before

    def test_unknown_services(self, env: dict[str, str]) -> None:
        assert _fail(env, "services", "update", "ghost", "--add-scope", "a") == (
            "authsvc: no such service"
        )
        assert _fail(env, "services", "enable", "ghost") == "authsvc: no such service"

    def test_create_needs_an_audience_or_a_grant(self, env: dict[str, str]) -> None:
        proc = run_cli(env, "services", "create", "orders", "--scope", "s", check=False)
        assert proc.returncode != 0
        assert "--grant" in proc.stderr
        run_cli(env, "services", "create", "orders", "--grant", "billing=s")
        assert _listed(env, "orders")["grants"] == {"billing": ["s"]}


class TestTheCliChangesARunningServer:
    def test_update_and_enable_reach_the_next_login(self, env: dict[str, str]) -> None:
        with running_server(env) as server:
            secret = _secret(server, "orders", "--audience", "billing", "--scope", "b.read")
            server.cli("services", "update", "orders", "--grant", "inventory=i.admin")
            assert list(server.issue("orders", secret, "inventory").scopes) == ["i.admin"]
            assert list(server.issue("orders", secret, "billing").scopes) == ["b.read"]
            server.cli("services", "disable", "orders")
            with pytest.raises(grpc.RpcError) as exc:
                server.issue("orders", secret, "billing")
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            server.cli("services", "enable", "orders")
            token = server.issue("orders", secret, "billing").access_token
            # The CLI's enable reaches the server's validation within its sync interval.
            deadline = time.monotonic() + 30
            while True:
                reply = server.stub.ValidateToken(
                    auth_pb2.ValidateTokenRequest(token=token, audience="billing"), timeout=10
                )
                if reply.valid or time.monotonic() > deadline:
                    break
                assert reply.reason == auth_pb2.SERVICE_DISABLED
                time.sleep(0.05)
            assert reply.valid


def _secret(server: RunningServer, name: str, *flags: str) -> str:
    out = server.cli("services", "create", name, "--json", *flags).stdout
    return str(json.loads(out)["service_secret"])
