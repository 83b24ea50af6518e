"""Orchestrate one `make bench` run: a real authsvc, the echo servers, load, report, JSON."""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from grpc_health.v1 import health_pb2

from authsvc_client.keyring import KeyRing
from authsvc_client.tokens import TokenSource
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.validation import FOLLOWER_AUDIENCE, LocalValidator
from bench.bare import BareProcess
from bench.bare import event_loop as bare_event_loop
from bench.echo import METHOD as ECHO_METHOD
from bench.echo import SCOPE, EchoProcess
from bench.loadgen import Target, TargetResult, run_load
from bench.local import run_local, verifier_timer
from bench.peer import find_peer_source, run_peer, skip_reason
from bench.report import check_targets, render
from bench.revocations import rss_mb, run_revocations, seed_revocations, snapshot_database
from bench.stats import median, percentile, write_frames
from bench.watch import run_watch
from tests.support.server import (
    TEST_ISSUER,
    RunningServer,
    authsvc_command,
    base_env,
    run_cli,
    start_server,
)

RESULTS = Path(__file__).with_name("results.json")
CLIENT = "bench-client"
AUDIENCE = "bench-echo"
AUTH = "/authsvc.v1.AuthService/"
VALIDATE = AUTH + "ValidateToken"
VALIDATE_STREAM = AUTH + "ValidateTokenStream"
HEALTH = "/grpc.health.v1.Health/Check"
VALID_TOKENS = 50
INVALID_EVERY = 10  # one request in ten carries a token with a broken signature
SECTIONS = ("local", "revocations", "load", "watch", "peer")


def _log(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions = {
        dist: metadata.version(dist) for dist in ("grpcio", "protobuf", "PyJWT", "cryptography")
    }
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_gb": round(mem_kb / 1e6, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": _git_state(),
    }


