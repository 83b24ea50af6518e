"""The human-readable report and the issue 5 target checks, from one run's results."""

from __future__ import annotations

from typing import Any


def _target(
    name: str, measured: float, limit: float, unit: str, *, at_least: bool, note: str = ""
) -> dict[str, Any]:
    met = measured >= limit if at_least else measured <= limit
    # How far from the limit, as a fraction of it: positive is headroom, negative a miss.
    margin = (measured - limit) / limit if at_least else (limit - measured) / limit
    return {
        "target": name,
        "limit": f"{'>=' if at_least else '<='} {limit:g} {unit}".strip(),
        "measured": round(measured, 3),
        "unit": unit,
        "met": met,
        "margin_pct": round(100 * margin, 1),
        "note": note,
    }


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets, each with the figure from this run."""
    out: list[dict[str, Any]] = []
    local = result.get("local")
    if local:
        out.append(
            _target(
                "local validation cold vs raw RSA verify",
                local["ratios"]["cold_over_raw_rsa"],
                1.5,
                "x",
                at_least=False,
            )
        )
        out.append(
            _target(
                "local validation cached",
                local["us_per_call"]["verifier_cached"],
                3.0,
                "us",
                at_least=False,
            )
        )
    ratios = result.get("ratios")
    if ratios:
        same_stack = "authsvc has no echo RPC: GetJwks (same servicer wrapper and interceptors)"
        bare = "the bare RPC of the same server: no servicer wrapper"
        for key, what, note in (
            ("validate_valid_over_get_jwks", "valid / GetJwks", same_stack),
            ("validate_mix_over_get_jwks", "10% invalid / GetJwks", same_stack),
            ("validate_valid_over_health", "valid / Health.Check", bare),
            ("validate_mix_over_health", "10% invalid / Health.Check", bare),
        ):
            out.append(
                _target(
                    f"ValidateToken rps, {what}",
                    ratios[key]["value"],
                    0.85,
                    "x",
                    at_least=True,
                    note=note,
                )
            )
        workers = result["settings"].get("authsvc_workers", 1)
        ceiling = result.get("issue_ceiling", {}).get("tokens_per_s")
        out.append(
            _target(
                "IssueToken throughput",
                result["load"]["issue"]["rps"],
                1000.0,
                "tokens/s",
                at_least=True,
                note=f"authsvc with {workers} process(es); this machine's ceiling in this run: "
                f"{ceiling:,.0f}/s"
                if ceiling
                else f"authsvc with {workers} process(es)",
            )
        )
    peer = result.get("peer")
    if peer and "ratios" in peer:
        out += _peer_targets(peer)
    rev = result.get("revocations")
    if rev:
        n = f"{rev['revocations']:,}"
        out.append(
            _target(
                f"cold validation, {n} revocations vs none",
                rev["ratios"]["cold_1m_over_empty"],
                1.10,
                "x",
                at_least=False,
                note="in-process TokenVerifier (what ValidateToken runs)",
            )
        )
        out.append(
            _target(
                f"cached validation, {n} revocations vs none",
                rev["ratios"]["cached_1m_over_empty"],
                1.10,
                "x",
                at_least=False,
                note="in-process TokenVerifier (what ValidateToken runs)",
            )
        )
        out.append(
            _target(f"memory for {n} revocations", rev["held_mb"], 200.0, "MB", at_least=False)
        )
    rpc = result.get("revocations_rpc")
    if rpc:
        n = f"{rpc['revocations']:,}"
        for key in ("p50", "p99"):
            out.append(
                _target(
                    f"ValidateToken RPC {key} latency, {n} revocations vs none",
                    rpc["ratios"][key],
                    1.10,
                    "x",
                    at_least=False,
                    note="two single-process servers from one database snapshot",
                )
            )
        out.append(
            _target(
                f"server memory for {n} revocations (RSS growth)",
                rpc["held_rss_growth_mb"],
                200.0,
                "MB",
                at_least=False,
            )
        )
    return out


# Issue 16's targets: (ratio key, what, limit) for server CPU per request against the peer.
PEER_TARGETS = (
    ("issue_over_peer_issue", "IssueToken (--workers 2) / peer's issue", 1.0),
    ("validate_stream_over_peer_introspect", "ValidateTokenStream / peer's introspection", 0.6),
    ("validate_unary_over_peer_introspect", "ValidateToken (unary) / peer's introspection", 1.5),
    ("issue_1p_over_peer_issue", "IssueToken (1 process) / peer's issue", 1.0),
    ("validate_stream_1p_over_peer_introspect", "stream (1 process) / peer's introspection", 0.6),
    ("validate_unary_1p_over_peer_introspect", "unary (1 process) / peer's introspection", 1.5),
)


def _peer_targets(peer: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _target(
            f"server CPU/request, {what}",
            peer["ratios"][key],
            limit,
            "x",
            at_least=False,
            note="side by side with node-oidc-provider, alternating slices",
        )
        for key, what, limit in PEER_TARGETS
        if key in peer["ratios"]
    ]


def _render_peer(peer: dict[str, Any]) -> list[str]:
    if "skipped" in peer:
        return ["", f"4. Side by side with node-oidc-provider: skipped ({peer['skipped']})"]
    v = peer["versions"]
    p, a, loc, r = peer["peer"], peer["authsvc"], peer["local"], peer["ratios"]

    def row(label: str, x: dict[str, Any], ratio: str) -> list[str]:
        return [
            label,
            f"{x['server_cpu_us_per_call']:,.0f}",
            f"{x['rps']:,.0f}",
            f"{x['server_cpu_pct']:.0f}%",
            str(x["failed"]),
            ratio,
        ]

    def ratio(key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else ""

    labels = {
        "issue": "IssueToken",
        "validate_unary": "ValidateToken (unary)",
        "validate_stream": "ValidateTokenStream (per message)",
        "bare_issue": "bare grpc.aio, no authsvc code: IssueToken (thread hop, RSA sign)",
        "bare_unary": "bare grpc.aio, no authsvc code: unary call, fixed answer",
        "bare_stream": "bare grpc.aio, no authsvc code: stream message, fixed answer",
    }

    def ours(kind: str, peer_path: str) -> list[list[str]]:
        return [
            row(f"authsvc{where}: {labels[kind]}", a[f"{kind}{suffix}"],
                ratio(f"{kind}{suffix}_over_peer_{peer_path}"))
            for suffix, where in (("", ""), ("_1p", ", 1 process"))
            if f"{kind}{suffix}" in a
        ]  # fmt: skip

    rows = [
        row("peer: POST /token (client credentials, RS256 JWT)", p["issue"], ""),
        *ours("issue", "issue"),
        *[row(labels[k], a[k], ratio(f"{k}_over_peer_issue")) for k in ("bare_issue",) if k in a],
        row("peer: POST /token/introspection (opaque, in memory)", p["introspect"], ""),
        *ours("validate_unary", "introspect"),
        *ours("validate_stream", "introspect"),
        *[
            row(labels[kind], a[kind], ratio(f"{kind}_over_peer_introspect"))
            for kind in ("bare_unary", "bare_stream")
            if kind in a
        ],
    ]
    local = [
        ["peer: jose jwtVerify (CPU per token, 1 in flight)",
         f"{loc['jose_cpu_us_per_verify']:.1f}", ""],
        ["peer: the same, wall time per token", f"{loc['jose_wall_us_per_verify']:.1f}", ""],
        ["authsvc: raw RSA verify (thread CPU)", f"{loc.get('raw_rsa_verify_us', 0):.2f}", ""],
        ["authsvc: TokenVerifier cold", f"{loc.get('verifier_cold_us', 0):.2f}",
         ratio("verifier_cold_over_jose")],
        ["authsvc: TokenVerifier cached", f"{loc.get('verifier_cached_us', 0):.2f}",
         ratio("verifier_cached_over_jose")],
    ]  # fmt: skip
    out = [
        "",
        f"4. Side by side with node-oidc-provider {v['oidc-provider']} (node {v['node']}, "
        f"jose {v['jose']}, autocannon {v['autocannon']}, 16 connections) vs authsvc "
        f"(bench.loadgen): {peer['rounds']} rounds of alternating {peer['slice_seconds']:g} s "
        f"slices; server CPU = utime+stime of the server's whole process tree",
        _table(["path", "srv us/req", "req/s", "server CPU", "failed", "vs peer"], rows),
        f"peer functional checks per client run: {peer['checks_cpu_ms']:.1f} ms of server CPU, "
        f"taken off each slice; the peer client's own reading (main process, measured window): "
        f"issue {p['issue']['window_main_process_cpu_us_per_call']} us, introspect "
        f"{p['introspect']['window_main_process_cpu_us_per_call']} us per request",
        _table(["local check (CPU per token, both sides)", "us/token", "vs jose"], local),
    ]
    floor = peer.get("issue_floor")
    if floor:
        out.append(
            f"IssueToken's floor in this run: {floor['sign_us']:.0f} us RSA sign + "
            f"{floor['unary_us']:.0f} us server CPU of a unary ValidateToken = "
            f"{floor['floor_us']:.0f} us, {floor['floor_over_peer_issue']:.2f}x the peer's issue"
        )
        if "bare_floor_us" in floor:
            out.append(
                f"with the bare grpc.aio unary call ({floor['bare_unary_us']:.0f} us, event loop "
                f"{peer.get('bare_event_loop', '?')}) instead: {floor['bare_floor_us']:.0f} us, "
                f"{floor['bare_floor_over_peer_issue']:.2f}x the peer's issue"
            )
        if "measured_floor_us" in floor:
            line = (
                f"measured as one call (bare grpc.aio IssueToken: a thread hop as the login "
                f"batch's, then the signature on the loop): {floor['measured_floor_us']:.0f} us, "
                f"{floor['measured_floor_over_peer_issue']:.2f}x the peer's issue"
            )
            if "issue_over_measured_floor" in floor:
                where = (
                    " on one process" if floor["issue_against_measured_floor"] == "issue_1p" else ""
                )
                line += (
                    f"; authsvc's IssueToken{where} is {floor['issue_over_measured_floor']:.2f}x it"
                )
            out.append(line)
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    parts = [
        "authsvc benchmark",
        f"machine: {m['nproc']} cpus, {m['cpu_model']}, {m['mem_gb']} GB, Linux {m['kernel']}; "
        f"Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"PyJWT {m['PyJWT']}, cryptography {m['cryptography']}",
        f"code: {m.get('git', 'unknown')}; load average at start {m['loadavg_at_start']}, "
        f"at end {m.get('loadavg_at_end')}",
        f"load: concurrency {s['concurrency']} over {s.get('connections', 1)} connections, "
        f"warm-up {s['warmup_s']:g} s per target, "
        f"{s['slices']} alternating slices of {s['slice_s']:g} s per target "
        f"({2 * s['slices']} for the echo pair); "
        f"authsvc processes: {s.get('authsvc_workers', 1)}",
    ]
    local = result.get("local")
    if local:
        us = local["us_per_call"]
        names = {
            "raw_rsa_verify": "raw cryptography RSA PKCS1v15 SHA-256 verify",
            "verifier_cold": "TokenVerifier.verify, cold (cache_size=0)",
            "verifier_cached": "TokenVerifier.verify, cached",
            "local_validator_cached": "LocalValidator.validate, cached",
            "pyjwt_decode": "PyJWT jwt.decode (key object)",
            "pyjwt_decode_pem": "PyJWT jwt.decode (PEM string key)",
            "raw_rsa_sign": "raw RSA PKCS1v15 SHA-256 sign (IssueToken's floor)",
            "handler_plain": "sync server per-call path, no interceptor",
            "handler_intercepted": "same, through AuthServerInterceptor (local)",
        }
        rows = [
            [
                names[k],
                f"{us[k]:.2f}",
                f"{local['min_us_per_call'][k]:.2f}",
                f"{local['vs_raw_rsa'][k]:.2f}x" if k in local["vs_raw_rsa"] else "",
            ]
            for k in names
            if k in us
        ]
        r = local["ratios"]
        parts += [
            "",
            f"1. In-process validation of one RS256 token (median of {local['rounds']} "
            "interleaved rounds; ratios are medians of same-round ratios)",
            _table(["path", "us/call", "min", "vs raw RSA"], rows),
            f"cold/raw RSA {r['cold_over_raw_rsa']:.2f}x, cold/PyJWT {r['cold_over_pyjwt']:.2f}x,"
            f" PyJWT/cached {r['pyjwt_over_cached']:.0f}x",
        ]
        if "interceptor_us_per_call" in local:
            parts.append(
                f"interceptor work per call (intercepted - plain path): "
                f"{local['interceptor_us_per_call']:.1f} us"
            )
    rev = result.get("revocations")
    if rev:
        us = rev["us_per_call"]
        parts += [
            "",
            f"1b. {rev['revocations']:,} revocations held: {rev['held_mb']} MB RSS "
            f"(filled in {rev['fill_seconds']} s)",
            _table(
                ["TokenVerifier.verify", "none us", f"{rev['revocations']:,} us", "ratio"],
                [
                    [
                        "cold",
                        f"{us['cold_empty']:.2f}",
                        f"{us['cold_1m']:.2f}",
                        f"{rev['ratios']['cold_1m_over_empty']:.3f}",
                    ],
                    [
                        "cached",
                        f"{us['cached_empty']:.2f}",
                        f"{us['cached_1m']:.2f}",
                        f"{rev['ratios']['cached_1m_over_empty']:.3f}",
                    ],
                ],
            ),
        ]
    rpc = result.get("revocations_rpc")
    if rpc:
        n = f"{rpc['revocations']:,}"
        rows = [
            [
                label,
                f"{x['rps']:,.0f}",
                f"{x['p50_ms']:.2f}",
                f"{x['p99_ms']:.2f}",
                f"{x['server_cpu_us_per_call']:.0f}",
                f"{rpc[f'{name}_start_seconds']:.1f}",
                f"{rpc[f'{name}_rss_mb']:.0f}",
            ]
            for name, label in (("empty", "no revocations"), ("held", f"{n} revocations"))
            for x in (rpc["load"][name],)
        ]
        r = rpc["ratios"]
        parts += [
            "",
            f"1c. ValidateToken RPC on single-process servers holding none and {n} revocations "
            f"(seeded in {rpc['seed_seconds']} s)",
            _table(
                ["server", "rps", "p50 ms", "p99 ms", "srv us/call", "SERVING after s", "RSS MB"],
                rows,
            ),
            f"{n} / none: rps {r['rps']['value']:.3f} (slices {r['rps']['slice_p25']:.3f}-"
            f"{r['rps']['slice_p75']:.3f}), p50 {r['p50']:.3f}, p99 {r['p99']:.3f}; "
            f"memory +{rpc['held_rss_growth_mb']:.0f} MB",
        ]
    watch = result.get("watch")
    if watch and "error" in watch:
        parts += ["", f"1d. WatchRevocations scenario did not complete: {watch['error']}"]
    elif watch:
        replay = watch["replay"]
        rows = [
            [label, str(x["calls"]), f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}",
             f"{x['max_ms']:.2f}"]
            for label, x in (
                ("no streams", watch["no_streams"]),
                (f"{watch['streams']:,} idle streams", watch["idle_streams"]),
                (f"{watch['streams']:,} streams, a revocation every {watch['revoke_every_s']:g} s",
                 watch["publishing"]),
                (f"one replay of {replay['events']:,} from cursor 0", replay["validate_during"]),
            )
            if x
        ]  # fmt: skip
        parts += [
            "",
            f"1d. WatchRevocations: sequential ValidateToken beside {watch['streams']:,} open "
            f"authenticated streams (opened in {watch['open_seconds']} s)",
            _table(["while", "calls", "p50 ms", "p99 ms", "max ms"], rows),
            f"events delivered {watch['delivered']:,} of {watch['expected']:,} "
            f"({watch['published']} revocations), failed streams {watch['failed_streams']}; "
            f"replay of {replay['events']:,} revocations from cursor 0: server CPU "
            f"{replay['server_cpu_s']:.2f} s, {replay['wall_s']:.2f} s wall",
        ]
    load = result.get("load")
    if load:
        rows = []
        for key in (
            "echo_plain",
            "echo_local",
            "health_check",
            "get_jwks",
            "validate_valid",
            "validate_mix",
            "issue",
        ):
            x = load[key]
            errors = sum(x["errors"].values())
            rows.append(
                [
                    x["label"],
                    f"{x['rps']:,.0f}",
                    f"{x['slice_rps_p25']:,.0f}-{x['slice_rps_p75']:,.0f}",
                    f"{x['p50_ms']:.2f}",
                    f"{x['p99_ms']:.2f}",
                    f"{x['server_cpu_pct']:.0f}%",
                    f"{x['server_cpu_us_per_call']:.0f}",
                    f"{x['client_cpu_pct']:.0f}%",
                    f"{x['others_cpu_pct']:.0f}%",
                    str(errors),
                ]
            )
        parts += [
            "",
            "2-3. Load over loopback (grpc.aio client in its own process)",
            _table(
                [
                    "RPC",
                    "rps",
                    "slices p25-p75",
                    "p50 ms",
                    "p99 ms",
                    "server CPU",
                    "srv us/call",
                    "client CPU",
                    "rest of machine",
                    "errors",
                ],
                rows,
            ),
        ]
        ratios = result["ratios"]
        labels = {
            "echo_local_over_plain": "echo with interceptor / without",
            "validate_valid_over_get_jwks": "ValidateToken (valid) / GetJwks",
            "validate_mix_over_get_jwks": "ValidateToken (10% invalid) / GetJwks",
            "validate_valid_over_health": "ValidateToken (valid) / Health.Check",
            "validate_mix_over_health": "ValidateToken (10% invalid) / Health.Check",
            "get_jwks_over_health": "GetJwks / Health.Check",
        }
        parts += [
            "",
            "Ratios: rps (median of slice pairs; their p25-p75; all calls pooled), server CPU/call",
            _table(
                ["ratio", "rps", "slices p25-p75", "pooled", "srv CPU/call", "extra srv us/call"],
                [
                    [
                        labels[k],
                        f"{v['value']:.3f}",
                        f"{v['slice_p25']:.3f}-{v['slice_p75']:.3f}",
                        f"{v['pooled']:.3f}",
                        f"{v['server_cpu_per_call']:.3f}",
                        f"{v['extra_server_cpu_us_per_call']:+.0f}",
                    ]
                    for k, v in ratios.items()
                ],
            ),
        ]
    peer = result.get("peer")
    if peer:
        parts += _render_peer(peer)
    ceiling = result.get("issue_ceiling")
    if ceiling:
        parts += [
            "",
            f"IssueToken ceiling of this machine in this run: {ceiling['tokens_per_s']:,.0f} "
            f"tokens/s = {ceiling['cpus']} cores / ({ceiling['sign_us']:.0f} us RSA sign + "
            f"{ceiling['no_work_rpc_server_us']:.0f} us server CPU of a no-work RPC + "
            f"{ceiling['client_us']:.0f} us load-generator CPU per call); "
            f"IssueToken reached {ceiling['fraction']:.0%} of it",
        ]
    marks = result.get("targets") or []
    if marks:
        parts += [
            "",
            "Targets (issues 5 and 16)",
            _table(
                ["target", "limit", "measured", "", "margin"],
                [
                    [
                        t["target"],
                        t["limit"],
                        f"{t['measured']:g} {t['unit']}",
                        "MET" if t["met"] else "MISSED",
                        f"{t['margin_pct']:+.1f}%",
                    ]
                    for t in marks
                ],
            ),
        ]
    parts.append(f"\ntotal {result.get('total_seconds', 0):.0f} s")
    return "\n".join(parts)
