"""The side-by-side benchmark's arithmetic: process-tree CPU, per-request CPU, skip reasons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from bench.bare import BareProcess
from bench.peer import PeerSlice, _issue_floor, find_peer_source, peer_summary, skip_reason
from bench.stats import _own_cpu_seconds, process_cpu_seconds

# A parent that starts a child, which burns `BURN` seconds of its own CPU, says so, then waits
# for its standard input to close; the parent only waits.
BURN = 0.3
_CHILD = (
    "import sys, time\n"
    f"while time.process_time() < {BURN}: pass\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)
_PARENT = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdin=sys.stdin)\n"
    "child.wait()\n"
)


class TestProcessTreeCpu:
    def test_counts_the_cpu_of_a_grandchild(self) -> None:
        """`authsvc serve --workers 2` does its work in child processes of the pid measured."""
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT, _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline().strip() == "burnt"
            tree = process_cpu_seconds(parent.pid)
            own = _own_cpu_seconds(parent.pid)
            # The child's 0.3 s (less one clock tick of rounding) is in the tree's total...
            assert tree - own >= BURN - 0.02
            # ...and not in the parent's own figure, which only started a process.
            assert own < BURN
        finally:
            assert parent.stdin is not None and parent.stdout is not None
            parent.stdin.close()
            parent.wait(30)
            parent.stdout.close()

    def test_a_process_that_is_gone_counts_nothing(self) -> None:
        # The pid of a reaped process (not reused this quickly in practice).
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        assert process_cpu_seconds(proc.pid) == 0.0


class TestPeerSummary:
    def test_subtracts_the_functional_checks_from_every_slice(self) -> None:
        slices = [
            PeerSlice(requests=1000, seconds=2.0, tree_cpu=0.81, window_cpu_pct=40.0),
            PeerSlice(requests=3000, seconds=2.0, tree_cpu=2.41, window_cpu_pct=120.0),
        ]
        out = peer_summary(slices, checks_cpu=0.01)
        # (0.80 + 2.40) s of CPU for 4,000 requests.
        assert out["server_cpu_us_per_call"] == 800.0
        assert out["rps"] == 1000.0
        assert out["slice_rps"] == [500, 1500]
        assert out["server_cpu_pct"] == 80.0
        # The client's window reading: 0.8 + 2.4 s over the same 4,000 requests.
        assert out["window_main_process_cpu_us_per_call"] == 800.0
        assert out["checks_cpu_ms"] == 10.0

    def test_checks_costing_more_than_a_slice_never_go_negative(self) -> None:
        out = peer_summary([PeerSlice(10, 1.0, 0.001, None)], checks_cpu=0.01)
        assert out["server_cpu_us_per_call"] == 0.0
        assert out["window_main_process_cpu_us_per_call"] is None

    def test_failures_are_counted(self) -> None:
        out = peer_summary([PeerSlice(10, 1.0, 0.1, None, failed=3)], checks_cpu=0.0)
        assert out["failed"] == 3


class TestSkipReason:
    def test_without_node_the_section_says_why(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PATH", "/nonexistent")
        assert skip_reason(Path("/nonexistent")) == "node is not installed"

    def test_a_configured_folder_without_the_peer_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("AUTHSVC_BENCH_PEER", str(tmp_path))
        assert find_peer_source() is None

    def test_a_folder_missing_the_lock_file_is_named(self, tmp_path: Path) -> None:
        (tmp_path / "server.mjs").write_text("")
        reason = skip_reason(tmp_path)
        if reason in ("node is not installed", "npm is not installed"):
            pytest.skip(reason)
        assert reason is not None and "package-lock.json" in reason

    def test_the_peer_is_found_above_a_worktree(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("AUTHSVC_BENCH_PEER", raising=False)
        peer = tmp_path / "shared" / "peers" / "oidc-provider"
        peer.mkdir(parents=True)
        (peer / "server.mjs").write_text("")
        module = tmp_path / "wt" / "peer" / "bench" / "peer.py"
        assert find_peer_source(module) == peer


class TestIssueFloor:
    def test_one_signature_plus_one_unary_call_against_the_peer(self) -> None:
        out = {
            "local": {"raw_rsa_sign_us": 300.0},
            "authsvc": {"validate_unary": {"server_cpu_us_per_call": 500.0}},
            "peer": {"issue": {"server_cpu_us_per_call": 640.0}},
        }
        assert _issue_floor(out) == {
            "sign_us": 300.0,
            "unary_us": 500.0,
            "floor_us": 800.0,
            "floor_over_peer_issue": 1.25,
        }

    def test_the_bare_grpc_unary_call_gives_a_second_floor(self) -> None:
        out = {
            "local": {"raw_rsa_sign_us": 300.0},
            "authsvc": {
                "validate_unary": {"server_cpu_us_per_call": 500.0},
                "bare_unary": {"server_cpu_us_per_call": 340.0},
            },
            "peer": {"issue": {"server_cpu_us_per_call": 640.0}},
        }
        floor = _issue_floor(out)
        assert floor is not None
        assert (floor["bare_floor_us"], floor["bare_floor_over_peer_issue"]) == (640.0, 1.0)

    def test_the_bare_issue_call_is_the_floor_measured_as_one_call(self) -> None:
        out = {
            "local": {"raw_rsa_sign_us": 300.0},
            "authsvc": {
                "validate_unary": {"server_cpu_us_per_call": 500.0},
                "bare_issue": {"server_cpu_us_per_call": 800.0},
                "issue": {"server_cpu_us_per_call": 1400.0},
                "issue_1p": {"server_cpu_us_per_call": 1200.0},
            },
            "peer": {"issue": {"server_cpu_us_per_call": 640.0}},
        }
        floor = _issue_floor(out)
        assert floor is not None
        assert floor["measured_floor_us"] == 800.0
        assert floor["measured_floor_over_peer_issue"] == 1.25
        # Compared with authsvc on one process, as the bare server runs.
        assert floor["issue_over_measured_floor"] == 1.5
        assert floor["issue_against_measured_floor"] == "issue_1p"

    def test_without_a_unary_figure_there_is_no_floor(self) -> None:
        out = {"local": {"raw_rsa_sign_us": 300.0}, "authsvc": {}, "peer": {"issue": {}}}
        assert _issue_floor(out) is None


class TestBareServer:
    def test_it_answers_both_methods_with_the_fixed_answer_and_ends_with_its_stdin(self) -> None:
        answer = auth_pb2.ValidateTokenResponse(valid=True, claims=auth_pb2.Claims(subject="s"))
        bare = BareProcess(answer.SerializeToString())
        try:
            with grpc.insecure_channel(bare.address) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                request = auth_pb2.ValidateTokenRequest(token="a.b.c", audience="x")
                assert stub.ValidateToken(request, timeout=10) == answer
                assert (
                    list(stub.ValidateTokenStream(iter([request] * 3), timeout=10)) == [answer] * 3
                )
        finally:
            bare.close()
        assert bare.proc.returncode == 0

    def test_its_issue_token_gives_the_fixed_answer(self) -> None:
        issued = auth_pb2.IssueTokenResponse(access_token="h.p.s", token_type="Bearer")
        bare = BareProcess(b"", issued.SerializeToString(), key_bits=2048)
        try:
            with grpc.insecure_channel(bare.address) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                request = auth_pb2.IssueTokenRequest(service_id="s", service_secret="x")
                assert [stub.IssueToken(request, timeout=10) for _ in range(3)] == [issued] * 3
        finally:
            bare.close()
        assert bare.proc.returncode == 0
