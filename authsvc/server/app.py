"""Assemble and run one server process: storage, keys, in-memory state, gRPC, background loops."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha.reflection_pb2_grpc import add_ServerReflectionServicer_to_server
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from authsvc.clock import Clock, SystemClock, WallClock, to_datetime
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import (
    AlreadyExists,
    AuthsvcError,
    ConfigError,
    DecryptError,
    StorageUnavailable,
)
from authsvc.keys.manager import KeyManager
from authsvc.keys.rotator import Rotator
from authsvc.keys.wrapping import CANNOT_DECRYPT, check_wrapped_keys, load_secret_hash_key
from authsvc.server.http import HttpSidePort, ReadinessPolicy
from authsvc.server.metrics import QUIET_WHEN_OK, Metrics, MetricsInterceptor, StateCollector
from authsvc.server.servicer import AuthServicer
from authsvc.server.tls import read_tls_files
from authsvc.server.tracing import tracing_interceptors
from authsvc.storage import migrate
from authsvc.storage.engine import describe_db_error, make_engine, prepare_sqlite_file
from authsvc.storage.records import AudienceGrant, RevocationRecord
from authsvc.storage.repository import Repository
from authsvc.sync import RevocationFeed, ServerState
from authsvc.tokens.issuer import TokenIssuer
from authsvc.usecases.audit import CLI_ACTOR, AuditTrail, Origin
from authsvc.usecases.callers import Callers
from authsvc.usecases.federation import TrustStore
from authsvc.usecases.housekeeping import Housekeeping
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.revocation import Revocations
from authsvc.usecases.secrets import RotatedSecret, Secrets
from authsvc.usecases.services import ServiceRegistry
from authsvc.usecases.signing_keys import SigningKeys
from authsvc.usecases.tokens import Tokens
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from authsvc_client.verifier import TokenVerifier

log = logging.getLogger("authsvc.server")

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
# A gRPC health entry of its own: NOT_SERVING while the database does not answer.
DATABASE_HEALTH_SERVICE = "authsvc.database"
DEV_ADMIN_SERVICE = "authsvc-admin"
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"


@dataclass
class Core:
    """Everything a server process or a CLI command needs, built from Settings."""

    settings: Settings
    clock: Clock
    repo: Repository
    manager: KeyManager
    hasher: SecretHasher

    def signing_keys(self, published: Callable[[], str] | None = None) -> SigningKeys:
        """The signing-key use cases on the schedule of these settings; `published`: the JWK
        Set a serving replica publishes."""
        rotator = Rotator.for_settings(self.manager, self.clock, self.settings)
        return SigningKeys(self.repo, self.manager, rotator, self.clock, published=published)

    @property
    def trail(self) -> AuditTrail:
        return AuditTrail(self.repo, self.clock)

    @property
    def secrets(self) -> Secrets:
        """Secret rotation as this host does it (the CLI: an admin, no login batch)."""
        return Secrets(
            settings=self.settings,
            repo=self.repo,
            hasher=self.hasher,
            clock=self.clock,
            trail=self.trail,
        )

    def dispose(self) -> None:
        self.repo.engine.dispose()


def build_core(settings: Settings, clock: Clock | None = None, *, upgrade: bool = True) -> Core:
    """Connect storage, check (or bring) the schema to head, and unwrap the secret-hash key.

    `serve` upgrades the schema itself (documented in README), under a database lock on
    PostgreSQL so replicas starting together do not collide. Other commands refuse a stale schema.

    Raises:
        ConfigError: also when the stored keys are wrapped under a KEK not configured here.
    """
    clock = clock or SystemClock()
    try:
        engine = make_engine(settings.database_url)
        prepare_sqlite_file(settings.database_url)
    except ArgumentError:
        # SQLAlchemy's message quotes the URL, which may carry a password.
        raise ConfigError(
            "AUTHSVC_DATABASE_URL is not a database URL (sqlite:///PATH or postgresql://...)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"AUTHSVC_DATABASE_URL: {exc}") from None
    keks = settings.kek_ring
    try:
        if upgrade:
            migrate.upgrade(engine, keks)
        elif not migrate.is_current(engine):
            raise ConfigError("the database schema is not current: run `authsvc db upgrade`")
        repo = Repository(engine)
        check_wrapped_keys(repo, keks)
        hash_key = load_secret_hash_key(repo, keks, to_datetime(clock.now()))
    except (OperationalError, InterfaceError) as exc:
        engine.dispose()
        raise StorageUnavailable(f"cannot use the database: {describe_db_error(exc)}") from None
    except BaseException:
        engine.dispose()
        raise
    manager = KeyManager(
        repo,
        keks,
        clock,
        rsa_key_bits=settings.rsa_key_bits,
        max_ttl_seconds=settings.max_ttl_seconds,
        leeway_seconds=settings.leeway_seconds,
        sync_interval_seconds=settings.sync_interval_seconds,
    )
    return Core(
        settings=settings,
        clock=clock,
        repo=repo,
        manager=manager,
        hasher=SecretHasher(hash_key),
    )


def service_registry(core: Core) -> ServiceRegistry:
    """The services use cases on this host's storage (the CLI's way in; audited as `cli`)."""
    return ServiceRegistry(
        core.repo, core.hasher, core.clock, core.settings, AuditTrail(core.repo, core.clock)
    )


def create_service(
    core: Core,
    service_id: str,
    audiences: list[str],
    scopes: list[str],
    *,
    admin: bool = False,
    grants: tuple[AudienceGrant, ...] = (),
) -> str:
    """Register a service from this host; returns its secret (shown once)."""
    _, secret = service_registry(core).create(
        Origin.local(CLI_ACTOR), service_id, audiences, scopes, grants, admin=admin
    )
    return secret


def rotate_secret(core: Core, service_id: str, grace_seconds: int) -> RotatedSecret:
    """Rotate a service's secret from this host (the CLI's way): the RPC's admin path."""
    return core.secrets.rotate_by_admin(service_id, grace_seconds, Origin.local(CLI_ACTOR))


