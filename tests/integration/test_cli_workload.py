"""`authsvc services … --jwk-file/--tls-san/--federated-subject/--no-secret` and `authsvc trust`:
real commands on a real database (SQLite; one case on PostgreSQL), real keys in real files.

What is checked is what an operator sees: exit codes, one `authsvc: …` line per refusal (never
a traceback, never a key's content), the JSON and text shapes, and the audit rows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from authsvc_client.assertions import PrivateKey, jwk_thumbprint
from tests.integration.conftest import sqlite_env
from tests.support.server import base_env, run_cli, start_server
from tests.support.workload import (
    jwk_of,
    jwk_set,
    new_ec,
    new_ed25519,
    new_rsa,
    private_pem,
    public_pem,
)

SPIFFE = "spiffe://example.org/ns/prod/sa/orders"
SUBJECT = "system:serviceaccount:prod:orders"
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"


def _refused(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A refused command: exit 2, no traceback, one `authsvc: ...` line on stderr."""
    proc: subprocess.CompletedProcess[str] = run_cli(env, *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("authsvc: "), proc.stderr
    return proc


def _fail(env: dict[str, str], *args: str) -> str:
    """The one line a refused command wrote."""
    return _refused(env, *args).stderr.strip()


def _listed(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        s["service_id"]: s for s in json.loads(run_cli(env, "services", "list", "--json").stdout)
    }


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _kid(key: PrivateKey) -> str:
    return jwk_thumbprint(key.public_key())


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = sqlite_env(tmp_path)
    run_cli(env, "db", "upgrade")
    return env


@pytest.fixture
def k8s(env: dict[str, str], tmp_path: Path) -> str:
    """`authsvc trust add k8s` from a JWK Set file; returns the trust's name."""
    jwks = _write(tmp_path, "k8s.json", jwk_set(jwk_of(new_rsa(), kid="k8s-1", use="sig")))
    out = run_cli(
        env, "trust", "add", "k8s", "--issuer", K8S_ISSUER, "--audience", "authsvc",
        "--jwks-file", jwks,
    ).stdout  # fmt: skip
    assert out.startswith("trust k8s added: ")
    return "k8s"


class TestSecretlessServices:
    def test_create_shows_a_null_secret_and_every_credential_is_listed(
        self, env: dict[str, str], tmp_path: Path, k8s: str
    ) -> None:
        ec_key, ed_key = new_ec(), new_ed25519()
        pem = _write(tmp_path, "orders.pem", public_pem(ec_key))
        jwk = _write(tmp_path, "orders.jwk", json.dumps(jwk_of(ed_key)).encode())
        out = run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--scope", "b.read",
            "--no-secret", "--jwk-file", pem, "--jwk-file", jwk, "--tls-san", SPIFFE,
            "--federated-subject", f"{k8s}={SUBJECT}", "--json",
        ).stdout  # fmt: skip
        assert json.loads(out) == {"service_id": "orders", "service_secret": None}
        run_cli(env, "services", "create", "plain", "--audience", "billing")
        listed = _listed(env)
        orders = listed["orders"]
        assert orders["has_secret"] is False
        assert orders["credentials"] == ["assertion", "certificate", "federated"]
        assert orders["public_key_ids"] == [_kid(ec_key), _kid(ed_key)]
        assert orders["tls_sans"] == [SPIFFE]
        assert orders["federated_subjects"] == [{"trust": "k8s", "subject": SUBJECT}]
        assert orders["grants"] == {"billing": ["b.read"]}
        plain = listed["plain"]
        assert (plain["has_secret"], plain["credentials"]) == (True, ["secret"])
        assert plain["public_key_ids"] == plain["tls_sans"] == plain["federated_subjects"] == []
        text = run_cli(env, "services", "list").stdout.splitlines()
        assert text == [
            "orders\tenabled\taudiences=billing\tscopes=b.read\tgrants=billing=b.read"
            "\tcredentials=assertion,certificate,federated",
            # A service with a secret only reads as it did before workload credentials.
            "plain\tenabled\taudiences=billing\tscopes=\tgrants=billing=",
        ]
        # Audited as the CLI, by kind, key id, SAN and subject; no key material.
        rows = json.loads(run_cli(env, "audit", "list", "--json").stdout)
        [created] = [r for r in rows if r["target"] == "service:orders"]
        assert (created["actor"], created["action"]) == ("cli", "create_service")
        assert created["detail"] == (
            "billing=b.read; credentials=assertion,certificate,federated; "
            f"public_key:{_kid(ec_key)} public_key:{_kid(ed_key)} tls_san:{SPIFFE} "
            f"federated:k8s={SUBJECT}"
        )
        assert jwk_of(ec_key)["x"] not in json.dumps(rows)

    def test_the_env_and_text_formats_of_a_secretless_service(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        pem = _write(tmp_path, "a.pem", public_pem(new_rsa()))
        out = run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--no-secret",
            "--jwk-file", pem, "--format", "env",
        ).stdout  # fmt: skip
        assert out == "AUTHSVC_SERVICE_ID=orders\n"
        out = run_cli(
            env, "services", "create", "billing", "--audience", "orders", "--no-secret",
            "--tls-san", "billing.prod.example.org",
        ).stdout  # fmt: skip
        assert out == "service billing created with no secret; it logs in with: certificate\n"
        # With a secret beside a key: the secret's formats are as they were.
        out = run_cli(
            env, "services", "create", "search", "--audience", "orders", "--jwk-file", pem,
            "--format", "env",
        ).stdout  # fmt: skip
        lines = out.splitlines()
        assert lines[0] == "AUTHSVC_SERVICE_ID=search"
        assert lines[1].startswith("AUTHSVC_SERVICE_SECRET=") and len(lines) == 2

    def test_update_rolls_a_key_and_removes_credentials(
        self, env: dict[str, str], tmp_path: Path, k8s: str
    ) -> None:
        old, new = new_ec(), new_rsa()
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--no-secret",
            "--jwk-file", _write(tmp_path, "old.pem", public_pem(old)), "--tls-san", SPIFFE,
            "--federated-subject", f"{k8s}={SUBJECT}",
        )  # fmt: skip
        new_file = _write(tmp_path, "new.jwk", json.dumps(jwk_of(new, use="sig")).encode())
        out = run_cli(
            env, "services", "update", "orders", "--jwk-file", new_file,
            f"--remove-key={_kid(old)}", "--remove-tls-san", SPIFFE,
            "--remove-federated-subject", f"{k8s}={SUBJECT}", "--add-scope", "b.read", "--json",
        ).stdout  # fmt: skip
        shown = json.loads(out)
        assert shown == _listed(env)["orders"]
        assert shown["public_key_ids"] == [_kid(new)]
        assert shown["tls_sans"] == shown["federated_subjects"] == []
        assert shown["credentials"] == ["assertion"]
        assert shown["grants"] == {"billing": ["b.read"]}
        # Credentials only; the text answer is the service's list line.
        out = run_cli(env, "services", "update", "orders", "--tls-san", SPIFFE).stdout
        assert out == (
            "orders\tenabled\taudiences=billing\tscopes=b.read\tgrants=billing=b.read"
            "\tcredentials=assertion,certificate\n"
        )