def _git_state() -> str:
    """Which code was measured: HEAD, and whether the working tree had changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head} + {len(changed)} modified tracked files" if changed else head


def _serve_workers(requested: int | None) -> int:
    """--workers N for authsvc when the server offers it (issue 5), else one process."""
    if requested is not None:
        return requested
    help_text = subprocess.run(
        [*authsvc_command(), "serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    return 2 if "--workers" in help_text else 1


def _start_authsvc(env: dict[str, str], workers: int) -> tuple[RunningServer, int]:
    if workers > 1:
        try:
            return start_server(env, f"--workers={workers}"), workers
        except AssertionError:
            print("authsvc serve --workers failed; measuring one process", file=sys.stderr)
    return start_server(env), 1


def _tamper(token: str) -> str:
    """Same length and canonical base64url, but one signature character changed: costs the
    server a full RSA verification and ends BAD_SIGNATURE."""
    head, _, sig = token.rpartition(".")
    i = len(sig) // 2
    return f"{head}.{sig[:i]}{'A' if sig[i] != 'A' else 'B'}{sig[i + 1 :]}"


def _write_secret_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _check_validate_requests(
    stub: auth_pb2_grpc.AuthServiceStub, frames: list[bytes], expect_valid: list[bool]
) -> None:
    for frame, valid in zip(frames, expect_valid, strict=True):
        response = stub.ValidateToken(auth_pb2.ValidateTokenRequest.FromString(frame), timeout=10)
        if response.valid != valid:
            raise RuntimeError("a ValidateToken benchmark request did not validate as expected")
        if not valid and response.reason != auth_pb2.BAD_SIGNATURE:
            raise RuntimeError("a tampered token was not refused as BAD_SIGNATURE")


def _check_echo(plain: EchoProcess, local: EchoProcess, token: str) -> None:
    """The interceptor really guards the intercepted server, and both answer the bearer call."""
    md = (("authorization", f"Bearer {token}"),)
    for server in (plain, local):
        with grpc.insecure_channel(server.address) as channel:
            channel.unary_unary(ECHO_METHOD)(b"ping", metadata=md, timeout=10)
    with grpc.insecure_channel(local.address) as channel:
        try:
            channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        else:
            raise RuntimeError("the intercepted echo server accepted a call without a token")


def _revocations_rpc(
    args: argparse.Namespace,
    folder: Path,
    env: dict[str, str],
    requests: Path,
) -> dict[str, Any]:
    """ValidateToken on two single-process servers started from one snapshot of the database,
    one with `args.revocations` revocations seeded into its copy: how long each takes to serve,
    its memory, and its ValidateToken throughput and latency, measured in alternating slices."""
    source = Path(env["AUTHSVC_DATABASE_URL"].removeprefix("sqlite:///"))
    copies = {"empty": folder / "rev-empty.db", "held": folder / "rev-held.db"}
    for copy in copies.values():
        snapshot_database(source, copy)
    seed_seconds = seed_revocations(copies["held"], args.revocations)
    servers: dict[str, RunningServer] = {}
    out: dict[str, Any] = {"revocations": args.revocations, "seed_seconds": round(seed_seconds, 1)}
    try:
        for name, copy in copies.items():
            began = time.monotonic()
            servers[name] = start_server(
                {**env, "AUTHSVC_DATABASE_URL": f"sqlite:///{copy}"}, timeout=600
            )
            out[f"{name}_start_seconds"] = round(time.monotonic() - began, 1)
        time.sleep(2)  # let start-up garbage be collected before reading RSS
        for name, server in servers.items():
            out[f"{name}_rss_mb"] = round(rss_mb(server.proc.pid), 1)
        out["held_rss_growth_mb"] = round(out["held_rss_mb"] - out["empty_rss_mb"], 1)
        targets = [
            Target(f"validate_{name}_revocations", server.address, VALIDATE, str(requests),
                   server.proc.pid)
            for name, server in servers.items()
        ]  # fmt: skip
        results = run_load(
            targets,
            folder=folder,
            label="revocations",
            concurrency=args.concurrency,
            connections=args.connections,
            warmup=args.warmup,
            slice_seconds=args.slice,
            slices=args.slices,
        )
    finally:
        for server in servers.values():
            server.stop()
    empty, held = (results[f"validate_{n}_revocations"].summary() for n in ("empty", "held"))
    out["load"] = {"empty": empty, "held": held}
    out["ratios"] = {
        "rps": _ratio(results, "validate_held_revocations", "validate_empty_revocations"),
        "p50": round(held["p50_ms"] / empty["p50_ms"], 3) if empty["p50_ms"] else 0.0,
        "p99": round(held["p99_ms"] / empty["p99_ms"], 3) if empty["p99_ms"] else 0.0,
    }
    return out


def _local(
    server: RunningServer, secret: str, token: str, key: RSAPublicKey, kid: str
) -> dict[str, Any]:
    with (
        grpc.insecure_channel(server.address) as channel,
        TokenSource(
            channel, service_id=CLIENT, service_secret=secret, audience=FOLLOWER_AUDIENCE
        ) as follower,
        LocalValidator(channel, AUDIENCE, TEST_ISSUER, token_source=follower) as validator,
    ):
        if not validator.wait_ready(15):
            raise RuntimeError("LocalValidator did not become ready")
        return run_local(
            token=token,
            key=key,
            kid=kid,
            audience=AUDIENCE,
            scopes=[SCOPE],
            issuer=TEST_ISSUER,
            validator=validator,
        )


LOAD_LABELS = {
    "echo_plain": "echo, no interceptor",
    "echo_local": "echo + AuthServerInterceptor(LocalValidator)",
    "health_check": "authsvc Health/Check (bare RPC)",
    "get_jwks": "authsvc GetJwks (no-work RPC)",
    "validate_valid": "authsvc ValidateToken, valid",
    "validate_mix": "authsvc ValidateToken, 10% invalid",
    "issue": "authsvc IssueToken",
}


def _load(
    args: argparse.Namespace,
    folder: Path,
    result: dict[str, Any],
    server: RunningServer,
    echoes: list[EchoProcess],
    files: dict[str, Path],
    token_file: Path,
) -> None:
    """Sections 2 and 3: load over loopback, each scenario interleaved with the others."""
    plain, local = echoes
    pid = server.proc.pid
    groups = {
        # Compared with each other, so measured in alternating slices.
        "echo": [
            Target("echo_plain", plain.address, ECHO_METHOD, str(files["echo"]),
                   plain.pid, str(token_file)),
            Target("echo_local", local.address, ECHO_METHOD, str(files["echo"]),
                   local.pid, str(token_file)),
        ],
        "authsvc": [
            Target("health_check", server.address, HEALTH, str(files["health"]), pid),
            Target("get_jwks", server.address, AUTH + "GetJwks", str(files["jwks"]), pid),
            Target("validate_valid", server.address, VALIDATE, str(files["valid"]), pid),
            Target("validate_mix", server.address, VALIDATE, str(files["mix"]), pid),
        ],
        # Alone: it writes to the database, which would bleed into its neighbours.
        "issue": [
            Target("issue", server.address, AUTH + "IssueToken", str(files["issue"]), pid)
        ],
    }  # fmt: skip
    measured: dict[str, TargetResult] = {}
    for group, targets in groups.items():
        print(f"load: {', '.join(t.name for t in targets)}", file=sys.stderr, flush=True)
        measured.update(
            run_load(
                targets,
                folder=folder,
                label=group,
                concurrency=args.concurrency,
                connections=args.connections,
                warmup=args.warmup,
                slice_seconds=args.slice,
                # Two sync servers in two processes: the noisiest pair, and the
                # cheapest to sample twice as long.
                slices=args.slices * (2 if group == "echo" else 1),
            )
        )
    result["load"] = {
        name: {"label": label, **measured[name].summary()} for name, label in LOAD_LABELS.items()
    }
    result["ratios"] = {
        key: _ratio(measured, num, den)
        for key, num, den in (
            ("echo_local_over_plain", "echo_local", "echo_plain"),
            ("validate_valid_over_get_jwks", "validate_valid", "get_jwks"),
            ("validate_mix_over_get_jwks", "validate_mix", "get_jwks"),
            ("validate_valid_over_health", "validate_valid", "health_check"),
            ("validate_mix_over_health", "validate_mix", "health_check"),
            ("get_jwks_over_health", "get_jwks", "health_check"),
        )
    }


def _peer(
    args: argparse.Namespace,
    folder: Path,
    env: dict[str, str],
    server: RunningServer,
    files: dict[str, Path],
    token: str,
    key: RSAPublicKey,
    kid: str,
    workers: int,
) -> dict[str, Any]:
    """Section 4 on the benchmark's server and, beside it on the same database, one
    single-process server: a process near saturation spends less CPU per call than two that
    share the load (fewer wake-ups, more work per epoll round), and the peer is one process.
    A bare grpc.aio server (bench.bare) answering authsvc's own answer to the same requests
    is measured in the same slices: the floor of a remote check on this stack."""
    reason = skip_reason(find_peer_source())
    if reason is not None:
        return {"skipped": reason}
    with grpc.insecure_channel(server.address) as channel:
        answer = auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(
            auth_pb2.ValidateTokenRequest(token=token, audience=AUDIENCE), timeout=30
        )
    if not answer.valid:
        raise RuntimeError("the benchmark's token does not validate")
    # The bare IssueToken answers with an IssueTokenResponse of authsvc's own size.
    issued = auth_pb2.IssueTokenResponse(
        access_token=token, token_type="Bearer", expires_in=300, key_id=kid, scopes=[SCOPE]
    )
    bare = BareProcess(answer.SerializeToString(), issued.SerializeToString(), key.key_size)
    servers = [("", server)]
    if workers > 1:
        servers.append(("_1p", start_server(env)))
    try:
        issue: list[Target] = []
        remote: list[Target] = []
        for suffix, s in servers:
            pid = s.proc.pid
            issue.append(
                Target(f"issue{suffix}", s.address, AUTH + "IssueToken", str(files["issue"]), pid)
            )
            remote += [
                Target(f"validate_unary{suffix}", s.address, VALIDATE, str(files["valid"]), pid),
                Target(f"validate_stream{suffix}", s.address, VALIDATE_STREAM,
                       str(files["valid"]), pid, stream=True),
            ]  # fmt: skip
        issue.append(Target("bare_issue", bare.address, AUTH + "IssueToken",
                            str(files["issue"]), bare.pid))  # fmt: skip
        remote += [
            Target("bare_unary", bare.address, VALIDATE, str(files["valid"]), bare.pid),
            Target("bare_stream", bare.address, VALIDATE_STREAM, str(files["valid"]), bare.pid,
                   stream=True),
        ]  # fmt: skip
        result = run_peer(
            folder=folder,
            authsvc_issue=issue,
            authsvc_remote=remote,
            local_timer=verifier_timer(
                token=token, key=key, kid=kid, audience=AUDIENCE, scopes=[SCOPE],
                issuer=TEST_ISSUER,
            ),
            rounds=args.peer_rounds,
            slice_seconds=args.peer_slice,
            concurrency=args.concurrency,
            connections=args.connections,
        )  # fmt: skip
        if "skipped" not in result:
            result["bare_event_loop"] = bare_event_loop()
        return result
    finally:
        bare.close()
        for suffix, s in servers:
            if suffix:
                s.stop()


def _check_stream(
    stub: auth_pb2_grpc.AuthServiceStub, frames: list[bytes], expect_valid: list[bool]
) -> None:
    """ValidateTokenStream answers each request of the benchmark, in order, as unary does."""
    requests = [auth_pb2.ValidateTokenRequest.FromString(f) for f in frames]
    answers = list(stub.ValidateTokenStream(iter(requests), timeout=30))
    if [a.valid for a in answers] != expect_valid:
        raise RuntimeError("a ValidateTokenStream benchmark request did not validate as expected")


def _issue_ceiling(result: dict[str, Any]) -> dict[str, Any]:
    """What IssueToken could reach on this machine in this run if authsvc added nothing to a
    token but its signature: every core busy with one RSA sign, the server CPU a no-work RPC
    costs on the same stack (GetJwks) and the load generator's CPU per call, nothing else."""
    cpus = int(result["machine"]["nproc"])
    sign = float(result["local"]["us_per_call"]["raw_rsa_sign"])
    stack = float(result["load"]["get_jwks"]["server_cpu_us_per_call"])
    client = float(result["load"]["issue"]["client_cpu_us_per_call"])
    ceiling = cpus * 1e6 / (sign + stack + client)
    return {
        "cpus": cpus,
        "sign_us": round(sign, 1),
        "no_work_rpc_server_us": round(stack, 1),
        "client_us": round(client, 1),
        "tokens_per_s": round(ceiling, 1),
        "fraction": round(result["load"]["issue"]["rps"] / ceiling, 3),
    }


