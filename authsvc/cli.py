"""The `authsvc` command: serve, db, services, trust, keys, token.

Configuration comes from `authsvc.config` (the only reader of the environment) and flags; the
client commands (`token …`) talk to the server through `authsvc_client`, like any service.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from authsvc.clock import to_timestamp
from authsvc.config import (
    ClientSettings,
    Settings,
    load_client_settings,
    load_settings,
    log_level_set,
    warn_risky_settings,
    warn_unknown_variables,
)
from authsvc.errors import AlreadyExists, AuthsvcError, NotFound
from authsvc.logs import configure_logging
from authsvc_client.errors import AuthsvcClientError

if TYPE_CHECKING:
    from authsvc.storage.records import (
        AudienceGrant,
        ServiceCredentials,
        ServiceRecord,
        TrustRecord,
    )

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
# Interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it. Not `serve`: a signal is how it
# is stopped, and it shuts down cleanly and exits 0.
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command that cannot run as given (a missing flag, an unreadable file, an empty
    token): one `authsvc: …` line and EXIT_USAGE, like every other refusal, so that a script
    tells it from a negative answer (EXIT_INVALID). Its text never holds a secret's value."""


def _common(parser: argparse.ArgumentParser) -> None:
    """Every command reads the same configuration as `serve`: environment, then these flags."""
    parser.add_argument(
        "--dev", action="store_true", default=None, help="dev mode (loopback, local SQLite)"
    )
    parser.add_argument("--dev-dir", help="dev mode folder (default .authsvc-dev)")
    parser.add_argument("--database-url", help="overrides AUTHSVC_DATABASE_URL")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show log lines (migrations, audit) on stderr; `serve` logs at DEBUG",
    )


def _client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", help="authsvc address (default AUTHSVC_TARGET, else AUTHSVC_LISTEN)"
    )