class TestRefusals:
    def test_a_private_key_file_is_refused_and_never_shown(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        key = new_ec()
        pem = private_pem(key)
        path = _write(tmp_path, "orders-key.pem", pem)
        proc = _refused(
            env, "services", "create", "orders", "--audience", "billing", "--no-secret",
            "--jwk-file", path,
        )  # fmt: skip
        line = proc.stderr.strip()
        assert line.startswith(f"authsvc: --jwk-file {path}: ")
        assert "private key" in line and "pubout" in line
        body = b"".join(pem.splitlines()[1:-1]).decode()
        for chunk in (body[i : i + 16] for i in range(0, len(body) - 16, 16)):
            assert chunk not in proc.stdout + proc.stderr
        assert "orders" not in _listed(env)

    @pytest.mark.parametrize(
        ("flags", "named"),
        [
            (["--no-secret"], "--jwk-file, --tls-san or --federated-subject"),
            (["--tls-san", "*.example.org"], "wildcards are refused"),
            (["--federated-subject", "k8s"], "--federated-subject takes TRUST=SUBJECT"),
            (["--federated-subject", "ghost=x"], "no trust named 'ghost'"),
            (["--jwk-file", "/nonexistent/key.pem"], "cannot read the file"),
        ],
    )
    def test_bad_credentials_say_why_and_register_nothing(
        self, env: dict[str, str], flags: list[str], named: str
    ) -> None:
        line = _fail(env, "services", "create", "orders", "--audience", "billing", *flags)
        assert named in line
        assert "orders" not in _listed(env)

    def test_a_key_file_holding_a_jwk_set_or_no_key(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        jwks = _write(tmp_path, "set.json", jwk_set(jwk_of(new_ec())))
        assert "give one JWK, not a JWK Set" in _fail(
            env, "services", "create", "orders", "--audience", "b", "--jwk-file", jwks
        )
        junk = _write(tmp_path, "junk.bin", bytes(range(256)))
        assert "not a JWK (JSON) or PEM text file" in _fail(
            env, "services", "create", "orders", "--audience", "b", "--jwk-file", junk
        )

    def test_credential_clashes_name_the_credential(
        self, env: dict[str, str], tmp_path: Path, k8s: str
    ) -> None:
        key = new_ec()
        pem = _write(tmp_path, "k.pem", public_pem(key))
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--no-secret",
            "--federated-subject", f"{k8s}={SUBJECT}", "--jwk-file", pem,
        )  # fmt: skip
        assert _fail(
            env, "services", "create", "billing", "--audience", "orders",
            "--federated-subject", f"{k8s}={SUBJECT}",
        ) == (f"authsvc: federated subject k8s={SUBJECT} is bound to service 'orders'")  # fmt: skip
        assert _fail(env, "services", "update", "orders", "--jwk-file", pem) == (
            f"authsvc: public key {_kid(key)} is already registered for this service"
        )
        assert "no way to log in" in _fail(
            env, "services", "update", "orders", f"--remove-key={_kid(key)}",
            "--remove-federated-subject", f"{k8s}={SUBJECT}",
        )  # fmt: skip
        assert "public key nope is not registered" in _fail(
            env, "services", "update", "orders", "--remove-key=nope"
        )
        assert _fail(env, "services", "create", "orders", "--audience", "x") == (
            "authsvc: that service already exists"
        )
        assert _fail(env, "services", "update", "ghost", "--tls-san", SPIFFE) == (
            "authsvc: no such service"
        )
        assert _listed(env)["orders"]["credentials"] == ["assertion", "federated"]


class TestTrustCommands:
    def test_add_list_and_remove(self, env: dict[str, str], tmp_path: Path, k8s: str) -> None:
        out = run_cli(
            env, "trust", "add", "gke", "--issuer", "https://container.googleapis.com/v1/x",
            "--audience", "authsvc", "--jwks-url", "https://gke.example.org/jwks",
            "--max-lifetime", "3600",
        ).stdout  # fmt: skip
        assert out == (
            "trust gke added: issuer=https://container.googleapis.com/v1/x\taudience=authsvc"
            "\tjwks_url=https://gke.example.org/jwks\tmax_lifetime=3600\n"
        )
        listed = json.loads(run_cli(env, "trust", "list", "--json").stdout)
        assert [(t["name"], t["issuer"], t["audience"]) for t in listed] == [
            ("gke", "https://container.googleapis.com/v1/x", "authsvc"),
            ("k8s", K8S_ISSUER, "authsvc"),
        ]
        assert listed[0]["jwks_url"] == "https://gke.example.org/jwks"
        assert listed[0]["key_ids"] is None and listed[0]["max_lifetime_seconds"] == 3600
        assert listed[1]["jwks_url"] is None and listed[1]["key_ids"] == ["k8s-1"]
        assert listed[1]["max_lifetime_seconds"] == 86400
        text = run_cli(env, "trust", "list").stdout.splitlines()
        assert text[1] == (
            f"k8s\tissuer={K8S_ISSUER}\taudience=authsvc\tjwks_file_keys=k8s-1\tmax_lifetime=86400"
        )
        run_cli(
            env, "services", "create", "orders", "--audience", "billing", "--no-secret",
            "--federated-subject", f"{k8s}={SUBJECT}",
        )  # fmt: skip
        run_cli(
            env, "services", "create", "billing", "--audience", "orders",
            "--federated-subject", f"{k8s}=system:serviceaccount:prod:billing",
        )  # fmt: skip
        proc = run_cli(env, "trust", "remove", "k8s")
        assert proc.stdout == "trust k8s removed; federated subjects unbound: 2\n"
        # orders had nothing else; billing keeps its secret.
        assert proc.stderr == (
            "authsvc: warning: service orders has no credential left (add one with "
            "`authsvc services update`, or disable it)\n"
        )
        assert [t["name"] for t in json.loads(run_cli(env, "trust", "list", "--json").stdout)] == [
            "gke"
        ]
        services = _listed(env)
        assert services["orders"]["credentials"] == []
        assert services["billing"]["credentials"] == ["secret"]
        rows = json.loads(run_cli(env, "audit", "list", "--json").stdout)
        mine = [
            (r["action"], r["target"], r["actor"], r["detail"])
            for r in reversed(rows)
            if r["target"].startswith("trust:")
        ]
        assert mine == [
            (
                "add_trust",
                "trust:k8s",
                "cli",
                f"issuer={K8S_ISSUER} audience=authsvc jwks=file keys=k8s-1 max_lifetime=86400",
            ),
            (
                "add_trust",
                "trust:gke",
                "cli",
                "issuer=https://container.googleapis.com/v1/x audience=authsvc "
                "jwks=url host=gke.example.org max_lifetime=3600",
            ),
            ("remove_trust", "trust:k8s", "cli", "federated_subjects_unbound=2"),
        ]

    def test_refusals(self, env: dict[str, str], tmp_path: Path, k8s: str) -> None:
        jwks = _write(tmp_path, "other.json", jwk_set(jwk_of(new_ec())))
        add = ["trust", "add", "--audience", "authsvc"]
        assert _fail(env, *add, "k8s", "--issuer", "https://x.example", "--jwks-file", jwks) == (
            "authsvc: trust 'k8s' already exists"
        )
        assert _fail(env, *add, "k8s-2", "--issuer", K8S_ISSUER, "--jwks-file", jwks) == (
            f"authsvc: issuer '{K8S_ISSUER}' is already trusted as 'k8s'"
        )
        assert "must be https" in _fail(
            env, *add, "a", "--issuer", "https://a.example", "--jwks-url", "http://a.example/k"
        )
        assert "no RSA" in _fail(
            env, *add, "a", "--issuer", "https://a.example",
            "--jwks-file", _write(tmp_path, "ed.json", jwk_set(jwk_of(new_ed25519()))),
        )  # fmt: skip
        assert "trust name must be" in _fail(
            env, *add, "A=B", "--issuer", "https://a.example", "--jwks-file", jwks
        )
        assert "max_lifetime" in _fail(
            env, *add, "a", "--issuer", "https://a.example", "--jwks-file", jwks,
            "--max-lifetime", "0",
        )  # fmt: skip
        # Exactly one key source: argparse says so (usage error, exit 2).
        proc = run_cli(
            env, *add, "a", "--issuer", "https://a.example", "--jwks-file", jwks,
            "--jwks-url", "https://a.example/k", check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
        assert _fail(env, "trust", "remove", "ghost") == "authsvc: no such trust"
        assert [t["name"] for t in json.loads(run_cli(env, "trust", "list", "--json").stdout)] == [
            "k8s"
        ]


def test_workload_credentials_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """The same commands on PostgreSQL: a trust, a secretless service bound to it, a key roll."""
    env = base_env(postgres_url)
    run_cli(env, "db", "upgrade")
    jwks = _write(tmp_path, "k8s.json", jwk_set(jwk_of(new_ec(), kid="pg-1")))
    run_cli(
        env, "trust", "add", "k8s", "--issuer", K8S_ISSUER, "--audience", "authsvc",
        "--jwks-file", jwks,
    )  # fmt: skip
    old, new = new_ec(), new_rsa()
    out = run_cli(
        env, "services", "create", "orders", "--audience", "billing", "--no-secret", "--json",
        "--jwk-file", _write(tmp_path, "old.pem", public_pem(old)),
        "--federated-subject", f"k8s={SUBJECT}",
    ).stdout  # fmt: skip
    assert json.loads(out)["service_secret"] is None
    assert "bound to service 'orders'" in _fail(
        env, "services", "create", "billing", "--audience", "orders",
        "--federated-subject", f"k8s={SUBJECT}",
    )  # fmt: skip
    run_cli(
        env, "services", "update", "orders", f"--remove-key={_kid(old)}",
        "--jwk-file", _write(tmp_path, "new.pem", public_pem(new)),
    )  # fmt: skip
    orders = _listed(env)["orders"]
    assert orders["public_key_ids"] == [_kid(new)]
    assert orders["federated_subjects"] == [{"trust": "k8s", "subject": SUBJECT}]
    assert run_cli(env, "trust", "remove", "k8s").stdout.endswith("unbound: 1\n")
    assert _listed(env)["orders"]["credentials"] == ["assertion"]


def test_token_issue_logs_in_with_a_signing_key_and_no_secret(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`authsvc token issue` logs in as the client package does: a secretless service signs an
    assertion with AUTHSVC_SERVICE_KEY_FILE; two ways configured at once is refused."""
    key = new_ec()
    run_cli(
        env, "services", "create", "orders", "--audience", "billing", "--no-secret",
        "--jwk-file", _write(tmp_path, "orders.pem", public_pem(key)),
    )  # fmt: skip
    key_file = tmp_path / "orders.key"
    key_file.write_bytes(private_pem(key))
    key_file.chmod(0o600)
    server = start_server(env)
    try:
        client = {
            **env,
            "AUTHSVC_TARGET": server.address,
            "AUTHSVC_SERVICE_ID": "orders",
            "AUTHSVC_SERVICE_KEY_FILE": str(key_file),
        }
        token = run_cli(client, "token", "issue", "--audience", "billing").stdout.strip()
        checked = run_cli(client, "token", "validate", "--audience", "billing", input_text=token)
        assert json.loads(checked.stdout)["claims"]["sub"] == "orders"
        secret = "a-secret-never-shown"
        both = _fail(
            {**client, "AUTHSVC_SERVICE_SECRET": secret}, "token", "issue", "--audience", "billing"
        )
        assert "set only one way to log in" in both and secret not in both
    finally:
        server.stop()
