"""docs/runbooks.md stays true: the alerts' runbook links name its sections, the metrics it says
to watch are ones a real server exports, and the commands it names exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import OpsServer
from tests.support.server import authsvc_command

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
# Commands DESIGN.md names that another change is building; the runbooks use them already.
PENDING = {("kek", "rotate"), ("db", "backup")}


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors() -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", RUNBOOKS.read_text(), re.MULTILINE)}


class TestRunbooks:
    def test_every_alert_links_to_a_runbook_section(self) -> None:
        links = re.findall(r"runbook: docs/runbooks\.md#([\w-]+)", ALERTS.read_text())
        assert len(links) == 6
        assert set(links) - _anchors() == set()

    def test_the_issue_asks_for_these_runbooks(self) -> None:
        assert {
            "signing-key-compromise",
            "kek-rotation",
            "a-leaked-service-secret",
            "restore-from-backup",
            "adding-a-replica",
        } <= _anchors()

    def test_in_page_links_resolve(self) -> None:
        links = re.findall(r"\]\(#([\w-]+)\)", RUNBOOKS.read_text())
        assert links
        assert set(links) - _anchors() == set()

    def test_the_metrics_to_watch_are_exported(self, ops: OpsServer) -> None:
        exported: set[str] = set()
        for family in text_string_to_metric_families(ops.get("/metrics").text):
            for suffix in _SUFFIXES.get(family.type, ("",)):
                exported.add(family.name + suffix)
        named = set(re.findall(r"\b((?:authsvc|grpc_server)_[a-z0-9_]+)", RUNBOOKS.read_text()))
        assert named
        assert named - exported == set()

    def test_the_commands_named_exist(self) -> None:
        commands = set(re.findall(r"`authsvc ([a-z]+) ([a-z][a-z-]*)", RUNBOOKS.read_text()))
        assert ("keys", "rotate") in commands
        for group, verb in sorted(commands - PENDING):
            out = subprocess.run(
                [*authsvc_command(), group, verb, "--help"],
                capture_output=True, text=True, timeout=60,
            )
            assert out.returncode == 0, f"authsvc {group} {verb}: {out.stderr[-500:]}"