def disable(core: Core, service_id: str) -> None:
    """Disable a service from this host: its tokens are revoked (see ServiceRegistry.disable)."""
    service_registry(core).disable(Origin.local(CLI_ACTOR), service_id)


def bootstrap_dev_admin(core: Core, out: TextIO) -> None:
    """Dev mode: create an admin credential on first start and print it once."""
    try:
        secret = create_service(core, DEV_ADMIN_SERVICE, [], [], admin=True)
    except AlreadyExists:
        return
    out.write(
        "authsvc DEV MODE: bootstrap admin credential (shown once, not stored in clear):\n"
        f"  AUTHSVC_SERVICE_ID={DEV_ADMIN_SERVICE}\n"
        f"  AUTHSVC_SERVICE_SECRET={secret}\n"
    )
    out.flush()


class AuthsvcServer:
    """One server process. `start()` returns once it reports SERVING."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # The wall clock as it is, steps logged and counted (why: authsvc.clock).
        self.clock = WallClock(clock or SystemClock(), on_step=self.metrics.observe_clock_step)
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._gc_threshold = gc.get_threshold()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._core: Core | None = None
        self._stopping = asyncio.Event()
        self._feed: RevocationFeed | None = None
        self._state: ServerState | None = None
        self._logins: LoginBatcher | None = None
        self._trusts: TrustStore | None = None
        self._http: HttpSidePort | None = None
        self.http_port: int | None = None

    async def start(self, out: TextIO = sys.stdout) -> int:
        s = self.settings
        core = await asyncio.to_thread(build_core, s, self.clock)
        self._core = core
        await asyncio.to_thread(core.manager.ensure_active)
        if s.dev:
            bootstrap_dev_admin(core, out)
        state = ServerState(
            core.repo,
            core.manager,
            self.clock,
            revocations_kept_seconds=s.max_ttl_seconds + s.leeway_seconds,
            earliest=self.clock.earliest_now,
        )
        try:
            await asyncio.to_thread(state.load)
        except DecryptError:
            raise ConfigError(CANNOT_DECRYPT) from None
        self._state = state
        trusts = self._trusts = TrustStore(core.repo, self.clock, s)
        await asyncio.to_thread(trusts.reload)
        state.on_trusts_changed = trusts.reload
        feed = RevocationFeed(
            state.revocation_cursor,
            streams_per_peer=s.watch_streams_per_peer,
            streams_max=s.watch_streams_max,
        )
        loop = asyncio.get_running_loop()

        def publish(records: list[RevocationRecord]) -> None:
            loop.call_soon_threadsafe(feed.publish, records)

        state.on_revocations = publish
        self._feed = feed
        logins = self._logins = LoginBatcher(
            core.repo,
            s,
            self.clock,
            on_batch=self.metrics.observe_login_batch,
            on_outcome=self.metrics.observe_login,
        )
        verifier = TokenVerifier(
            keys=lambda: state.keyring,
            revocations=state.revocations,
            issuer=s.issuer,
            leeway_seconds=s.leeway_seconds,
            max_token_bytes=s.max_token_bytes,
            is_subject_enabled=state.is_subject_enabled,
            # `disabled` is a frozenset replaced whole on every change: its identity is the
            # version the verdict memo needs (TokenVerifier, subjects_version).
            subjects_version=lambda: state.disabled,
            clock=self.clock.now,
        )
        trail = AuditTrail(core.repo, self.clock)
        servicer = AuthServicer(
            settings=s,
            repo=core.repo,
            state=state,
            signing_keys=core.signing_keys(lambda: state.jwks_json),
            hasher=core.hasher,
            clock=self.clock,
            feed=feed,
            tokens=Tokens(
                settings=s,
                signer=lambda: state.signer,
                issuer=TokenIssuer(s.issuer, max_token_bytes=s.max_token_bytes),
                hasher=core.hasher,
                clock=self.clock,
                logins=logins,
                verifier=verifier,
                federation=trusts,
                service_of=core.repo.fetch_service,
            ),
            revocations=Revocations(
                settings=s,
                repo=core.repo,
                verifier=verifier,
                clock=self.clock,
                trail=trail,
                callers=Callers(s, verifier),
            ),
            secrets=Secrets(
                settings=s,
                repo=core.repo,
                hasher=core.hasher,
                clock=self.clock,
                trail=trail,
                logins=logins,
            ),
            callers=Callers(s, verifier),
        )
        self.metrics.registry.register(StateCollector(state, core.repo, self.clock))
        self.metrics.key_rotation_interval.set(s.key_rotation_interval_seconds)
        self.metrics.database_up.set(1)  # state.load() has just read the database
        server = grpc.aio.server(
            interceptors=[
                *tracing_interceptors(s),
                MetricsInterceptor(
                    self.metrics,
                    quiet_when_ok=frozenset() if s.access_log_all else QUIET_WHEN_OK,
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", 64 * 1024),
                # Only worker processes of one `serve --workers N` share a port; a lone server
                # must fail on a port that is already taken.
                ("grpc.so_reuseport", 1 if s.reuse_port else 0),
                # gRPC core sheds calls waiting to be picked up past 1,000 (README): leave room
                # for every allowed follower reconnecting at once after a restart.
                ("grpc.server.max_pending_requests", 1000 + s.watch_streams_max),
                ("grpc.server.max_pending_requests_hard_limit", 3 * (1000 + s.watch_streams_max)),
            ],
        )
        auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        _enable_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE],
            server,
        )
        self.port = self._add_port(server)
        await server.start()
        self._server = server
        # One maintenance round before SERVING: a key overdue for rotation is rotated and
        # what expired while the server was down is pruned before the first call.
        await self._maintenance_round()
        self._tasks = [
            asyncio.create_task(self._sync_loop(state, core.repo)),
            asyncio.create_task(self._maintenance_loop()),
        ]
        # Start-up's objects live as long as the server: full collections, which walk every
        # open stream and stall the loop, skip them and run a tenth as often (BENCHMARKS 1d).
        gc.freeze()
        gc.set_threshold(self._gc_threshold[0], self._gc_threshold[1], 100)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if s.http_listen:
            self._http = HttpSidePort(
                s.http_listen,
                state=state,
                registry=self.metrics.registry,
                clock=self.clock,
                ping=core.repo.ping,
                rotation_interval_seconds=s.key_rotation_interval_seconds,
                readiness=ReadinessPolicy.for_sync_interval(s.sync_interval_seconds),
                read_timeout_seconds=s.http_read_timeout_seconds,
                max_connections=s.http_max_connections,
            )
            self._http.start()
            self.http_port = self._http.port
            http_host = f"[{self._http.host}]" if ":" in self._http.host else self._http.host
            out.write(f"authsvc http listening on {http_host}:{self._http.port}\n")
        host = s.listen.rpartition(":")[0]
        out.write(
            f"authsvc listening on {host}:{self.port} ({'TLS' if s.tls_enabled else 'plaintext'})\n"
        )
        out.flush()
        return self.port

    def _add_port(self, server: grpc.aio.Server) -> int:
        s = self.settings
        if s.tls_cert and s.tls_key:
            key, cert, ca = read_tls_files(s.tls_key, s.tls_cert, s.tls_client_ca)
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            add = functools.partial(server.add_secure_port, s.listen, creds)
        else:
            add = functools.partial(server.add_insecure_port, s.listen)
        try:
            port = int(add())
        except RuntimeError:
            # grpcio raises "Failed to bind" here (older versions returned 0).
            port = 0
        if port == 0:
            raise ConfigError(
                f"cannot listen on {s.listen} (AUTHSVC_LISTEN): address in use or not available"
            )
        return port

    async def _sync_loop(self, state: ServerState, repo: Repository) -> None:
        """Pull changes every interval; track whether the database answers.

        A database outage leaves the server SERVING (README, Operations): validation, JWKS and
        revocation streams go on from memory, and every replica shares the database, so draining
        one helps nothing. Only the health entry DATABASE_HEALTH_SERVICE turns NOT_SERVING (and
        /readyz 503); both recover at the first successful sync, without a restart.
        """
        interval = self.settings.sync_interval_seconds
        database_ok = True
        await self._set_health(DATABASE_HEALTH_SERVICE, serving=True)
        # start() has just loaded the state: wait an interval before the first pull.
        while not await self._wait_stopping(interval):
            try:
                await asyncio.to_thread(state.refresh)
                # Each sync interval, so that an ended grace is a state before any step back.
                await asyncio.to_thread(repo.end_secret_graces, to_datetime(self.clock.now()))
            except StorageUnavailable:
                if database_ok:
                    log.warning(
                        "database unreachable: validating from memory; calls that need the "
                        "database answer UNAVAILABLE until it is back"
                    )
                    database_ok = False
                    self.metrics.database_up.set(0)
                    await self._set_health(DATABASE_HEALTH_SERVICE, serving=False)
            except AuthsvcError as exc:
                log.warning("state sync failed: %s", exc)
            except Exception:
                log.exception("state sync failed")
            else:
                if not database_ok:
                    log.info("database reachable again: state synced")
                    database_ok = True
                    self.metrics.database_up.set(1)
                    await self._set_health(DATABASE_HEALTH_SERVICE, serving=True)

    async def _wait_stopping(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True once the server is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _set_health(self, service: str, *, serving: bool) -> None:
        # After enter_graceful_shutdown() the health servicer ignores this (stays NOT_SERVING).
        if self._health is not None:
            status = health_pb2.HealthCheckResponse
            await self._health.set(service, status.SERVING if serving else status.NOT_SERVING)

    async def run_maintenance(self) -> None:
        """One round of scheduled rotation (SPIRE's rotator) and pruning of what has expired."""
        core, state = self._core, self._state
        if core is None or state is None:
            raise RuntimeError("server not started")
        keys = core.signing_keys(lambda: state.jwks_json)
        await asyncio.to_thread(
            keys.scheduled_round, state.revocation_horizon(), self.clock.earliest_now()
        )
        housekeeping = Housekeeping(
            core.repo, core.clock, self.settings, earliest_now=self.clock.earliest_now
        )
        await asyncio.to_thread(housekeeping.prune)
        await asyncio.to_thread(state.refresh)
        if self._trusts is not None:
            await asyncio.to_thread(self._trusts.refresh_due)

    async def _maintenance_loop(self) -> None:
        interval = self.settings.key_rotation_interval_seconds
        period = 60.0 if interval <= 0 else min(60.0, max(0.5, interval / 4))
        # start() ran the first round itself.
        while not await self._wait_stopping(period):
            await self._maintenance_round()

    async def _maintenance_round(self) -> None:
        try:
            await self.run_maintenance()
        except AuthsvcError as exc:
            log.warning("maintenance failed: %s", exc)
        except Exception:
            log.exception("maintenance failed")

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, stop accepting, drain in-flight calls, then close."""
        self._stopping.set()
        if self._http is not None:
            self._http.stopping = True  # /readyz fails while in-flight calls drain
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._feed is not None:
            # Open WatchRevocations streams end now; clients reconnect to another replica.
            self._feed.close()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._logins is not None:
            # After the drain: logins of calls still in flight are settled, then it stops.
            await asyncio.to_thread(self._logins.close)
        if self._http is not None:
            await asyncio.to_thread(self._http.stop)
        if self._core is not None:
            self._core.dispose()
        gc.unfreeze()
        gc.set_threshold(*self._gc_threshold)


def _describe_reflection_v1() -> None:
    """Put grpc.reflection.v1's file in the default descriptor pool, once: v1alpha's under the
    v1 package. Listed but not described, it made `buf curl --list-methods` (which resolves
    every listed service) fail after printing the methods."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file.name, file.package = name, "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages and enums only
                field.type_name = field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(file)


def _enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Serve reflection as grpc.reflection.v1 (grpcurl asks for it first) and as v1alpha.

    grpcio-reflection ships only the v1alpha servicer. The v1 protocol is the same messages
    under another package name (identical field numbers), so one servicer answers both paths.
    """
    _describe_reflection_v1()
    servicer = reflection.aio.ReflectionServicer(service_names)
    add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


def run(settings: Settings) -> None:
    """Serve on the configured event loop until SIGTERM or SIGINT.

    uvloop by default where it is installed: grpc.aio drives its calls through the loop's
    callbacks and wake-ups, and on uvloop the same server spends 7-13% less CPU per call
    (Health, ValidateToken, the stream and IssueToken, measured in one run; BENCHMARKS.md).
    """
    choice = settings.event_loop
    if choice == "uvloop" or (choice == "auto" and importlib.util.find_spec("uvloop")):
        import uvloop

        uvloop.run(serve(settings))
    else:
        asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = AuthsvcServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        log.info("event loop %s", type(loop).__module__.split(".")[0])
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()
