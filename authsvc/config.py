"""Settings: built once at the edge (the CLI) from the environment and flags, then frozen.

Nothing else reads the environment. Validation fails fast and names the setting, never its value.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import ipaddress
import logging
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authsvc.crypto.kek import KekRing, KeyEncryptionKey
from authsvc.errors import ConfigError
from authsvc.keys.rotator import default_publish_lead
from authsvc_client.claims import MAX_DELEGATION_DEPTH

if TYPE_CHECKING:
    import grpc

    from authsvc_client.logins import EnvLogin

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SERVER_NAME = "authsvc"
DEFAULT_DEV_DIR = ".authsvc-dev"
DEV_ISSUER = "https://authsvc.dev.invalid"

# Settings whose value must never be shown (repr, logs, errors).
_SENSITIVE = frozenset({"kek", "kek_previous"})

log = logging.getLogger(__name__)

ENV_PREFIX = "AUTHSVC_"
# The test suite's own variables (AUTHSVC_TEST_POSTGRES_URL, README "Tests"): often exported in a
# developer's shell beside a server's, never read by authsvc, never a typo of a setting.
TEST_PREFIX = "AUTHSVC_TEST_"
# The largest number any numeric setting takes (about 31 years in seconds): far above any
# sensible value, and below what the datetime and timeout arithmetic behind the settings can
# hold (a year past 9999, threading.TIMEOUT_MAX).
MAX_NUMBER = 10**9
# Plain decimal text only: int() and float() also take "+5", "1_000", non-ASCII digits, "nan"
# and "inf", none of which an operator means (surrounding whitespace is stripped).
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class Settings:
    """Every knob of the server. Environment names are AUTHSVC_<FIELD upper-cased>."""

    database_url: str
    issuer: str
    kek: KeyEncryptionKey
    # The KEK before `authsvc kek rotate`, held during a roll so its data still unwraps.
    kek_previous: KeyEncryptionKey | None = None
    listen: str = DEFAULT_LISTEN
    server_name: str = DEFAULT_SERVER_NAME
    dev: bool = False
    dev_dir: str = DEFAULT_DEV_DIR
    default_ttl_seconds: int = 900
    max_ttl_seconds: int = 3600
    leeway_seconds: int = 30
    key_rotation_interval_seconds: int = 7 * 24 * 3600
    # How long a `next` key is in the JWK Set before a scheduled rotation may activate it;
    # None: the JWKS cache lifetime plus one sync interval (authsvc.keys.rotator).
    key_publish_lead_seconds: float | None = None
    rsa_key_bits: int = 2048
    max_token_bytes: int = 8192
    sync_interval_seconds: float = 0.5
    max_secret_grace_seconds: int = 7 * 24 * 3600
    throttle_id_failures: int = 100
    throttle_peer_failures: int = 200
    throttle_window_seconds: int = 900
    # A peer that logged in as a service id this recently is not locked out by that id's
    # failure count (an attacker cannot lock a victim out from the victim's own address).
    throttle_known_peer_seconds: int = 30 * 24 * 3600
    audit_retention_days: int = 90
    # Open WatchRevocations streams (one per local validator), per peer address and in all:
    # every revocation wakes each of them.
    watch_streams_per_peer: int = 8
    watch_streams_max: int = 1000
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_terminated_upstream: bool = False
    # CA bundle for trusted issuers' JWKS URLs (default: the system roots).
    jwks_fetch_ca: str | None = None
    # Timeout and size bound of one JWKS fetch, and how often a URL's keys are refreshed.
    jwks_fetch_timeout_seconds: float = 5.0
    jwks_refresh_seconds: float = 300.0
    # The longest delegation chain ExchangeToken builds (actors in `act`), 1 to 16.
    delegation_max_depth: int = 4
    http_listen: str | None = None
    # The HTTP side port: time a connection has to send its request (and to take the answer),
    # and connections served at once (one thread each; more are answered 503).
    http_read_timeout_seconds: float = 10.0
    http_max_connections: int = 32
    shutdown_grace_seconds: float = 10.0
    # Server processes sharing the port (SO_REUSEPORT); see authsvc/server/workers.py.
    workers: int = 1
    # Set on the processes the supervisor starts: bind with SO_REUSEPORT.
    reuse_port: bool = False
    log_level: str = "INFO"
    # Successful ValidateToken and GetJwks calls log their access line at INFO too (by default
    # at DEBUG: they are the fleet's bulk of calls, counted and timed in /metrics).
    access_log_all: bool = False
    # OpenTelemetry spans for every RPC (needs the `otel` extra; authsvc/server/tracing.py).
    tracing: bool = False
    # The server's event loop: "uvloop", "asyncio", or "auto" (uvloop where it is installed,
    # as it is with authsvc on Linux); see authsvc/server/app.py:run.
    event_loop: str = "auto"

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value: Any = "***" if f.name in _SENSITIVE else getattr(self, f.name)
            parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def kek_ring(self) -> KekRing:
        if self.kek_previous is None:
            return KekRing(self.kek)
        return KekRing(self.kek, self.kek_previous)

    @property
    def publish_lead_seconds(self) -> float:
        """AUTHSVC_KEY_PUBLISH_LEAD_SECONDS, or its default for this interval and sync."""
        if self.key_publish_lead_seconds is not None:
            return self.key_publish_lead_seconds
        return default_publish_lead(self.key_rotation_interval_seconds, self.sync_interval_seconds)

    @property
    def admin_audience(self) -> str:
        return self.server_name

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


class _Environ(Mapping[str, str]):
    """The environment as the loaders below see it (a copy), recording every name they look
    up: the names the server knows are exactly the names its loaders read (known_variables),
    never a second list kept by hand."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = dict(environ)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self._env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def _view(environ: Mapping[str, str] | None) -> _Environ:
    if isinstance(environ, _Environ):
        return environ
    return _Environ(os.environ if environ is None else environ)


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int = MAX_NUMBER
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise ConfigError(f"{name} must be an integer")
    if len(text.lstrip("-").lstrip("0")) > 18:  # past every bound (and int()'s digit limit)
        bound = f"at least {minimum}" if text.startswith("-") else f"at most {maximum}"
        raise ConfigError(f"{name} must be {bound}")
    value = int(text)
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    minimum: float = 0.0,
    maximum: float = MAX_NUMBER,
) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not _DECIMAL.fullmatch(text):
        # "nan" and "inf" among them: NaN compares false with everything, so it would pass
        # any bound, and an infinite interval or timeout means never.
        raise ConfigError(f"{name} must be a finite number")
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ConfigError(f"{name} must be a finite number")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false")


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _event_loop(env: Mapping[str, str]) -> str:
    raw = (env.get("AUTHSVC_EVENT_LOOP") or "auto").lower()
    if raw not in EVENT_LOOPS:
        raise ConfigError(f"AUTHSVC_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}")
    if raw == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("AUTHSVC_EVENT_LOOP=uvloop but uvloop is not installed")
    return raw


