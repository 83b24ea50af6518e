"""Side by side with panva's node-oidc-provider: the same three jobs, in one run, on one machine.

The peer (`shared/peers/oidc-provider`: server.mjs, bench-client.mjs, a lock file) is copied to
a temporary folder and installed there with `npm ci`, since the shared folder is read-only in CI.
Its server runs as one Node process; its own client (autocannon, 16 connections) drives it with
`ONLY=issue|introspect|verify` and writes `RESULT_JSON`. authsvc is driven by `bench.loadgen`.

The figure compared is the **server's CPU per request**: user + system time of the server's
whole process tree (`/proc/<pid>/stat` of the process and of every descendant, all threads) over
a slice, divided by the requests it answered. The two load generators cost the machine
different amounts, which would skew a throughput comparison on 2 shared cores but not this.
Slices alternate (peer, authsvc, authsvc stream, …, then the reverse order), so a neighbour's
burst of load lands on both sides; requests/s is kept for the record.

Each run of the peer's client first makes its functional checks (discovery, three tokens,
introspection, revocation: ten requests) before it measures, with no warm-up of its own here.
Their server CPU is measured on its own (`ONLY=none` runs, the median) and subtracted from every
slice, so a slice's CPU is that of its measured requests. The client's own reading of the main
process over its measured window is kept beside it as a cross-check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import Target, TargetResult, run_load
from bench.stats import median, process_cpu_seconds

PEER_FOLDER_ENV = "AUTHSVC_BENCH_PEER"
PEER_RELATIVE = Path("shared/peers/oidc-provider")
_PEER_FILES = ("server.mjs", "bench-client.mjs", "package.json", "package-lock.json")


def find_peer_source(start: Path | None = None) -> Path | None:
    """The peer's folder: $AUTHSVC_BENCH_PEER, else `shared/peers/oidc-provider` beside the
    repository or beside any folder above it (a worktree sits deeper than the main checkout)."""
    configured = os.environ.get(PEER_FOLDER_ENV)
    if configured:
        return Path(configured) if Path(configured, "server.mjs").is_file() else None
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        candidate = parent / PEER_RELATIVE
        if (candidate / "server.mjs").is_file():
            return candidate
    return None


def skip_reason(source: Path | None) -> str | None:
    """Why the side-by-side section cannot run here, or None."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if source is None:
        return f"the peer's folder ({PEER_RELATIVE}, or ${PEER_FOLDER_ENV}) was not found"
    missing = [f for f in _PEER_FILES if not (source / f).is_file()]
    if missing:
        return f"the peer's folder {source} lacks {', '.join(missing)}"
    return None


@dataclass(frozen=True)
class PeerSlice:
    """One run of the peer's client: what it measured and what the server tree spent."""

    requests: int  # 2xx responses in the measured window
    seconds: float  # the measured window
    tree_cpu: float  # server tree CPU over the client's whole run, functional checks included
    window_cpu_pct: float | None  # the client's own reading: main process, measured window
    failed: int = 0  # non-2xx, errors and timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def peer_summary(slices: Sequence[PeerSlice], checks_cpu: float) -> dict[str, Any]:
    """Server CPU per request over all slices, the checks' CPU taken off each slice; the
    client's window reading of the main process beside it."""
    requests = sum(s.requests for s in slices)
    seconds = sum(s.seconds for s in slices)
    cpu = sum(max(0.0, s.tree_cpu - checks_cpu) for s in slices)
    window = [s for s in slices if s.window_cpu_pct is not None]
    window_cpu = sum((s.window_cpu_pct or 0.0) / 100 * s.seconds for s in window)
    window_requests = sum(s.requests for s in window)
    return {
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "slice_rps": [round(s.rps) for s in slices],
        "requests": requests,
        "failed": sum(s.failed for s in slices),
        "seconds": round(seconds, 3),
        "server_cpu_us_per_call": round(1e6 * cpu / requests, 1) if requests else 0.0,
        "server_cpu_pct": round(100 * cpu / seconds, 1) if seconds else 0.0,
        "window_main_process_cpu_us_per_call": round(1e6 * window_cpu / window_requests, 1)
        if window_requests
        else None,
        "checks_cpu_ms": round(1e3 * checks_cpu, 1),
    }


