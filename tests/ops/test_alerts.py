"""deploy/prometheus/alerts.yml: promtool accepts it, its unit tests pass, and every metric an
alert reads is one a real server exports (a renamed metric would silence its alert)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authsvc_client.v1 import auth_pb2
from tests.ops.conftest import OpsServer

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
_OURS = re.compile(r"\b((?:authsvc|grpc_server)_[a-z0-9_]+)")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (.ci/run installs prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def _rules_text() -> str:
    return (RULES / "alerts.yml").read_text()


class TestAlertRules:
    def test_promtool_checks_the_rules(self) -> None:
        out = subprocess.run(
            [_promtool(), "check", "rules", "alerts.yml"],
            cwd=RULES, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def test_promtool_unit_tests_pass(self) -> None:
        out = subprocess.run(
            [_promtool(), "test", "rules", "alerts.test.yml"],
            cwd=RULES, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def test_the_issue_asks_for_these_alerts(self) -> None:
        assert set(re.findall(r"^ *- alert: (\S+)$", _rules_text(), re.MULTILINE)) == {
            "AuthsvcValidationFailuresSpiking",
            "AuthsvcThrottlingSpiking",
            "AuthsvcSigningKeyRotationOverdue",
            "AuthsvcReplicaSyncLagging",
            "AuthsvcRevocationFollowersDropped",
            "AuthsvcDatabaseUnavailable",
        }


class TestAlertInputs:
    def test_every_metric_an_alert_reads_is_exported(self, ops: OpsServer) -> None:
        # One call, so labelled families have at least their HELP/TYPE lines.
        ops.server.stub.ValidateToken(
            auth_pb2.ValidateTokenRequest(token="x.y.z", audience="billing"), timeout=10
        )
        exported: set[str] = set()
        for family in text_string_to_metric_families(ops.get("/metrics").text):
            for suffix in _SUFFIXES.get(family.type, ("",)):
                exported.add(family.name + suffix)
        read = set(_OURS.findall(_rules_text()))
        assert read, "no authsvc metric found in the alert expressions"
        assert read - exported == set()

    def test_promtool_accepts_the_real_metrics(self, ops: OpsServer) -> None:
        out = subprocess.run(
            [_promtool(), "check", "metrics"],
            input=ops.get("/metrics").text, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