def _log_level(env: Mapping[str, str]) -> str:
    """AUTHSVC_LOG_LEVEL, any case: a level name `logging` knows (logs.configure_logging hands
    it to Logger.setLevel, which raises on anything else)."""
    level = (env.get("AUTHSVC_LOG_LEVEL") or "INFO").strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(
            "AUTHSVC_LOG_LEVEL must be a logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return level


def _delegation_depth(env: Mapping[str, str]) -> int:
    depth = _int(env, "AUTHSVC_DELEGATION_MAX_DEPTH", 4, 1)
    if depth > MAX_DELEGATION_DEPTH:
        raise ConfigError(f"AUTHSVC_DELEGATION_MAX_DEPTH is at most {MAX_DELEGATION_DEPTH}")
    return depth


def split_host_port(address: str, name: str = "AUTHSVC_LISTEN") -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{name} must be HOST:PORT")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_kek_file(path: str, name: str = "AUTHSVC_KEK_FILE") -> str:
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError(f"{name} cannot be read") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{name} must not be readable by group or others (chmod 600)")
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        raise ConfigError(f"{name} cannot be read") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{name} must hold the base64 text of the key, not raw bytes "
            "(e.g. `openssl rand -base64 32`)"
        ) from None


def _load_kek(env: Mapping[str, str], base: str = "AUTHSVC_KEK") -> KeyEncryptionKey | None:
    """The KEK in `base` or, when that is unset, in the file `base`_FILE names (the same rules
    for AUTHSVC_KEK, AUTHSVC_KEK_PREVIOUS and AUTHSVC_NEW_KEK)."""
    text = env.get(base)
    name = base
    # Read even when `base` is set (and wins): every name the loaders may read is looked up.
    path = env.get(f"{base}_FILE")
    if not text and path:
        name = f"{base}_FILE"
        text = _read_kek_file(path, name)
    if not text:
        return None
    try:
        return KeyEncryptionKey.from_base64(text, name=name)
    except ValueError as exc:
        # The message from from_base64 names the variable and never echoes the value.
        raise ConfigError(str(exc)) from None