def authsvc_summary(results: Sequence[TargetResult]) -> dict[str, Any]:
    """The same figures for authsvc's slices (each a TargetResult of one slice)."""
    slices = [s for r in results for s in r.slices]
    calls = sum(s.calls for s in slices)
    seconds = sum(s.seconds for s in slices)
    cpu = sum(s.server_cpu for s in slices)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    return {
        "rps": round(calls / seconds, 1) if seconds else 0.0,
        "slice_rps": [round(s.rps) for s in slices],
        "requests": calls,
        "failed": sum(errors.values()),
        "errors": errors,
        "seconds": round(seconds, 3),
        "server_cpu_us_per_call": round(1e6 * cpu / calls, 1) if calls else 0.0,
        "server_cpu_pct": round(100 * cpu / seconds, 1) if seconds else 0.0,
    }


class PeerServer:
    """node-oidc-provider installed in a temporary copy of its folder, started on loopback."""

    def __init__(self, source: Path, folder: Path) -> None:
        self.folder = folder / "oidc-provider"
        shutil.copytree(source, self.folder, ignore=shutil.ignore_patterns("node_modules"))
        began = time.monotonic()
        install = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if install.returncode != 0:
            raise RuntimeError(f"npm ci failed ({install.returncode}): {install.stderr[-2000:]}")
        self.install_seconds = time.monotonic() - began
        port_file = self.folder / "port"
        self._log = (self.folder / "server.log").open("w")
        self.proc = subprocess.Popen(
            ["node", "server.mjs"],
            cwd=self.folder,
            env={**os.environ, "PORT": "0", "PORT_FILE": str(port_file)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("node-oidc-provider did not start: " + self.server_log()[-2000:])
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.versions = self._versions()

    def _versions(self) -> dict[str, str]:
        out = {"node": subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()}  # fmt: skip
        for package in ("oidc-provider", "jose", "autocannon"):
            manifest = self.folder / "node_modules" / package / "package.json"
            out[package] = str(json.loads(manifest.read_text())["version"])
        return out

    @property
    def pid(self) -> int:
        return self.proc.pid

    def server_log(self) -> str:
        self._log.flush()
        return (self.folder / "server.log").read_text(errors="replace")

    def run_client(
        self, only: str, *, duration: float, warmup: float = 0.0
    ) -> tuple[dict[str, Any], float]:
        """One run of bench-client.mjs: its RESULT_JSON, and the CPU the server's process tree
        spent while it ran."""
        out = self.folder / "result.json"
        out.unlink(missing_ok=True)
        env = {
            **os.environ,
            "BASE": self.base,
            "SERVER_PID": str(self.pid),
            "CLK_TCK": str(os.sysconf("SC_CLK_TCK")),
            "ONLY": only,
            "DURATION": f"{duration:g}",
            "WARMUP": f"{warmup:g}",
            "RESULT_JSON": str(out),
        }
        before = process_cpu_seconds(self.pid)
        proc = subprocess.run(
            ["node", "bench-client.mjs"],
            cwd=self.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120 + 2 * (duration + warmup),
        )
        spent = process_cpu_seconds(self.pid) - before
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"the peer's bench-client failed ({proc.returncode}): {proc.stderr[-2000:]}"
            )
        if "server_error" in self.server_log():
            raise RuntimeError("node-oidc-provider reported a server_error: see its log")
        return json.loads(out.read_text()), spent

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _peer_slice(server: PeerServer, only: str, seconds: float) -> PeerSlice:
    data, spent = server.run_client(only, duration=seconds)
    r = data["results"][only]
    return PeerSlice(
        requests=int(r["ok"]),
        seconds=float(r["seconds"]),
        tree_cpu=spent,
        window_cpu_pct=r.get("serverCpuPct"),
        failed=int(r.get("non2xx", 0)) + int(r.get("errors", 0)) + int(r.get("timeouts", 0)),
    )


def run_peer(
    *,
    folder: Path,
    authsvc_issue: Sequence[Target],
    authsvc_remote: Sequence[Target],
    local_timer: Callable[[], dict[str, float]],
    rounds: int = 4,
    slice_seconds: float = 2.0,
    concurrency: int = 16,
    connections: int = 8,
    source: Path | None = None,
) -> dict[str, Any]:
    """Measure the peer and authsvc side by side; {"skipped": reason} when the peer cannot run.

    `authsvc_issue` are IssueToken targets compared with the peer's issue, `authsvc_remote`
    remote checks compared with its introspection (several servers or RPCs each).

    `local_timer()` times authsvc's in-process TokenVerifier (cold and cached, µs per call);
    it runs between the peer's jose verify slices.
    """
    source = source or find_peer_source()
    reason = skip_reason(source)
    if reason is not None:
        return {"skipped": reason}
    assert source is not None
    peer_folder = Path(tempfile.mkdtemp(prefix="peer-", dir=folder))
    server = PeerServer(source, peer_folder)
    began = time.monotonic()
    try:
        # Warm the peer (JIT, key import, connections) the way its own script does, unmeasured;
        # its functional checks run here first and fail the section if they fail.
        server.run_client("issue,introspect,verify", duration=1, warmup=1)
        checks = median(server.run_client("none", duration=0)[1] for _ in range(3))

        def authsvc_slice(target: Target, label: str) -> TargetResult:
            return run_load(
                [target],
                folder=folder,
                label=label,
                concurrency=concurrency,
                connections=connections,
                warmup=0.5,
                slice_seconds=slice_seconds,
                slices=1,
            )[target.name]

        peer: dict[str, list[PeerSlice]] = {"issue": [], "introspect": []}
        ours: dict[str, list[TargetResult]] = {
            t.name: [] for t in (*authsvc_issue, *authsvc_remote)
        }
        groups: list[tuple[str, list[Target]]] = [
            ("issue", list(authsvc_issue)),
            ("introspect", list(authsvc_remote)),
        ]
        for i in range(rounds):
            for only, targets in groups:
                sides: list[Target | None] = [None, *targets]
                for side in sides if i % 2 == 0 else sides[::-1]:
                    if side is None:
                        peer[only].append(_peer_slice(server, only, slice_seconds))
                    else:
                        ours[side.name].append(authsvc_slice(side, f"peer-{side.name}-{i}"))
        verify: list[dict[str, Any]] = []
        local: list[dict[str, float]] = []
        for _ in range(max(2, rounds // 2)):
            data, _spent = server.run_client("verify", duration=slice_seconds)
            verify.append(data["results"]["verify"])
            local.append(local_timer())
    finally:
        server.stop()
    out: dict[str, Any] = {
        "versions": server.versions,
        "npm_ci_seconds": round(server.install_seconds, 1),
        "rounds": rounds,
        "slice_seconds": slice_seconds,
        "checks_cpu_ms": round(1e3 * checks, 1),
        "peer": {only: peer_summary(s, checks) for only, s in peer.items()},
        "authsvc": {name: authsvc_summary(r) for name, r in ours.items()},
        "local": _local_summary(verify, local),
    }
    out["issue_floor"] = _issue_floor(out)
    out["ratios"] = _ratios(out, [t.name for t in authsvc_issue], [t.name for t in authsvc_remote])
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def _local_summary(verify: list[dict[str, Any]], local: list[dict[str, float]]) -> dict[str, Any]:
    """jose's jwtVerify, one in flight in a sequential loop (its CPU and its wall time per
    token), against TokenVerifier in this process (µs per call in a timeit loop)."""
    ok = sum(int(v["ok"]) for v in verify)
    seconds = sum(float(v["seconds"]) for v in verify)
    cpu = sum(float(v["clientCpuPct"]) / 100 * float(v["seconds"]) for v in verify)
    names = sorted({k for x in local for k in x})
    return {
        "jose_cpu_us_per_verify": round(1e6 * cpu / ok, 1) if ok else 0.0,
        "jose_wall_us_per_verify": round(1e6 * seconds / ok, 1) if ok else 0.0,
        "jose_verifies": ok,
        **{f"{k}_us": round(median(x[k] for x in local), 2) for k in names},
    }


def _issue_floor(out: dict[str, Any]) -> dict[str, Any] | None:
    """IssueToken's floor in this run: one RSA signature (this process's thread CPU) plus one
    unary call on the same server (ValidateToken's server CPU: a cached verify on top of the
    bare RPC), against the peer's whole issue; and with the bare grpc.aio server's unary call
    in place of ValidateToken's. The two add figures measured apart; the bare IssueToken
    (bench.bare: the thread hop and the signature on the loop, nothing else) measures the same
    floor as one call, where the signature's GIL handoffs are counted too."""
    sign = out["local"].get("raw_rsa_sign_us")
    unary = out["authsvc"].get("validate_unary", {}).get("server_cpu_us_per_call")
    peer = out["peer"].get("issue", {}).get("server_cpu_us_per_call")
    if not sign or not unary or not peer:
        return None
    floor = float(sign) + float(unary)
    found: dict[str, Any] = {
        "sign_us": round(float(sign), 1),
        "unary_us": round(float(unary), 1),
        "floor_us": round(floor, 1),
        "floor_over_peer_issue": round(floor / float(peer), 3),
    }
    # The same with the bare grpc.aio server's unary call (bench.bare): no authsvc code at all.
    bare = out["authsvc"].get("bare_unary", {}).get("server_cpu_us_per_call")
    if bare:
        found["bare_unary_us"] = round(float(bare), 1)
        found["bare_floor_us"] = round(float(sign) + float(bare), 1)
        found["bare_floor_over_peer_issue"] = round((float(sign) + float(bare)) / float(peer), 3)
    measured = out["authsvc"].get("bare_issue", {}).get("server_cpu_us_per_call")
    if measured:
        found["measured_floor_us"] = round(float(measured), 1)
        found["measured_floor_over_peer_issue"] = round(float(measured) / float(peer), 3)
        # Against authsvc on one process, as the bare server is, where that was measured.
        for name in ("issue_1p", "issue"):
            issue = out["authsvc"].get(name, {}).get("server_cpu_us_per_call")
            if issue:
                found["issue_over_measured_floor"] = round(float(issue) / float(measured), 3)
                found["issue_against_measured_floor"] = name
                break
    return found


def _ratios(out: dict[str, Any], issue: list[str], remote: list[str]) -> dict[str, float]:
    def cpu(side: dict[str, Any], name: str) -> float:
        return float(side[name]["server_cpu_us_per_call"])

    peer, ours, local = out["peer"], out["authsvc"], out["local"]
    ratios = {}
    for name in issue:
        if cpu(peer, "issue"):
            ratios[f"{name}_over_peer_issue"] = round(cpu(ours, name) / cpu(peer, "issue"), 3)
    for name in remote:
        if cpu(peer, "introspect"):
            ratios[f"{name}_over_peer_introspect"] = round(
                cpu(ours, name) / cpu(peer, "introspect"), 3
            )
    jose = local["jose_cpu_us_per_verify"]
    for key in ("verifier_cold_us", "verifier_cached_us"):
        if jose and key in local:
            ratios[f"{key.removesuffix('_us')}_over_jose"] = round(local[key] / jose, 3)
    return ratios
