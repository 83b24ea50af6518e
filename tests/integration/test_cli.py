"""The `authsvc` command as ops run it: inputs, tokens kept off the command line, files, errors.

Every test runs the real console script as a subprocess against a real server or database.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from authsvc.clock import SystemClock, to_datetime
from authsvc.config import load_settings
from authsvc.crypto.secrets import mint_secret
from authsvc.server.app import build_core
from authsvc.storage.records import AudienceGrant
from authsvc_client.v1 import auth_pb2
from tests.integration.conftest import ADMIN, World, make_world, sqlite_env
from tests.support.server import authsvc_command, base_env, run_cli, running_server


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w, server = make_world(tmp_path_factory.mktemp("cli"))
    try:
        yield w
    finally:
        server.stop()


def _run(env: dict[str, str], *args: str, input_text: str = "") -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, input_text=input_text, check=False)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed command: non-zero exit, no traceback, its last stderr line names the problem."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("authsvc: "), proc.stderr
    return lines[-1]


def _listed_ids(env: dict[str, str]) -> list[str]:
    out = run_cli(env, "services", "list", "--json").stdout
    return [s["service_id"] for s in json.loads(out)]


def _orders_env(world: World, **extra: str) -> dict[str, str]:
    return {
        **world.server.env,
        "AUTHSVC_TARGET": world.server.address,
        "AUTHSVC_SERVICE_ID": "orders",
        "AUTHSVC_SERVICE_SECRET": world.orders_secret,
        **extra,
    }


class TestServiceInputs:
    """Issue 11 finding 7: one validation for the RPCs and the CLI."""

    @pytest.mark.parametrize(
        "name",
        [
            "",
            " orders",
            "orders\n",
            "\x1b[31morders",
            "o" * 300,
            "\u043erders",  # Cyrillic o
            "\uff4frders",  # full-width o
            "Orders",
            "_orders",
            "asvcs_looks-like-a-secret",
        ],
    )
    def test_create_refuses_names_outside_the_grammar(self, cli_world: World, name: str) -> None:
        env = cli_world.server.env
        line = _one_error_line(_run(env, "services", "create", name, "--audience", "billing"))
        assert "service_id" in line
        assert name not in _listed_ids(env)

    @pytest.mark.parametrize("scope", ["a b", "caf\u00e9", ""])
    def test_create_refuses_bad_scopes(self, cli_world: World, scope: str) -> None:
        env = cli_world.server.env
        proc = _run(env, "services", "create", "scoped", "--audience", "billing", "--scope", scope)
        assert "scope" in _one_error_line(proc)
        assert "scoped" not in _listed_ids(env)

    def test_the_grammar_admits_what_ops_use(self, cli_world: World) -> None:
        env = cli_world.server.env
        run_cli(env, "services", "create", "pay-v2.eu_1", "--audience", "billing")
        assert "pay-v2.eu_1" in _listed_ids(env)

    @pytest.mark.parametrize("name", ["\u043erders", "Orders", "orders "])
    def test_the_create_rpc_refuses_look_alikes_too(self, cli_world: World, name: str) -> None:
        with pytest.raises(grpc.RpcError) as exc:
            cli_world.server.stub.CreateService(
                auth_pb2.CreateServiceRequest(service_id=name, audiences=["billing"]),
                metadata=cli_world.admin_md(),
                timeout=10,
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestIdsWrittenBeforeTheGrammar:
    """A database may already hold ids outside the grammar: they log in and list safely."""

    def test_legacy_ids_log_in_and_list_escaped(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        core = build_core(load_settings(env), upgrade=False)
        legacy = {
            "Orders": mint_secret(),
            "\u043erders": mint_secret(),
            "esc\x1b[2J": mint_secret(),
        }
        try:
            now = to_datetime(SystemClock().now())
            for sid, secret in legacy.items():
                core.repo.create_service(
                    sid, [AudienceGrant("billing", ("read",))], core.hasher.hash(secret), now
                )
        finally:
            core.dispose()
        listed = run_cli(env, "services", "list").stdout
        assert "\x1b" not in listed
        assert "esc\\x1b[2J\tenabled" in listed
        assert "\\u043erders\tenabled" in listed
        assert "Orders\tenabled" in listed
        assert "\u043erders" in _listed_ids(env)

        with running_server(env) as server:
            for sid in ("Orders", "\u043erders"):
                assert server.issue(sid, legacy[sid], "billing", ["read"]).access_token
            with pytest.raises(grpc.RpcError) as exc:
                server.issue("esc\x1b[2J", legacy["esc\x1b[2J"], "billing")
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestTokensOffTheCommandLine:
    """Issue 11 finding 5: tokens from the environment, a file or stdin; the flag warns."""

    def _admin_env(self, world: World) -> dict[str, str]:
        return {**world.server.env, "AUTHSVC_TARGET": world.server.address}

    def test_admin_token_from_the_environment_file_or_stdin_without_a_warning(
        self, cli_world: World, tmp_path: Path
    ) -> None:
        token = cli_world.admin_token()
        env = self._admin_env(cli_world)
        token_file = tmp_path / "admin.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        ways = [
            ({**env, "AUTHSVC_ADMIN_TOKEN": token}, [], ""),
            (env, ["--admin-token-file", str(token_file)], ""),
            (env, ["--admin-token", "-"], token + "\n"),
        ]
        for environ, flags, stdin in ways:
            jti = f"jti-{secrets.token_hex(8)}"
            proc = _run(environ, "token", "revoke", "--jti", jti, *flags, input_text=stdin)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == {"revoked": True}
            assert "warning" not in proc.stderr

    def test_admin_token_as_an_argument_still_works_but_warns(self, cli_world: World) -> None:
        token = cli_world.admin_token()
        proc = _run(
            self._admin_env(cli_world),
            "token",
            "revoke",
            "--jti",
            f"jti-{secrets.token_hex(8)}",
            "--admin-token",
            token,
        )
        assert proc.returncode == 0, proc.stderr
        assert "warning: --admin-token on the command line" in proc.stderr
        assert "AUTHSVC_ADMIN_TOKEN" in proc.stderr
        assert token not in proc.stderr + proc.stdout

    def test_validate_reads_the_token_from_stdin_a_file_or_the_environment(
        self, cli_world: World, tmp_path: Path
    ) -> None:
        token = cli_world.server.issue("orders", cli_world.orders_secret, "billing").access_token
        env = self._admin_env(cli_world)
        token_file = tmp_path / "t"
        token_file.write_text(token)
        ways = [
            (env, [], token + "\n"),
            (env, ["-"], token),
            (env, ["--token-file", str(token_file)], ""),
            ({**env, "AUTHSVC_TOKEN": token}, [], ""),
        ]
        for environ, args, stdin in ways:
            proc = _run(
                environ, "token", "validate", *args, "--audience", "billing", input_text=stdin
            )
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["valid"] is True
            assert "warning" not in proc.stderr

    def test_validate_with_the_token_as_an_argument_warns(self, cli_world: World) -> None:
        token = cli_world.server.issue("orders", cli_world.orders_secret, "billing").access_token
        proc = _run(self._admin_env(cli_world), "token", "validate", token, "--audience", "billing")
        assert proc.returncode == 0
        assert "warning: a token on the command line" in proc.stderr
        assert token not in proc.stderr


class TestClientRules:
    """`token issue` reads its credentials by the client package's rules (README, Python client)."""

    def test_a_secret_file_others_can_read_is_refused_and_an_0600_one_works(
        self, cli_world: World, tmp_path: Path
    ) -> None:
        path = tmp_path / "secret"
        path.write_text(cli_world.orders_secret + "\n")
        path.chmod(0o644)
        env = _orders_env(cli_world, AUTHSVC_SERVICE_SECRET_FILE=str(path))
        del env["AUTHSVC_SERVICE_SECRET"]
        line = _one_error_line(_run(env, "token", "issue", "--audience", "billing"))
        assert "chmod 600" in line and cli_world.orders_secret not in line
        path.chmod(0o600)
        issued = _run(env, "token", "issue", "--audience", "billing")
        assert issued.returncode == 0 and issued.stdout.count(".") == 2

    def test_a_secret_both_inline_and_in_a_file_is_refused(
        self, cli_world: World, tmp_path: Path
    ) -> None:
        path = tmp_path / "secret"
        path.write_text(cli_world.orders_secret)
        path.chmod(0o600)
        env = _orders_env(cli_world, AUTHSVC_SERVICE_SECRET_FILE=str(path))
        line = _one_error_line(_run(env, "token", "issue", "--audience", "billing"))
        assert "set only one of" in line