def load_new_kek(environ: Mapping[str, str] | None = None) -> KeyEncryptionKey:
    """The target of `authsvc kek rotate`: AUTHSVC_NEW_KEK or AUTHSVC_NEW_KEK_FILE, never a flag
    (a command line is visible to every user of the host and kept in shell history).

    Raises ConfigError naming the variable when it is missing or unusable.
    """
    kek = _load_kek(_view(environ), "AUTHSVC_NEW_KEK")
    if kek is None:
        raise ConfigError("AUTHSVC_NEW_KEK (or AUTHSVC_NEW_KEK_FILE) is required")
    return kek


def _dev_kek(dev_dir: Path) -> KeyEncryptionKey:
    """Dev mode keeps a generated KEK beside its database, readable by the owner only."""
    path = dev_dir / "kek"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(KeyEncryptionKey.generate_base64() + "\n")
    os.chmod(path, 0o600)
    return KeyEncryptionKey.from_base64(path.read_text().strip())


def _publish_lead(
    env: Mapping[str, str], rotation_interval: int, sync_interval: float, *, dev: bool = False
) -> float | None:
    """AUTHSVC_KEY_PUBLISH_LEAD_SECONDS (None: the default), checked against the interval.

    A lead longer than the interval would stretch every scheduled rotation to the lead, so
    it is refused, default included, rather than rotating less often than configured. In dev
    mode (one loopback server, no fleet of validators caching its JWK Set) it defaults to 0,
    so an on-demand rotation, which waits for the lead (authsvc.keys.rotator), runs at once.
    """
    chosen: float | None = None
    if env.get("AUTHSVC_KEY_PUBLISH_LEAD_SECONDS"):
        chosen = _float(env, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS", 0.0, 0.0)
    elif dev:
        chosen = 0.0
    lead = default_publish_lead(rotation_interval, sync_interval) if chosen is None else chosen
    if rotation_interval > 0 and lead > rotation_interval:
        default = "" if chosen is not None else f" (by default {lead:g} s: JWKS cache + sync)"
        raise ConfigError(
            f"AUTHSVC_KEY_PUBLISH_LEAD_SECONDS{default} must not exceed "
            "AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS: raise the interval or set the lead lower"
        )
    return chosen


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build Settings from the environment, then flags (`overrides`, None values ignored).

    Raises ConfigError naming the first missing or unsafe setting.
    """
    env = _view(environ)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    dev = bool(over.get("dev", False)) or _bool(env, "AUTHSVC_DEV")
    dev_dir = str(over.get("dev_dir") or env.get("AUTHSVC_DEV_DIR") or DEFAULT_DEV_DIR)
    listen = str(over.get("listen") or env.get("AUTHSVC_LISTEN") or DEFAULT_LISTEN)
    host, _port = split_host_port(listen)

    database_url = over.get("database_url") or env.get("AUTHSVC_DATABASE_URL")
    issuer = over.get("issuer") or env.get("AUTHSVC_ISSUER")
    kek = _load_kek(env)
    kek_previous = _load_kek(env, "AUTHSVC_KEK_PREVIOUS")

    if dev:
        if not is_loopback(host):
            raise ConfigError("--dev serves on a loopback address only (AUTHSVC_LISTEN)")
        folder = Path(dev_dir)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An existing folder (made by hand, or before this rule) is tightened too: it holds the
        # KEK and the database.
        os.chmod(folder, 0o700)
        database_url = database_url or f"sqlite:///{(folder / 'authsvc.db').resolve()}"
        issuer = issuer or DEV_ISSUER
        kek = kek or _dev_kek(folder)
    else:
        if kek is None:
            raise ConfigError("AUTHSVC_KEK (or AUTHSVC_KEK_FILE) is required outside --dev")
        if not issuer:
            raise ConfigError("AUTHSVC_ISSUER is required outside --dev")
        database_url = database_url or "sqlite:///authsvc.db"

    if kek_previous is not None and kek_previous.kek_id == kek.kek_id:
        kek_previous = None  # the roll is over on this host; nothing else to read

    tls_cert = over.get("tls_cert") or env.get("AUTHSVC_TLS_CERT") or None
    tls_key = over.get("tls_key") or env.get("AUTHSVC_TLS_KEY") or None
    tls_client_ca = over.get("tls_client_ca") or env.get("AUTHSVC_TLS_CLIENT_CA") or None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY go together")
    if tls_client_ca and not tls_cert:
        raise ConfigError("AUTHSVC_TLS_CLIENT_CA needs AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY")
    upstream = bool(over.get("tls_terminated_upstream", False)) or _bool(
        env, "AUTHSVC_TLS_TERMINATED_UPSTREAM"
    )
    if not tls_cert and not is_loopback(host) and not upstream:
        raise ConfigError(
            "refusing plaintext gRPC on a non-loopback address: set AUTHSVC_TLS_CERT and "
            "AUTHSVC_TLS_KEY, or AUTHSVC_TLS_TERMINATED_UPSTREAM=true if TLS ends before authsvc"
        )

    default_ttl = _int(env, "AUTHSVC_DEFAULT_TTL_SECONDS", 900, 1)
    max_ttl = _int(env, "AUTHSVC_MAX_TTL_SECONDS", 3600, 1)
    if default_ttl > max_ttl:
        raise ConfigError("AUTHSVC_DEFAULT_TTL_SECONDS must not exceed AUTHSVC_MAX_TTL_SECONDS")
    rsa_bits = _int(env, "AUTHSVC_RSA_KEY_BITS", 2048, 2048, 16384)
    rotation_interval = _int(env, "AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS", 7 * 24 * 3600, 0)
    sync_interval = _float(env, "AUTHSVC_SYNC_INTERVAL_SECONDS", 0.5, 0.05)
    publish_lead = _publish_lead(env, rotation_interval, sync_interval, dev=dev)
    http_listen = over.get("http_listen") or env.get("AUTHSVC_HTTP_LISTEN") or None
    if http_listen:
        split_host_port(http_listen, "AUTHSVC_HTTP_LISTEN")

    return Settings(
        database_url=str(database_url),
        issuer=str(issuer),
        kek=kek,
        kek_previous=kek_previous,
        listen=listen,
        server_name=env.get("AUTHSVC_SERVER_NAME") or DEFAULT_SERVER_NAME,
        dev=dev,
        dev_dir=dev_dir,
        default_ttl_seconds=default_ttl,
        max_ttl_seconds=max_ttl,
        leeway_seconds=_int(env, "AUTHSVC_LEEWAY_SECONDS", 30, 0),
        key_rotation_interval_seconds=rotation_interval,
        key_publish_lead_seconds=publish_lead,
        rsa_key_bits=rsa_bits,
        max_token_bytes=_int(env, "AUTHSVC_MAX_TOKEN_BYTES", 8192, 512),
        sync_interval_seconds=sync_interval,
        max_secret_grace_seconds=_int(env, "AUTHSVC_MAX_SECRET_GRACE_SECONDS", 7 * 24 * 3600, 0),
        throttle_id_failures=_int(env, "AUTHSVC_THROTTLE_ID_FAILURES", 100, 1),
        throttle_peer_failures=_int(env, "AUTHSVC_THROTTLE_PEER_FAILURES", 200, 1),
        throttle_window_seconds=_int(env, "AUTHSVC_THROTTLE_WINDOW_SECONDS", 900, 1),
        throttle_known_peer_seconds=_int(
            env, "AUTHSVC_THROTTLE_KNOWN_PEER_SECONDS", 30 * 24 * 3600, 0
        ),
        audit_retention_days=_int(env, "AUTHSVC_AUDIT_RETENTION_DAYS", 90, 1, 36500),
        watch_streams_per_peer=_int(env, "AUTHSVC_WATCH_STREAMS_PER_PEER", 8, 1),
        watch_streams_max=_int(env, "AUTHSVC_WATCH_STREAMS_MAX", 1000, 1),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        tls_terminated_upstream=upstream,
        jwks_fetch_ca=env.get("AUTHSVC_JWKS_FETCH_CA") or None,
        jwks_fetch_timeout_seconds=_float(env, "AUTHSVC_JWKS_FETCH_TIMEOUT_SECONDS", 5.0, 0.1),
        jwks_refresh_seconds=_float(env, "AUTHSVC_JWKS_REFRESH_SECONDS", 300.0, 1.0),
        delegation_max_depth=_delegation_depth(env),
        http_listen=http_listen,
        http_read_timeout_seconds=_float(env, "AUTHSVC_HTTP_READ_TIMEOUT_SECONDS", 10.0, 0.1),
        http_max_connections=_int(env, "AUTHSVC_HTTP_MAX_CONNECTIONS", 32, 1),
        shutdown_grace_seconds=_float(env, "AUTHSVC_SHUTDOWN_GRACE_SECONDS", 10.0, 0.0),
        workers=int(over.get("workers") or _int(env, "AUTHSVC_WORKERS", 1, 1)),
        reuse_port=bool(over.get("reuse_port", False)),
        log_level=_log_level(env),
        access_log_all=_bool(env, "AUTHSVC_ACCESS_LOG_ALL"),
        tracing=_bool(env, "AUTHSVC_TRACING"),
        event_loop=_event_loop(env),
    )


def log_level_set(environ: Mapping[str, str] | None = None) -> bool:
    """Whether AUTHSVC_LOG_LEVEL is set at all: database commands are quiet unless asked."""
    return bool((os.environ if environ is None else environ).get("AUTHSVC_LOG_LEVEL"))


@dataclass(frozen=True)
class ClientSettings:
    """What the CLI's client commands (`token …`, `health`) take from the environment.

    Service credentials follow the client package's rules exactly (`service_credentials`):
    AUTHSVC_SERVICE_ID with AUTHSVC_SERVICE_SECRET or AUTHSVC_SERVICE_SECRET_FILE, the file
    readable by its owner only. A channel to a target off this host is TLS (with AUTHSVC_TLS_CA
    when set, else the system roots; mTLS with AUTHSVC_TLS_CLIENT_CERT/_KEY), never plaintext.
    """

    target: str
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    health_tls_ca: str | None = None
    health_tls_cert: str | None = None
    health_tls_key: str | None = None
    health_tls_server_name: str | None = None
    _environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    def login(self, service_id: str | None = None) -> EnvLogin:
        """How `token issue` logs in, by the client package's rules (`login_from_env`): a
        secret, a signing key, a client certificate or a workload token file, exactly one;
        `service_id` (a flag) replaces AUTHSVC_SERVICE_ID.

        Raises:
            authsvc_client.errors.CredentialsError: none or two ways set, a variable missing,
                or a private file readable by group or others; the message names the
                variables, never a value.
        """
        from authsvc_client.logins import ENV_SERVICE_ID, login_from_env

        env = dict(self._environ)
        if service_id:
            env[ENV_SERVICE_ID] = service_id
        return login_from_env(env, self.target)

    def tls_credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials of the token commands that send a bearer token, not a
        login (`token validate`, `token revoke`): AUTHSVC_TLS_CA and the client pair, by the
        client package's rules (`tls_credentials_from_env`), the key file owner-only.

        Raises:
            authsvc_client.errors.CredentialsError: half a client pair, or a file that is
                unreadable, unsafe or not PEM; the message names the variable, never a value.
        """
        from authsvc_client.logins import tls_credentials_from_env

        return tls_credentials_from_env(self._environ)


def load_client_settings(
    environ: Mapping[str, str] | None = None, *, target: str | None = None
) -> ClientSettings:
    """ClientSettings from the environment; `target` (a flag) wins over AUTHSVC_TARGET, then
    AUTHSVC_LISTEN, then the default address."""
    env = _view(environ)

    def get(name: str) -> str | None:
        return env.get(name) or None

    return ClientSettings(
        target=target or get("AUTHSVC_TARGET") or get("AUTHSVC_LISTEN") or DEFAULT_LISTEN,
        tls_ca=get("AUTHSVC_TLS_CA"),
        tls_client_cert=get("AUTHSVC_TLS_CLIENT_CERT"),
        tls_client_key=get("AUTHSVC_TLS_CLIENT_KEY"),
        token=get("AUTHSVC_TOKEN"),
        admin_token=get("AUTHSVC_ADMIN_TOKEN"),
        health_tls_ca=get("AUTHSVC_HEALTH_TLS_CA"),
        health_tls_cert=get("AUTHSVC_HEALTH_TLS_CERT"),
        health_tls_key=get("AUTHSVC_HEALTH_TLS_KEY"),
        health_tls_server_name=get("AUTHSVC_HEALTH_TLS_SERVER_NAME"),
        _environ=dict(env._env),
    )


@functools.cache
def client_variables() -> frozenset[str]:
    """The AUTHSVC_* names the client package reads (its exported ENV_* constants): scripts
    that run the CLI often export them for a client, so they are known names here too."""
    from authsvc_client import logins

    return frozenset(getattr(logins, n) for n in logins.__all__ if n.startswith("ENV_"))


@functools.cache
def known_variables() -> frozenset[str]:
    """Every AUTHSVC_* name authsvc reads: the names its loaders look up when run on a
    recording environment (every lookup there is unconditional), and the client package's."""
    probe = _Environ(
        {"AUTHSVC_KEK": KeyEncryptionKey.generate_base64(), "AUTHSVC_ISSUER": DEV_ISSUER}
    )
    load_settings(probe)
    load_client_settings(probe)
    with contextlib.suppress(ConfigError):
        load_new_kek(probe)  # no new KEK in the probe: it still looks both names up
    return frozenset(probe.read) | client_variables()


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The AUTHSVC_* names set that authsvc never reads, each with the closest known name
    (None when nothing is close), sorted. Names only: a value is never looked at."""
    names = os.environ if environ is None else environ
    known = known_variables()
    # Compared without the prefix every name shares, which would make anything look close.
    suffixes = sorted(k.removeprefix(ENV_PREFIX) for k in known)

    def closest(name: str) -> str | None:
        match = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
        return ENV_PREFIX + match[0] if match else None

    return [
        (name, closest(name))
        for name in sorted(names)
        if name.startswith(ENV_PREFIX)
        and name not in known
        and not name.startswith(TEST_PREFIX)
    ]


def warn_unknown_variables(environ: Mapping[str, str] | None = None) -> None:
    """One WARNING line per unknown AUTHSVC_* variable (a typo like AUTHSVC_DATABSE_URL would
    otherwise fall back to a default without a word): its name, never its value."""
    for name, close in unknown_variables(environ):
        hint = f"; did you mean {close}?" if close else ""
        log.warning("unknown environment variable %s is ignored%s", name, hint)


def risky_settings(settings: Settings) -> list[str]:
    """Settings that are allowed but undo a guarantee, each as one sentence naming it.

    A publish lead set below the longest JWKS cache plus one sync interval (the default) lets
    a planned rotation activate a key that a local validator's cached JWK Set does not hold
    yet: its tokens then cost that validator a refetch on the unknown kid (rate-limited, so a
    burst of them may be refused until it succeeds), which DESIGN's "Keys and secrets" rules
    out. Dev mode (one loopback server) chooses 0 on purpose and is not warned about.
    """
    risky: list[str] = []
    lead = settings.key_publish_lead_seconds
    cache_and_sync = default_publish_lead(
        settings.key_rotation_interval_seconds, settings.sync_interval_seconds
    )
    if not settings.dev and lead is not None and lead < cache_and_sync:
        risky.append(
            f"AUTHSVC_KEY_PUBLISH_LEAD_SECONDS={lead:g} is shorter than the longest JWK Set "
            f"cache plus one sync interval ({cache_and_sync:g} s): at a planned rotation a "
            "local validator may meet the new key's kid before its cached JWK Set holds it"
        )
    return risky


def warn_risky_settings(settings: Settings) -> None:
    """One WARNING line per risky_settings entry, at server start."""
    for sentence in risky_settings(settings):
        log.warning("%s", sentence)