def _ratio(results: dict[str, TargetResult], num: str, den: str) -> dict[str, Any]:
    """Throughput ratio num/den of two targets measured in alternating slices: the median of
    the slice-by-slice ratios (each pair ran within about a second of each other) is the
    figure; pooled is all calls over all time. Server CPU per call is the noise-resistant view
    of the same comparison: a busy neighbour slows a process but barely changes the CPU it
    spends per call."""
    pairs = list(zip(results[num].slices, results[den].slices, strict=True))
    per_slice = sorted(a.rps / b.rps for a, b in pairs if b.rps)
    x, y = results[num].summary(), results[den].summary()
    return {
        "value": round(median(per_slice), 3),
        "slice_p25": round(percentile(per_slice, 0.25), 3),
        "slice_p75": round(percentile(per_slice, 0.75), 3),
        "pooled": round(x["rps"] / y["rps"], 3) if y["rps"] else 0.0,
        "server_cpu_per_call": round(x["server_cpu_us_per_call"] / y["server_cpu_us_per_call"], 3)
        if y["server_cpu_us_per_call"]
        else 0.0,
        "extra_server_cpu_us_per_call": round(
            x["server_cpu_us_per_call"] - y["server_cpu_us_per_call"], 1
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per target")
    p.add_argument("--slice", type=float, default=0.5, help="seconds per measured slice")
    p.add_argument("--slices", type=int, default=16, help="measured slices per target")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    p.add_argument("--connections", type=int, default=8, help="TCP connections per target")
    p.add_argument("--authsvc-workers", type=int, default=None, help="default: 2 if supported")
    p.add_argument("--revocations", type=int, default=1_000_000, help="0 skips that part")
    p.add_argument("--peer-rounds", type=int, default=4, help="side-by-side rounds")
    p.add_argument("--peer-slice", type=float, default=2.0, help="side-by-side slice seconds")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        p.error(f"unknown section(s): {', '.join(sorted(sections - set(SECTIONS)))}")
    started = time.monotonic()
    result: dict[str, Any] = {
        "machine": machine(),
        "command": "make bench  (.venv/bin/python -m bench)",
        "settings": {
            "warmup_s": args.warmup,
            "slice_s": args.slice,
            "slices": args.slices,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "sections": sorted(sections),
        },
    }

    with tempfile.TemporaryDirectory(prefix="authsvc-bench-") as tmp:
        folder = Path(tmp)
        # The configured default sync interval, not the tests' faster one.
        env = base_env(f"sqlite:///{folder / 'authsvc.db'}", AUTHSVC_SYNC_INTERVAL_SECONDS="0.5")
        run_cli(env, "db", "upgrade")
        server, workers = _start_authsvc(env, _serve_workers(args.authsvc_workers))
        result["settings"]["authsvc_workers"] = workers
        echoes: list[EchoProcess] = []
        try:
            _log(started, f"authsvc up on {server.address} ({workers} process(es))")
            secret = server.create_service(CLIENT, [AUDIENCE], [SCOPE])
            tokens = [
                server.issue(CLIENT, secret, AUDIENCE, [SCOPE]).access_token
                for _ in range(VALID_TOKENS)
            ]
            token = tokens[0]
            header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
            kid = str(header["kid"])
            jwks = server.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10).jwks_json
            key = KeyRing.from_jwks_json(jwks).get(kid)
            if key is None:
                raise RuntimeError("the token's key is not in authsvc's JWK Set")

            # 1. In-process validation cost.
            if "local" in sections:
                _log(started, "in-process validation: TokenVerifier, PyJWT, raw RSA")
                result["local"] = _local(server, secret, token, key, kid)
            if args.revocations and "revocations" in sections:
                _log(started, f"in-process validation with {args.revocations:,} revocations")
                result["revocations"] = run_revocations(
                    token=token,
                    key=key,
                    kid=kid,
                    audience=AUDIENCE,
                    scopes=[SCOPE],
                    issuer=TEST_ISSUER,
                    count=args.revocations,
                )

            # 2 and 3. Load over loopback, each scenario interleaved with the others.
            if "load" in sections:
                _log(started, "starting the echo servers (plain, and interceptor in local mode)")
            for mode in ("plain", "local") if "load" in sections else ():
                echoes.append(
                    EchoProcess(
                        mode,
                        authsvc=server.address,
                        audience=AUDIENCE,
                        issuer=TEST_ISSUER,
                        credentials=(CLIENT, secret),
                    )
                )
            if echoes:
                plain, local = echoes
                _check_echo(plain, local, token)

            token_file = _write_secret_file(folder / "token", token)
            valid_frames = [
                auth_pb2.ValidateTokenRequest(
                    token=t, audience=AUDIENCE, required_scopes=[SCOPE]
                ).SerializeToString()
                for t in tokens
            ]
            mix_frames: list[bytes] = []
            mix_valid: list[bool] = []
            for i in range(10 * INVALID_EVERY):
                invalid = i % INVALID_EVERY == INVALID_EVERY - 1
                t = tokens[i % len(tokens)]
                mix_frames.append(
                    auth_pb2.ValidateTokenRequest(
                        token=_tamper(t) if invalid else t,
                        audience=AUDIENCE,
                        required_scopes=[SCOPE],
                    ).SerializeToString()
                )
                mix_valid.append(not invalid)
            _check_validate_requests(server.stub, mix_frames, mix_valid)
            _check_validate_requests(server.stub, valid_frames, [True] * len(valid_frames))
            _check_stream(server.stub, mix_frames, mix_valid)
            files = {
                "echo": folder / "echo.req",
                "valid": folder / "validate.req",
                "mix": folder / "mix.req",
                "issue": folder / "issue.req",
                "jwks": folder / "jwks.req",
                "health": folder / "health.req",
            }
            write_frames(files["echo"], [b"ping"])
            write_frames(files["valid"], valid_frames)
            write_frames(files["mix"], mix_frames)
            write_frames(
                files["issue"],
                [
                    auth_pb2.IssueTokenRequest(
                        service_id=CLIENT,
                        service_secret=secret,
                        audience=AUDIENCE,
                        scopes=[SCOPE],
                    ).SerializeToString()
                ],
            )
            write_frames(files["jwks"], [auth_pb2.GetJwksRequest().SerializeToString()])
            write_frames(files["health"], [health_pb2.HealthCheckRequest().SerializeToString()])

            if echoes:
                _load(args, folder, result, server, echoes, files, token_file)
            if args.revocations and "revocations" in sections:
                _log(
                    started,
                    f"ValidateToken on servers holding 0 and {args.revocations:,} revocations",
                )
                result["revocations_rpc"] = _revocations_rpc(args, folder, env, files["valid"])
            if "watch" in sections:
                _log(started, "WatchRevocations: ValidateToken beside open streams, replay from 0")
                try:
                    result["watch"] = run_watch(env, folder)
                except RuntimeError as exc:
                    result["watch"] = {"error": str(exc)}
            if "peer" in sections:
                _log(started, "side by side with node-oidc-provider")
                result["peer"] = _peer(args, folder, env, server, files, token, key, kid, workers)
                if "skipped" in result["peer"]:
                    _log(started, f"side by side skipped: {result['peer']['skipped']}")
        finally:
            for echo in echoes:
                echo.close()
            server.stop()

    if "local" in result and "load" in result and "get_jwks" in result["load"]:
        result["issue_ceiling"] = _issue_ceiling(result)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.monotonic() - started, 1)
    result["targets"] = check_targets(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nwritten to {args.out}")
    return 0