class TestSaysWhatHappened:
    """Issue 13 item 7: no silent clamp, no bare `revoked: false`, no stray folders."""

    def test_a_ttl_above_the_maximum_is_reported(self, cli_world: World) -> None:
        env = _orders_env(cli_world)
        proc = _run(env, "token", "issue", "--audience", "billing", "--ttl", "99999")
        assert proc.returncode == 0, proc.stderr
        assert "lives 3600s, not the 99999s asked for" in proc.stderr
        assert "AUTHSVC_MAX_TTL_SECONDS" in proc.stderr
        assert proc.stdout.strip() not in proc.stderr
        quiet = _run(env, "token", "issue", "--audience", "billing", "--ttl", "60")
        assert quiet.returncode == 0 and quiet.stderr == ""

    def test_revoking_a_token_that_is_not_valid_says_why(self, cli_world: World) -> None:
        env = self._env(cli_world)
        proc = _run(env, "token", "revoke", "--token", "-", input_text="abc")
        assert proc.returncode == 1
        assert json.loads(proc.stdout) == {"revoked": False, "reason": "MALFORMED"}
        token = cli_world.server.issue("orders", cli_world.orders_secret, "billing").access_token
        head, payload, sig = token.split(".")
        tampered = ".".join([head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]])
        proc = _run(env, "token", "revoke", "--token", "-", input_text=tampered)
        assert json.loads(proc.stdout) == {"revoked": False, "reason": "BAD_SIGNATURE"}

    @staticmethod
    def _env(world: World) -> dict[str, str]:
        return {**world.server.env, "AUTHSVC_TARGET": world.server.address}

    def test_a_sqlite_url_in_a_missing_folder_is_refused_not_created(self, tmp_path: Path) -> None:
        missing = tmp_path / "nonexistent" / "dir"
        env = base_env(f"sqlite:///{missing / 'a.db'}")
        line = _one_error_line(_run(env, "db", "upgrade"))
        assert "does not exist" in line
        assert not (tmp_path / "nonexistent").exists()

    def test_a_folder_inside_the_working_directory_is_created(self, tmp_path: Path) -> None:
        env = base_env("sqlite:///state/a.db")
        proc = subprocess.run(
            [*authsvc_command(), "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "state" / "a.db").is_file()


class TestQuietByDefault:
    """Issue 13 item 8: a database command prints its answer; --verbose shows the logs."""

    def test_database_commands_write_nothing_to_stderr_unless_verbose(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        first = run_cli(env, "db", "upgrade")
        assert first.stderr == ""
        created = run_cli(env, "services", "create", "orders", "--audience", "billing")
        assert created.stderr == ""
        loud = run_cli(env, "services", "disable", "orders", "--verbose")
        assert '"action":"disable_service"' in loud.stderr
        fresh = sqlite_env(tmp_path / "fresh")
        (tmp_path / "fresh").mkdir()
        assert "alembic" in run_cli(fresh, "db", "upgrade", "-v").stderr


class TestFiles:
    """Issue 11 finding 9: the database is owner-only; dev mode tightens its folder."""

    def test_the_sqlite_database_is_created_0600(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        run_cli(env, "services", "create", "orders", "--audience", "billing")
        files = sorted(tmp_path.glob("authsvc.db*"))
        assert files
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name

    def test_dev_mode_tightens_an_existing_dev_folder_to_0700(self, tmp_path: Path) -> None:
        dev_dir = tmp_path / "dev"
        dev_dir.mkdir()
        dev_dir.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
        run_cli(env, "db", "upgrade", "--dev", "--dev-dir", str(dev_dir))
        assert stat.S_IMODE(dev_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((dev_dir / "authsvc.db").stat().st_mode) == 0o600


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*authsvc_command(), "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


class TestServeMistakes:
    """Issue 13 item 6: each mistake is one clear line and a non-zero exit, not a traceback."""

    def test_a_port_in_use(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc = _serve(sqlite_env(tmp_path), "--listen", f"127.0.0.1:{port}")
        line = _one_error_line(proc)
        assert f"cannot listen on 127.0.0.1:{port}" in line

    @pytest.mark.parametrize("url", ["mysql://u:hunter2@db/x", "not a url hunter2"])
    def test_an_unsupported_database_url_without_echoing_it(self, tmp_path: Path, url: str) -> None:
        proc = _serve(base_env(url), "--listen", "127.0.0.1:0")
        assert "AUTHSVC_DATABASE_URL" in _one_error_line(proc)
        assert "hunter2" not in proc.stderr + proc.stdout

    def test_a_postgres_scheme_url_is_accepted(self, postgres_url: str) -> None:
        url = make_url(postgres_url).set(drivername="postgres").render_as_string(False)
        assert url.startswith("postgres://")
        env = base_env(url)
        assert run_cli(env, "db", "upgrade").stdout.strip() == "database schema is current"
        run_cli(env, "services", "create", "orders", "--audience", "billing")
        assert _listed_ids(env) == ["orders"]

    def test_a_postgres_database_that_does_not_exist(self, postgres_url: str) -> None:
        missing = f"authsvc_missing_{secrets.token_hex(4)}"
        url = make_url(postgres_url).set(database=missing).render_as_string(False)
        env = base_env(url)
        # The tests' publish lead of 0 is named in a WARNING at start: another line.
        del env["AUTHSVC_KEY_PUBLISH_LEAD_SECONDS"]
        proc = _serve(env, "--listen", "127.0.0.1:0")
        line = _one_error_line(proc)
        assert "cannot use the database" in line and missing in line
        assert len(proc.stderr.strip().splitlines()) == 1

    def test_a_kek_file_of_raw_bytes(self, tmp_path: Path) -> None:
        kek = tmp_path / "kek"
        kek.write_bytes(bytes(range(200, 232)))
        kek.chmod(0o600)
        env = sqlite_env(tmp_path, AUTHSVC_KEK_FILE=str(kek))
        del env["AUTHSVC_KEK"]
        proc = _serve(env, "--listen", "127.0.0.1:0")
        assert "AUTHSVC_KEK_FILE must hold the base64 text" in _one_error_line(proc)
        assert len(proc.stderr.strip().splitlines()) == 1

    def test_output_into_a_closed_pipe(self, cli_world: World) -> None:
        token = cli_world.server.issue("orders", cli_world.orders_secret, "billing").access_token
        read_end, write_end = os.pipe()
        os.close(read_end)  # `| head` that already left: every write fails with EPIPE
        try:
            proc = subprocess.run(
                [*authsvc_command(), "token", "validate", "--audience", "billing"],
                env={**cli_world.server.env, "AUTHSVC_TARGET": cli_world.server.address},
                input=token,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert "broken pipe" in _one_error_line(proc)
        assert len(proc.stderr.strip().splitlines()) == 1


class TestRotateSecretCommand:
    """Issue 13 item 9: `authsvc services rotate-secret NAME [--grace SECONDS]`."""

    def test_rotation_with_a_grace_keeps_the_old_secret_for_it(self, cli_world: World) -> None:
        server = cli_world.server
        old = server.create_service("rotor", ["billing"])
        proc = run_cli(server.env, "services", "rotate-secret", "rotor", "--grace", "600", "--json")
        out = json.loads(proc.stdout)
        assert out["service_id"] == "rotor" and out["previous_secret_expires_at"]
        new = out["service_secret"]
        assert new != old and new not in proc.stderr
        assert server.issue("rotor", new, "billing").access_token
        assert server.issue("rotor", old, "billing").access_token

        env_out = run_cli(server.env, "services", "rotate-secret", "rotor", "--format", "env")
        lines = env_out.stdout.strip().splitlines()
        assert lines[0] == "AUTHSVC_SERVICE_ID=rotor"
        newest = lines[1].removeprefix("AUTHSVC_SERVICE_SECRET=")
        assert server.issue("rotor", newest, "billing").access_token
        for gone in (old, new):  # --grace defaults to 0: the previous secret ends now
            with pytest.raises(grpc.RpcError) as exc:
                server.issue("rotor", gone, "billing")
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        audit = json.loads(run_cli(server.env, "audit", "list", "--json").stdout)
        assert [e["target"] for e in audit if e["action"] == "rotate_secret"][:2] == [
            "service:rotor",
            "service:rotor",
        ]

    def test_unknown_service_and_too_long_a_grace(self, cli_world: World) -> None:
        env = cli_world.server.env
        assert "no such service" in _one_error_line(
            _run(env, "services", "rotate-secret", "nosuch")
        )
        assert "grace_period_seconds" in _one_error_line(
            _run(env, "services", "rotate-secret", ADMIN, "--grace", "99999999")
        )


class TestInterrupt:
    """Ctrl-C is not success: a command exits 130 with one line; `serve` stops cleanly, 0."""

    def test_an_interrupted_command_exits_130(self, tmp_path: Path) -> None:
        fifo = tmp_path / "token"
        os.mkfifo(fifo)
        env = {**base_env("sqlite:///unused.db"), "AUTHSVC_TARGET": "127.0.0.1:1"}
        proc = subprocess.Popen(
            [*authsvc_command(), "token", "validate", "--audience", "a", "--token-file", str(fifo)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        writer = None
        try:
            # Opening the FIFO's write end succeeds once the command has opened it to read:
            # from then on it waits inside main() for a token that never comes.
            deadline = time.monotonic() + 60
            while writer is None:
                try:
                    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < deadline, "the command never opened the file"
                    time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if writer is not None:
                os.close(writer)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, err
        assert out == "" and err == "authsvc: interrupted\n"

    def test_sigint_stops_serve_cleanly(self, tmp_path: Path) -> None:
        env = sqlite_env(tmp_path)
        run_cli(env, "db", "upgrade")
        with running_server(env) as server:
            assert server.stop(signal.SIGINT) == 0, "".join(server.output)[-3000:]


class TestUnknownVariables:
    """A misspelt AUTHSVC_* variable warns (its name and the closest known one, never its value);
    the client package's variables, often exported beside, do not."""

    TYPO = "AUTHSVC_DATABSE_URL"
    VALUE = "postgresql+psycopg://authsvc:hunter2@db.internal/authsvc"

    def _env(self, folder: Path) -> dict[str, str]:
        return sqlite_env(
            folder,
            **{self.TYPO: self.VALUE, "AUTHSVC_SERVICE_ID": "orders", "AUTHSVC_TARGET": "x:1"},
        )

    def _assert_warned(self, text: str) -> None:
        lines = [line for line in text.splitlines() if "unknown environment variable" in line]
        assert len(lines) == 1, text[-3000:]
        assert self.TYPO in lines[0] and "did you mean AUTHSVC_DATABASE_URL?" in lines[0]
        assert '"level":"warning"' in lines[0]
        assert "hunter2" not in text and "db.internal" not in text
        assert "AUTHSVC_SERVICE_ID" not in text and "AUTHSVC_TARGET" not in text

    def test_a_command_warns_and_still_answers(self, tmp_path: Path) -> None:
        proc = run_cli(self._env(tmp_path), "db", "upgrade")
        assert proc.stdout == "database schema is current\n"
        self._assert_warned(proc.stderr)

    def test_serve_warns_at_startup(self, tmp_path: Path) -> None:
        env = self._env(tmp_path)
        run_cli(env, "db", "upgrade")
        with running_server(env) as server:
            server.stop()
            self._assert_warned("".join(server.output))


def test_serve_names_a_publish_lead_shorter_than_jwks_cache_and_sync(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path, AUTHSVC_KEY_PUBLISH_LEAD_SECONDS="1")
    run_cli(env, "db", "upgrade")
    with running_server(env) as server:
        server.stop()
    text = "".join(server.output)
    lines = [line for line in text.splitlines() if "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS=1 " in line]
    assert len(lines) == 1 and '"level":"warning"' in lines[0], text[-3000:]


class TestUsageErrorsExitTwo:
    """README "Exit codes": 1 is a negative answer (an invalid token), 2 a refusal or an error;
    a command that cannot run as given is an error, so a script never reads it as "invalid"."""

    @pytest.mark.parametrize(
        ("args", "stdin", "names"),
        [
            (("services", "create", "noaud"), "", "at least one --audience"),
            (("token", "validate", "--audience", "billing", "--token-file", "/nonexistent"), "",
             "cannot read --token-file /nonexistent"),
            (("token", "revoke", "--service", "orders"), "", "needs an admin token"),
            (("token", "revoke", "--token", "-"), "", "the token to revoke is empty"),
            (("token", "revoke", "--jti", "x", "--admin-token-file", "/nonexistent"), "",
             "cannot read --admin-token-file /nonexistent"),
            (("serve", "--workers", "0"), "", "--workers must be at least 1"),
        ],
        ids=["no audience", "token file", "no admin token", "empty token", "admin file", "workers"],
    )
    def test_one_line_and_exit_2(
        self, cli_world: World, args: tuple[str, ...], stdin: str, names: str
    ) -> None:
        env = {**cli_world.server.env, "AUTHSVC_TARGET": cli_world.server.address}
        env.pop("AUTHSVC_ADMIN_TOKEN", None)
        proc = _run(env, *args, input_text=stdin)
        line = _one_error_line(proc)
        assert proc.returncode == 2, (proc.returncode, line)
        assert names in line