def _grant_flag(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    parser.add_argument(flag, action="append", default=[], metavar="AUDIENCE=SCOPE", help=text)


def _credential_flags(parser: argparse.ArgumentParser) -> None:
    """The workload credentials `create` registers and `update` adds (each flag repeatable)."""
    parser.add_argument(
        "--jwk-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a public key for signed assertions: one JWK (JSON) or a PEM public key",
    )
    parser.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="SAN",
        help="the exact URI (SPIFFE ID) or DNS SAN of its client certificates",
    )
    parser.add_argument(
        "--federated-subject",
        action="append",
        default=[],
        metavar="TRUST=SUBJECT",
        help="the exact subject of a trusted issuer's tokens (see `authsvc trust`)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authsvc", description="service-to-service authentication")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    _common(serve)
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051; port 0 picks one)")
    serve.add_argument("--http-listen", help="HOST:PORT for metrics, JWKS and health")
    serve.add_argument(
        "--tls-terminated-upstream",
        action="store_true",
        default=None,
        help="allow plaintext on a non-loopback address because TLS ends in front of authsvc",
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (default AUTHSVC_WORKERS or 1)",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True
    )
    _common(db.add_parser("upgrade", help="migrate the schema to the latest version"))
    backup = db.add_parser(
        "backup", help="SQLite: a consistent copy of the database, safe beside a running server"
    )
    _common(backup)
    backup.add_argument("path", help="the new backup file (must not exist)")

    kek = sub.add_parser("kek", help="the key-encryption key").add_subparsers(
        dest="kek_command", required=True
    )
    _common(
        kek.add_parser(
            "rotate",
            help="re-wrap every stored key under AUTHSVC_NEW_KEK (or AUTHSVC_NEW_KEK_FILE)",
        )
    )

    services = sub.add_parser("services", help="register and manage services").add_subparsers(
        dest="services_command", required=True
    )
    create = services.add_parser("create", help="register a service; prints its secret once")
    _common(create)
    create.add_argument("name")
    create.add_argument(
        "--audience", action="append", default=[], help="may ask tokens for A (every --scope)"
    )
    create.add_argument(
        "--scope", action="append", default=[], help="scope S for every --audience named"
    )
    _grant_flag(create, "--grant", "SCOPE for AUDIENCE only (AUDIENCE= : the audience, no scope)")
    create.add_argument(
        "--admin", action="store_true", help="grant authsvc.admin for audience authsvc"
    )
    _credential_flags(create)
    create.add_argument(
        "--no-secret",
        action="store_true",
        help="a secretless service (it logs in only with --jwk-file, --tls-san or "
        "--federated-subject credentials)",
    )
    create.add_argument(
        "--json",
        action="store_true",
        help="print {service_id, service_secret} (service_secret null with --no-secret)",
    )
    create.add_argument("--format", choices=["text", "json", "env"], default=None)
    lst = services.add_parser("list", help="list services")
    _common(lst)
    lst.add_argument("--json", action="store_true")
    disable = services.add_parser("disable", help="disable a service and its tokens")
    _common(disable)
    disable.add_argument("name")
    enable = services.add_parser(
        "enable", help="undo a disable (tokens the disable revoked stay revoked)"
    )
    _common(enable)
    enable.add_argument("name")
    update = services.add_parser(
        "update",
        help="change a live service's grants or credentials (removals first, then additions)",
    )
    _common(update)
    update.add_argument("name")
    update.add_argument(
        "--add-audience",
        action="append",
        default=[],
        metavar="A",
        help="grant audience A every scope the service has",
    )
    update.add_argument("--remove-audience", action="append", default=[], metavar="A")
    update.add_argument(
        "--add-scope",
        action="append",
        default=[],
        metavar="S",
        help="grant S for each of the service's audiences",
    )
    update.add_argument(
        "--remove-scope",
        action="append",
        default=[],
        metavar="S",
        help="take S from each of its audiences",
    )
    _grant_flag(update, "--grant", "SCOPE for AUDIENCE only (AUDIENCE= : the audience, no scope)")
    _grant_flag(update, "--revoke-grant", "take SCOPE from AUDIENCE only (the audience stays)")
    _credential_flags(update)
    update.add_argument(
        "--remove-key",
        action="append",
        default=[],
        metavar="KID",
        help=(
            "remove the public key with this key id (as `services list --json` shows it); write"
            " --remove-key=KID, since a base64url key id may begin with '-'"
        ),
    )
    update.add_argument("--remove-tls-san", action="append", default=[], metavar="SAN")
    update.add_argument(
        "--remove-federated-subject", action="append", default=[], metavar="TRUST=SUBJECT"
    )
    update.add_argument("--json", action="store_true", help="print the service as `list --json`")
    rotate_secret = services.add_parser(
        "rotate-secret", help="give a service a new secret; prints it once"
    )
    _common(rotate_secret)
    rotate_secret.add_argument("name")
    rotate_secret.add_argument(
        "--grace",
        type=int,
        default=0,
        metavar="SECONDS",
        help="how long the previous secret keeps working (default 0: it ends now)",
    )
    rotate_secret.add_argument(
        "--json",
        action="store_true",
        help="print {service_id, service_secret, previous_secret_expires_at}",
    )
    rotate_secret.add_argument("--format", choices=["text", "json", "env"], default=None)

    trust = sub.add_parser(
        "trust", help="external issuers trusted for federated workload tokens"
    ).add_subparsers(dest="trust_command", required=True)
    tadd = trust.add_parser("add", help="trust an issuer's tokens for exactly one audience")
    _common(tadd)
    tadd.add_argument("name", help="the trust's name (--federated-subject NAME=SUBJECT)")
    tadd.add_argument("--issuer", required=True, help="the exact `iss` of its tokens")
    tadd.add_argument(
        "--audience", required=True, help="the `aud` its tokens must carry (exact match)"
    )
    source = tadd.add_mutually_exclusive_group(required=True)
    source.add_argument("--jwks-file", metavar="FILE", help="its JWK Set, stored now")
    source.add_argument(
        "--jwks-url", metavar="URL", help="https URL of its JWK Set, fetched and refreshed"
    )
    tadd.add_argument(
        "--max-lifetime",
        type=int,
        default=None,
        metavar="SECONDS",
        help="the longest token lifetime accepted (default 86400)",
    )
    tlist = trust.add_parser("list", help="list trusted issuers")
    _common(tlist)
    tlist.add_argument("--json", action="store_true")
    tremove = trust.add_parser(
        "remove", help="stop trusting an issuer (unbinds every subject bound to it)"
    )
    _common(tremove)
    tremove.add_argument("name")

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    rotate = keys.add_parser(
        "rotate", help="activate the published next signing key now (and prepare a new one)"
    )
    _common(rotate)
    rotate.add_argument(
        "--revoke-previous",
        action="store_true",
        help="compromise: every other key, the next one too, stops validating at once; a "
        "fresh key signs",
    )
    klist = keys.add_parser("list", help="list signing keys (next, active, retired, revoked)")
    _common(klist)
    klist.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    alist = audit.add_parser("list", help="audit events, newest first")
    _common(alist)
    alist.add_argument("--limit", type=int, default=100, help="at most N events (default 100)")
    alist.add_argument("--json", action="store_true", help="one JSON array of events")

    token = sub.add_parser("token", help="talk to a running server").add_subparsers(
        dest="token_command", required=True
    )
    issue = token.add_parser(
        "issue",
        help="get a token, logging in as a service does: AUTHSVC_SERVICE_ID with a secret "
        "(AUTHSVC_SERVICE_SECRET/_FILE), a key (AUTHSVC_SERVICE_KEY_FILE) or a client "
        "certificate (AUTHSVC_TLS_CLIENT_CERT/_KEY); or AUTHSVC_WORKLOAD_TOKEN_FILE",
    )
    _client(issue)
    issue.add_argument("--audience", required=True)
    issue.add_argument("--scope", action="append", default=[])
    issue.add_argument("--ttl", type=int, default=0, help="seconds; 0 = server default")
    issue.add_argument("--service-id", help="default AUTHSVC_SERVICE_ID")
    issue.add_argument("--json", action="store_true", help="print the whole response")
    validate = token.add_parser("validate", help="validate a token; exit 0 if valid, 1 if not")
    _client(validate)
    validate.add_argument(
        "token",
        nargs="?",
        help="- (or nothing) reads the token from standard input; a token here is visible to "
        "other local users, so prefer stdin, --token-file or AUTHSVC_TOKEN",
    )
    validate.add_argument("--token-file", help="read the token from FILE (- for standard input)")
    validate.add_argument("--audience", required=True, help="your own service id")
    validate.add_argument("--scope", action="append", default=[], help="required scope")
    revoke = token.add_parser("revoke", help="revoke a token (by jti or service: admin)")
    _client(revoke)
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--token", help="- reads the token from standard input (a token here warns: see README)"
    )
    target.add_argument("--token-file", help="read the token to revoke from FILE (- for stdin)")
    target.add_argument("--jti")
    target.add_argument("--service")
    revoke.add_argument("--reason", default="")
    revoke.add_argument(
        "--admin-token",
        help="- reads it from standard input; a token here warns (prefer AUTHSVC_ADMIN_TOKEN)",
    )
    revoke.add_argument("--admin-token-file", help="read the admin bearer token from FILE")
    health = sub.add_parser(
        "health", help="ask a running server's gRPC health service; exit 0 if SERVING"
    )
    _client(health)
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.add_argument(
        "--tls-ca", help="CA to trust; TLS when set (default AUTHSVC_HEALTH_TLS_CA)"
    )
    health.add_argument(
        "--tls-server-name",
        help="name in the server certificate (default AUTHSVC_HEALTH_TLS_SERVER_NAME)",
    )
    health.add_argument(
        "--tls-cert", help="client certificate for mTLS (default AUTHSVC_HEALTH_TLS_CERT)"
    )
    health.add_argument("--tls-key", help="its private key (default AUTHSVC_HEALTH_TLS_KEY)")
    return p


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    return load_settings(
        None,
        {
            "dev": getattr(args, "dev", None),
            "dev_dir": getattr(args, "dev_dir", None),
            "database_url": getattr(args, "database_url", None),
            **extra,
        },
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from authsvc.server.app import run

    settings = _settings(
        args,
        listen=args.listen,
        http_listen=args.http_listen,
        tls_terminated_upstream=args.tls_terminated_upstream,
        workers=args.workers,
    )
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    configure_logging(dev=settings.dev, level="DEBUG" if args.verbose else settings.log_level)
    if args.worker_index is None:
        warn_unknown_variables()  # once: the workers inherit the same environment
        warn_risky_settings(settings)
    if not args.verbose:
        # Alembic reports its dialect and each step at INFO: noise in a server's log.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if settings.workers > 1 and args.worker_index is None:
        return _supervise(args, settings)
    if args.worker_index is not None:
        settings = settings.with_overrides(
            reuse_port=True, http_listen=settings.http_listen if args.worker_index == 0 else None
        )
    if settings.dev and not args.worker_index:
        sys.stderr.write(
            "*** authsvc DEV MODE: local SQLite and a generated key-encryption key in "
            f"{settings.dev_dir}/ ; loopback only; NOT FOR PRODUCTION ***\n"
        )
    run(settings)
    return EXIT_OK


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    from authsvc.server.workers import supervise

    flags: list[str] = []
    if settings.dev:
        flags += ["--dev", "--dev-dir", settings.dev_dir]
    if args.database_url:
        flags += ["--database-url", args.database_url]
    if settings.tls_terminated_upstream:
        flags.append("--tls-terminated-upstream")
    http = ["--http-listen", settings.http_listen] if settings.http_listen else []
    return supervise(
        listen=settings.listen,
        workers=settings.workers,
        worker_argv=flags,
        http_argv=http,
        tls=settings.tls_enabled,
    )


def _command_settings(args: argparse.Namespace) -> Settings:
    """The settings of a command other than `serve`, with its logging: changes made here are
    audited in the database; their log events (and Alembic's) go to stderr only when asked, so
    a command's output is its answer. Warnings (an unknown AUTHSVC_* variable) always do."""
    settings = _settings(args)
    asked = getattr(args, "verbose", False) or log_level_set()
    configure_logging(dev=settings.dev, level=settings.log_level if asked else "WARNING")
    warn_unknown_variables()
    return settings


def _core(args: argparse.Namespace, *, upgrade: bool = False) -> Any:
    from authsvc.server.app import build_core

    return build_core(_command_settings(args), upgrade=upgrade)


def _cmd_db(args: argparse.Namespace) -> int:
    if args.db_command == "backup":
        return _cmd_db_backup(args)
    core = _core(args, upgrade=True)
    core.dispose()
    print("database schema is current")
    return EXIT_OK


def _cmd_db_backup(args: argparse.Namespace) -> int:
    """SQLite's online backup API: a consistent snapshot while servers keep writing.

    PostgreSQL is backed up with pg_dump (README, Operations): its snapshot is already
    consistent, and this command would only be a worse pg_dump.
    """
    from authsvc.storage.backup import backup_sqlite

    settings = _command_settings(args)
    backup_sqlite(settings.database_url, Path(args.path))
    print(f"backup written to {args.path} (it holds wrapped keys: keep it like the database)")
    return EXIT_OK


def _cmd_kek(args: argparse.Namespace) -> int:
    """Re-wrap every stored key under the new KEK, in one transaction (all or nothing)."""
    from authsvc.config import load_new_kek
    from authsvc.usecases.audit import CLI_ACTOR, Origin
    from authsvc.usecases.kek import rotate_kek_audited

    new = load_new_kek()
    core = _core(args)
    try:
        result = rotate_kek_audited(
            core.repo,
            core.settings.kek_ring,
            new,
            core.clock,
            core.trail,
            Origin.local(CLI_ACTOR),
        )
    finally:
        core.dispose()
    print(
        f"every stored key is wrapped under the new KEK (kek id {result.kek_id}; "
        f"{result.rewrapped} re-wrapped now). Restart the servers with AUTHSVC_KEK set to it; "
        "AUTHSVC_KEK_PREVIOUS is no longer needed."
    )
    return EXIT_OK


def _cmd_services(args: argparse.Namespace) -> int:
    from authsvc.server.app import service_registry
    from authsvc.usecases.audit import CLI_ACTOR, Origin

    core = _core(args)
    try:
        registry = service_registry(core)
        origin = Origin.local(CLI_ACTOR)
        command = args.services_command
        if command == "create":
            if not args.audience and not args.grant and not args.admin:
                raise UsageError("at least one --audience or --grant is required (or --admin)")
            fmt = args.format or ("json" if args.json else "text")
            _, secret = registry.create(
                origin,
                args.name,
                args.audience,
                args.scope,
                _grant_args(args.grant, "--grant"),
                admin=args.admin,
                secret=not args.no_secret,
                public_keys=[_read_public_key(f) for f in args.jwk_file],
                tls_sans=args.tls_san,
                federated_subjects=_subject_args(args.federated_subject, "--federated-subject"),
            )
            if fmt == "json":
                print(json.dumps({"service_id": args.name, "service_secret": secret}))
            elif fmt == "env":
                # A secretless service: its id alone (its credential is a key, a certificate
                # or a token file, configured apart).
                lines = [f"AUTHSVC_SERVICE_ID={args.name}"]
                if secret is not None:
                    lines.append(f"AUTHSVC_SERVICE_SECRET={secret}")
                print("\n".join(lines))
            elif secret is None:
                kinds = ", ".join(registry.credentials_of(args.name).kinds)
                print(f"service {args.name} created with no secret; it logs in with: {kinds}")
            else:
                print(f"service {args.name} created; its secret (shown once):\n{secret}")
        elif command == "rotate-secret":
            _rotate_secret(core, args)
        elif command == "list":
            listed = registry.list_with_credentials()
            if args.json:
                print(json.dumps([_service_json(s, c) for s, c in listed]))
            else:
                for s, c in listed:
                    print(_service_line(s, c))
        elif command == "update":
            from authsvc.usecases.services import CredentialChange, GrantChange

            change = GrantChange(
                add_audiences=tuple(args.add_audience),
                remove_audiences=tuple(args.remove_audience),
                add_scopes=tuple(args.add_scope),
                remove_scopes=tuple(args.remove_scope),
                grants=_grant_args(args.grant, "--grant"),
                revoke_grants=_grant_args(args.revoke_grant, "--revoke-grant"),
            )
            credentials = CredentialChange(
                add_public_keys=tuple(_read_public_key(f) for f in args.jwk_file),
                remove_public_key_ids=tuple(args.remove_key),
                add_tls_sans=tuple(args.tls_san),
                remove_tls_sans=tuple(args.remove_tls_san),
                add_federated_subjects=_subject_args(args.federated_subject, "--federated-subject"),
                remove_federated_subjects=_subject_args(
                    args.remove_federated_subject, "--remove-federated-subject"
                ),
            )
            record = registry.update(origin, args.name, change, credentials)
            held = registry.credentials_of(args.name)
            print(
                json.dumps(_service_json(record, held))
                if args.json
                else _service_line(record, held)
            )
        elif command == "enable":
            registry.enable(origin, args.name)
            print(f"service {args.name} enabled (tokens its disable revoked stay revoked)")
        else:
            registry.disable(origin, args.name)
            print(f"service {args.name} disabled")
    finally:
        core.dispose()
    return EXIT_OK


def _grant_args(values: Sequence[str], flag: str) -> tuple[AudienceGrant, ...]:
    """`AUDIENCE=SCOPE` flags as one AudienceGrant per audience (`A=` adds no scope)."""
    from authsvc.inputs import parse_grant
    from authsvc.storage.records import AudienceGrant
    from authsvc.usecases.services import merge_grants

    pairs = [parse_grant(v, flag) for v in values]
    return merge_grants(AudienceGrant(a, (s,) if s else ()) for a, s in pairs)


def _read_public_key(path: str) -> str:
    """A `--jwk-file`: one JWK (JSON object) or a PEM public key, checked here so a refusal
    names the file. A private key is refused (it stays with the workload); no message ever
    shows the file's content."""
    from authsvc.errors import InvalidArgument
    from authsvc.workload import parse_public_key
    from authsvc.workload.public_keys import MAX_JWK_BYTES

    where = f"--jwk-file {_shown(path)}"
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_JWK_BYTES + 1)
    except OSError:
        raise InvalidArgument(f"{where}: cannot read the file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{where}: not a JWK (JSON) or PEM text file") from None
    try:
        parse_public_key(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return text


def _subject_args(values: Sequence[str], flag: str) -> tuple[tuple[str, str], ...]:
    """`TRUST=SUBJECT` flags as pairs; the trust ends at the first `=` (a trust name has none,
    a subject may)."""
    from authsvc.errors import InvalidArgument

    pairs = []
    for value in values:
        trust, sep, subject = value.partition("=")
        if not sep or not trust or not subject:
            raise InvalidArgument(f"{flag} takes TRUST=SUBJECT")
        pairs.append((trust, subject))
    return tuple(pairs)


def _service_json(s: ServiceRecord, c: ServiceCredentials) -> dict[str, Any]:
    """A service for `--json`: `grants` per audience; `audiences` and `scopes` as before; its
    credentials by kind, key id, SAN and subject (never key material)."""
    return {
        "service_id": s.service_id,
        "audiences": list(s.audiences),
        "scopes": list(s.scopes),
        "grants": {g.audience: list(g.scopes) for g in s.grants},
        "disabled": s.disabled,
        "has_secret": c.has_secret,
        "credentials": list(c.kinds),
        "public_key_ids": [kid for kid, _ in c.public_keys],
        "tls_sans": list(c.tls_sans),
        "federated_subjects": [{"trust": t, "subject": sub} for t, sub in c.federated],
    }


def _service_line(s: ServiceRecord, c: ServiceCredentials) -> str:
    """One line per service; a `credentials=` column follows when it logs in with anything
    but a secret alone, so the lines of services that only have a secret read as before."""
    from authsvc.usecases.services import grants_detail

    state = "disabled" if s.disabled else "enabled"
    line = (
        f"{_shown(s.service_id)}\t{state}"
        f"\taudiences={_shown(','.join(s.audiences))}"
        f"\tscopes={_shown(','.join(s.scopes))}"
        f"\tgrants={_shown(grants_detail(s.grants))}"
    )
    if c.kinds != ("secret",):
        line += f"\tcredentials={','.join(c.kinds) or 'none'}"
    return line


def _cmd_trust(args: argparse.Namespace) -> int:
    from authsvc.server.app import service_registry
    from authsvc.usecases.audit import CLI_ACTOR, Origin
    from authsvc.usecases.trusts import TrustRegistry

    core = _core(args)
    try:
        trusts = TrustRegistry(core.repo, core.clock, core.trail)
        origin = Origin.local(CLI_ACTOR)
        if args.trust_command == "add":
            extra = {} if args.max_lifetime is None else {"max_lifetime_seconds": args.max_lifetime}
            record = trusts.add(
                args.name,
                args.issuer,
                args.audience,
                origin=origin,
                jwks_file=args.jwks_file,
                jwks_url=args.jwks_url,
                **extra,
            )
            print(f"trust {record.name} added: {_trust_line(record)}")
        elif args.trust_command == "list":
            listed = trusts.list()
            if args.json:
                print(json.dumps([_trust_json(t) for t in listed]))
            else:
                for t in listed:
                    print(f"{_shown(t.name)}\t{_trust_line(t)}")
        else:
            unbound = trusts.remove(args.name, origin)
            print(f"trust {args.name} removed; federated subjects unbound: {unbound}")
            if unbound:
                for s, c in service_registry(core).list_with_credentials():
                    if not c.kinds and not s.disabled:
                        sys.stderr.write(
                            f"authsvc: warning: service {_shown(s.service_id)} has no "
                            "credential left (add one with `authsvc services update`, or "
                            "disable it)\n"
                        )
    finally:
        core.dispose()
    return EXIT_OK


def _trust_json(t: TrustRecord) -> dict[str, Any]:
    from authsvc.usecases.trusts import trust_key_ids

    kids = trust_key_ids(t)
    return {
        "name": t.name,
        "issuer": t.issuer,
        "audience": t.audience,
        "jwks_url": t.jwks_url,
        # The key ids of a --jwks-file trust (null for a URL: its keys are fetched).
        "key_ids": None if kids is None else list(kids),
        "max_lifetime_seconds": t.max_lifetime_seconds,
        "created_at": t.created_at.isoformat(),
    }


def _trust_line(t: TrustRecord) -> str:
    from authsvc.usecases.trusts import trust_key_ids

    kids = trust_key_ids(t)
    keys = f"jwks_url={t.jwks_url}" if kids is None else f"jwks_file_keys={','.join(kids)}"
    fields = [f"issuer={t.issuer}", f"audience={t.audience}", keys]
    return "\t".join([*(_shown(f) for f in fields), f"max_lifetime={t.max_lifetime_seconds}"])


def _shown(text: str) -> str:
    """Text for a terminal: anything but printable ASCII becomes a Python escape.

    Databases written before the service id grammar may hold ids with control characters (an
    ESC sequence would drive the terminal) or look-alike letters; both show up escaped.
    """
    return "".join(
        c if 0x20 <= ord(c) < 0x7F and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _rotate_secret(core: Any, args: argparse.Namespace) -> None:
    from authsvc.inputs import check_service_id
    from authsvc.server.app import rotate_secret

    check_service_id(args.name)
    rotated = rotate_secret(core, args.name, args.grace)
    secret = rotated.secret
    until = rotated.previous_until.isoformat() if rotated.previous_until is not None else None
    fmt = args.format or ("json" if args.json else "text")
    if fmt == "json":
        print(
            json.dumps(
                {
                    "service_id": args.name,
                    "service_secret": secret,
                    "previous_secret_expires_at": until,
                }
            )
        )
    elif fmt == "env":
        print(f"AUTHSVC_SERVICE_ID={args.name}\nAUTHSVC_SERVICE_SECRET={secret}")
    else:
        ends = f"works until {until}" if until else "no longer works"
        print(f"service {args.name}: new secret (shown once; the previous one {ends}):\n{secret}")


def _cmd_keys(args: argparse.Namespace) -> int:
    from authsvc.usecases.audit import CLI_ACTOR, Origin

    core = _core(args)
    try:
        keys = core.signing_keys()
        if args.keys_command == "rotate":
            result = keys.rotate(Origin.local(CLI_ACTOR), revoke_previous=args.revoke_previous)
            note = "" if result.rotated_here else " (another replica rotated at the same moment)"
            print(f"active signing key: {result.key.kid}{note}")
        else:
            listed = keys.list()
            rows = [
                {
                    "key_id": k.kid,
                    "state": k.state,
                    "created_at": to_timestamp(k.created_at),
                    "activated_at": to_timestamp(k.activated_at) if k.activated_at else None,
                    "publish_until": to_timestamp(k.publish_until) if k.publish_until else None,
                }
                for k in listed
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                for k in listed:
                    # A `next` key's created_at is when it was first published.
                    print(f"{k.kid}\t{k.state}\tcreated={k.created_at.isoformat()}")
    finally:
        core.dispose()
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    core = _core(args)
    try:
        events = core.trail.recent(args.limit)
    finally:
        core.dispose()
    rows = [
        {
            "id": e.id,
            "time": e.at.isoformat(),
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "peer": e.peer,
            "request_id": e.request_id,
            "detail": e.detail,
            # An aggregated row: `count` attempts from `first_time` until `time`.
            "count": e.count,
            "first_time": None if e.first_at is None else e.first_at.isoformat(),
        }
        for e in events
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            outcome = r["outcome"]
            if r["first_time"] is not None:
                outcome += f" ({r['count']} attempts since {r['first_time']})"
            print(
                f"{r['time']}\t{r['actor']}\t{r['action']}\t{r['target']}\t{outcome}"
                f"\t{r['peer']}\t{r['request_id']}"
            )
    return EXIT_OK


def _client_settings(args: argparse.Namespace) -> ClientSettings:
    return load_client_settings(target=getattr(args, "target", None))


def _health_channel(args: argparse.Namespace, env: ClientSettings, target: str) -> grpc.Channel:
    """Plaintext, or TLS (and mTLS) when a CA is given, so the HEALTHCHECK works in every mode."""
    ca = args.tls_ca or env.health_tls_ca
    if not ca:
        return grpc.insecure_channel(target)
    cert = args.tls_cert or env.health_tls_cert
    key = args.tls_key or env.health_tls_key
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    name = args.tls_server_name or env.health_tls_server_name
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, creds, options=options)


def _token_channel(env: ClientSettings) -> grpc.Channel:
    """The client package's channel: plaintext only to this host, TLS anywhere else (with
    AUTHSVC_TLS_CA and, for mTLS, AUTHSVC_TLS_CLIENT_CERT/_KEY when set), its files read by
    the client package's rules."""
    from authsvc_client.errors import CredentialsError
    from authsvc_client.tokens import channel_for_target

    try:
        creds = env.tls_credentials()
    except CredentialsError as exc:
        raise UsageError(str(exc)) from None
    channel: grpc.Channel = channel_for_target(env.target, creds)
    return channel


def _cmd_health(args: argparse.Namespace) -> int:
    """For container HEALTHCHECKs: asks the local port, over TLS when a CA is configured."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = _client_settings(args)
    target = env.target
    host, _, port = target.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # noqa: S104 - a wildcard bind means ask loopback
        target = f"127.0.0.1:{port}"
    with _health_channel(args, env, target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return EXIT_OK if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_INVALID


def _warn_command_line(flag: str, instead: str) -> None:
    sys.stderr.write(
        f"authsvc: warning: {flag} on the command line is readable by every local user "
        f"(ps, /proc/PID/cmdline); use {instead}\n"
    )


def _read_secret_file(path: str, flag: str) -> str:
    if path == "-":
        return sys.stdin.read().strip()
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise UsageError(f"cannot read {flag} {path}") from None


def _bearer(
    literal: str | None,
    path: str | None,
    from_env: str | None,
    flag: str,
    instead: str,
    file_flag: str | None = None,
) -> str | None:
    """A token from a file, stdin (`-`), the environment or (warned against) the command line.
    `flag` names the command-line form in the warning; `file_flag` (default `flag`-file) the
    file's flag in an error."""
    if path:
        return _read_secret_file(path, file_flag or f"{flag}-file")
    if literal == "-":
        return sys.stdin.read().strip()
    if literal:
        _warn_command_line(flag, instead)
        return literal
    return from_env


def _revoke_refusal(stub: Any, token: str) -> str:
    """Why presenting this token revoked nothing: the server's validation reason for it."""
    from authsvc_client.claims import ValidationResult
    from authsvc_client.unverified import unverified_audience
    from authsvc_client.v1 import auth_pb2

    audience = unverified_audience(token)
    if audience is None:
        return "MALFORMED"
    reply = stub.ValidateToken(
        auth_pb2.ValidateTokenRequest(token=token, audience=audience), timeout=10
    )
    return ValidationResult.from_proto(reply).reason_name or "UNKNOWN"


def _token_issue(args: argparse.Namespace, env: ClientSettings) -> int:
    """`token issue`: logs in as a service would (`login_from_env`), whatever its credential:
    a secret, a signing key (AUTHSVC_SERVICE_KEY_FILE), a client certificate or a workload
    token file."""
    from authsvc_client.tokens import channel_for_target
    from authsvc_client.v1 import auth_pb2_grpc

    found = env.login(args.service_id)
    login = found.login
    # The login's own channel: TLS with AUTHSVC_TLS_CA, a certificate login's client
    # certificate; plaintext only to this host.
    with channel_for_target(found.target, found.channel_credentials) as channel:
        response = getattr(auth_pb2_grpc.AuthServiceStub(channel), login.rpc.value)(
            login.request(args.audience, args.scope, args.ttl), timeout=10
        )
    if args.json:
        print(
            json.dumps(
                {
                    "access_token": response.access_token,
                    "token_type": response.token_type,
                    "expires_in": response.expires_in,
                    "key_id": response.key_id,
                    "scopes": list(response.scopes),
                }
            )
        )
    else:
        print(response.access_token)
    if 0 < response.expires_in < args.ttl:
        sys.stderr.write(
            f"authsvc: note: the token lives {response.expires_in}s, not the {args.ttl}s "
            "asked for (the server's maximum is AUTHSVC_MAX_TTL_SECONDS, and no token "
            "outlives its signing key)\n"
        )
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    from authsvc_client.claims import ValidationResult
    from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

    env = _client_settings(args)
    if args.token_command == "issue":  # noqa: S105 - a subcommand name
        return _token_issue(args, env)
    with _token_channel(env) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        if args.token_command == "validate":  # noqa: S105 - a subcommand name
            token = _bearer(
                args.token or None,
                args.token_file,
                env.token,
                "a token",
                "standard input, --token-file or AUTHSVC_TOKEN",
                file_flag="--token-file",
            )
            if token is None:
                token = sys.stdin.read().strip()
            reply = stub.ValidateToken(
                auth_pb2.ValidateTokenRequest(
                    token=token, audience=args.audience, required_scopes=args.scope
                ),
                timeout=10,
            )
            result = ValidationResult.from_proto(reply)
            out: dict[str, Any] = {"valid": result.valid, "reason": result.reason_name}
            if result.claims is not None:
                c = result.claims
                out["claims"] = {
                    "iss": c.issuer,
                    "sub": c.subject,
                    "aud": c.audience,
                    "scope": list(c.scopes),
                    "iat": c.issued_at,
                    "nbf": c.not_before,
                    "exp": c.expires_at,
                    "jti": c.jti,
                    "kid": c.key_id,
                }
            print(json.dumps(out))
            return EXIT_OK if result.valid else EXIT_INVALID
        request = auth_pb2.RevokeTokenRequest(reason=args.reason)
        metadata: list[tuple[str, str]] = []
        if args.token or args.token_file:
            request.token = (
                _bearer(args.token, args.token_file, None, "--token", "--token - or --token-file")
                or ""
            )
            if not request.token:
                raise UsageError("the token to revoke is empty")
        else:
            admin = _bearer(
                args.admin_token,
                args.admin_token_file,
                env.admin_token,
                "--admin-token",
                "AUTHSVC_ADMIN_TOKEN, --admin-token-file FILE or --admin-token -",
            )
            if not admin:
                raise UsageError(
                    "revoking by --jti or --service needs an admin token "
                    "(AUTHSVC_ADMIN_TOKEN or --admin-token-file)"
                )
            metadata.append(("authorization", f"Bearer {admin}"))
            if args.jti:
                request.jti = args.jti
            else:
                request.service_id = args.service
        response = stub.RevokeToken(request, metadata=metadata, timeout=10)
        answer: dict[str, Any] = {"revoked": response.revoked}
        if not response.revoked:
            # Only a presented token can revoke nothing: it was not one this server would accept.
            answer["reason"] = _revoke_refusal(stub, request.token)
        print(json.dumps(answer))
        return EXIT_OK if response.revoked else EXIT_INVALID


def _refusal(args: argparse.Namespace, exc: AlreadyExists | NotFound) -> str:
    """What a name clash or a missing name means for this command (services keep their short
    messages; a credential clash and the trust commands say which credential or trust)."""
    from authsvc.usecases.services import CredentialTaken

    if isinstance(exc, CredentialTaken) or (
        args.command == "trust" and isinstance(exc, AlreadyExists)
    ):
        # Names trust, subject, SAN or key id only, never key material.
        return _shown(str(exc))
    if args.command == "trust":
        return "no such trust"
    return "that service already exists" if isinstance(exc, AlreadyExists) else "no such service"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": _cmd_serve,
        "db": _cmd_db,
        "services": _cmd_services,
        "trust": _cmd_trust,
        "keys": _cmd_keys,
        "token": _cmd_token,
        "health": _cmd_health,
        "audit": _cmd_audit,
        "kek": _cmd_kek,
    }
    try:
        code = handlers[args.command](args)
        # Inside the try: a reader that left (`| head`) shows up here, not at interpreter exit.
        sys.stdout.flush()
        return code
    except UsageError as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AlreadyExists, NotFound) as exc:
        print(f"authsvc: {_refusal(args, exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (AuthsvcError, AuthsvcClientError) as exc:
        # Both name a setting or a rule, never a secret's value.
        print(f"authsvc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        print(f"authsvc: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command == "serve":
            # Ctrl-C before its signal handlers are in place (startup): stopped as asked, 0 as
            # after them (a terminal's Ctrl-C also reaches every worker of a supervisor).
            return EXIT_OK
        print("authsvc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `authsvc ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("authsvc: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
