"""The examples/ demo end to end: real authsvc, real billing and orders processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


class TestDemo:
    def test_demo_shows_auth_denial_revocation_and_rotation_without_failures(self) -> None:
        proc = subprocess.run(
            [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=90
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out = proc.stdout
        assert "authenticated call orders -> billing: order placed; charged 42 for orders" in out
        assert "call without a token denied: UNAUTHENTICATED" in out
        assert "revoked token denied" in out
        assert ", 0 failed" in out
        assert "asvcs_" not in out  # no service secret is ever printed
