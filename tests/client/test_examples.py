"""The examples/ demo end to end: real authsvc replicas and real billing, orders, front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def _processes_pointing_into(folder: Path) -> list[str]:
    """Pids of live processes whose environment names `folder` (every demo child gets
    AUTHSVC_DEV_DIR or a key file under the demo's temp folder, which lives in `folder`)."""
    needle = str(folder).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(entry.name)
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("demo-tmp")
    proc = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, tmp


class TestDemo:
    def test_demo_shows_auth_denial_revocation_and_rotation_without_failures(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = demo[0].stdout
        assert "authenticated call orders -> billing: order placed; charged 42 for orders" in out
        assert "call without a token denied: UNAUTHENTICATED" in out
        assert "revoked token denied" in out
        assert ", 0 failed" in out

    def test_secretless_logins_say_which_credential(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = demo[0].stdout
        assert "front: logged in without a secret (credential: assertion" in out
        assert "ledger logged in without a secret (credential: certificate" in out

    def test_billing_sees_who_asked_through_whom(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = demo[0].stdout
        assert "billing: charge 5 asked by front through orders" in out
        assert "front: checkout -> " in out
        assert "charged 5 for front through orders" in out

    def test_stolen_bound_token_fails_from_another_certificate(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        lines = demo[0].stdout.splitlines()
        assert any("same JWK Set as the first" in line for line in lines)
        assert any(
            "bound to its certificate" in line and "(ledger's certificate)" in line
            for line in lines
        )
        holder = [line for line in lines if "holder, over its own certificate" in line]
        assert holder and holder[0].endswith("charged 9 for ledger")
        thief = [line for line in lines if "thief replaying it" in line]
        assert thief and "UNAUTHENTICATED (invalid token: CERTIFICATE_MISMATCH)" in thief[0]
        revoked = [line for line in lines if "revoked at the mTLS replica" in line]
        assert revoked and revoked[0].endswith("UNAUTHENTICATED (invalid token: REVOKED)")

    def test_no_token_secret_or_private_key_is_printed(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        proc = demo[0]
        for line in (proc.stdout + proc.stderr).splitlines():
            assert "eyJ" not in line  # a JWT's header, base64url of '{"'
            assert "asvcs_" not in line  # a service secret's prefix
            assert "PRIVATE KEY" not in line
            assert "AUTHSVC_SERVICE_SECRET=" not in line

    def test_demo_removes_its_temp_folders_and_stops_its_processes(
        self, demo: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        tmp = demo[1]
        assert not [p.name for p in tmp.iterdir() if p.name.startswith("authsvc-demo-")]
        if Path("/proc/self/environ").exists():
            assert _processes_pointing_into(tmp) == []
