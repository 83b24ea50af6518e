"""Settings: fail fast, name the variable, never show a secret."""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path

import pytest

from authsvc.config import (
    Settings,
    known_variables,
    load_new_kek,
    load_settings,
    risky_settings,
    unknown_variables,
    warn_unknown_variables,
)
from authsvc.errors import ConfigError
from tests.support.server import TEST_KEK

BASE = {"AUTHSVC_KEK": TEST_KEK, "AUTHSVC_ISSUER": "https://issuer.example"}


class TestLoadSettings:
    def test_loopback_with_kek_and_issuer_needs_nothing_else(self) -> None:
        s = load_settings(BASE)
        assert s.listen == "127.0.0.1:50051"
        assert s.server_name == "authsvc"
        assert (s.default_ttl_seconds, s.max_ttl_seconds) == (900, 3600)
        assert s.database_url.startswith("sqlite:///")

    def test_repr_masks_the_kek(self) -> None:
        assert TEST_KEK not in repr(load_settings(BASE))
        assert "***" in repr(load_settings(BASE))

    @pytest.mark.parametrize("missing", ["AUTHSVC_KEK", "AUTHSVC_ISSUER"])
    def test_missing_required_setting_is_named(self, missing: str) -> None:
        env = {k: v for k, v in BASE.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            load_settings(env)

    def test_flags_override_the_environment(self) -> None:
        s = load_settings(
            {**BASE, "AUTHSVC_LISTEN": "127.0.0.1:1"},
            {"listen": "127.0.0.1:2", "database_url": None},
        )
        assert s.listen == "127.0.0.1:2"

    def test_plaintext_on_public_address_needs_explicit_upstream_tls(self) -> None:
        with pytest.raises(ConfigError, match="plaintext"):
            load_settings({**BASE, "AUTHSVC_LISTEN": "0.0.0.0:50051"})
        s = load_settings(
            {**BASE, "AUTHSVC_LISTEN": "0.0.0.0:50051", "AUTHSVC_TLS_TERMINATED_UPSTREAM": "true"}
        )
        assert s.tls_terminated_upstream

    def test_tls_cert_and_key_go_together(self) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_TLS_KEY"):
            load_settings({**BASE, "AUTHSVC_TLS_CERT": "/x.pem"})

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("AUTHSVC_MAX_TTL_SECONDS", "abc"),
            ("AUTHSVC_RSA_KEY_BITS", "1024"),
            ("AUTHSVC_LISTEN", "nohostport"),
            ("AUTHSVC_ACCESS_LOG_ALL", "sometimes"),
            ("AUTHSVC_EVENT_LOOP", "trio"),
        ],
    )
    def test_bad_values_are_named(self, name: str, value: str) -> None:
        with pytest.raises(ConfigError, match=name):
            load_settings({**BASE, name: value})

    def test_the_event_loop_is_uvloop_where_installed_unless_asked(self) -> None:
        assert load_settings(BASE).event_loop == "auto"
        assert load_settings({**BASE, "AUTHSVC_EVENT_LOOP": "AsyncIO"}).event_loop == "asyncio"
        assert load_settings({**BASE, "AUTHSVC_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"

    def test_access_log_all_is_off_unless_asked(self) -> None:
        assert load_settings(BASE).access_log_all is False
        assert load_settings({**BASE, "AUTHSVC_ACCESS_LOG_ALL": "true"}).access_log_all is True

    def test_http_side_port_limits_are_read_and_bounded(self) -> None:
        s = load_settings(BASE)
        assert (s.http_read_timeout_seconds, s.http_max_connections) == (10.0, 32)
        s = load_settings(
            {
                **BASE,
                "AUTHSVC_HTTP_READ_TIMEOUT_SECONDS": "2.5",
                "AUTHSVC_HTTP_MAX_CONNECTIONS": "8",
            }
        )
        assert (s.http_read_timeout_seconds, s.http_max_connections) == (2.5, 8)
        for name in ("AUTHSVC_HTTP_READ_TIMEOUT_SECONDS", "AUTHSVC_HTTP_MAX_CONNECTIONS"):
            with pytest.raises(ConfigError, match=name):
                load_settings({**BASE, name: "0"})

    def test_default_ttl_above_maximum_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_DEFAULT_TTL_SECONDS"):
            load_settings({**BASE, "AUTHSVC_DEFAULT_TTL_SECONDS": "7200"})

    def test_the_publish_lead_defaults_to_the_jwks_cache_lifetime_plus_one_sync(self) -> None:
        s = load_settings(BASE)
        # Seven days: /.well-known/jwks.json may be cached 300 s, plus the 0.5 s sync.
        assert s.key_publish_lead_seconds is None and s.publish_lead_seconds == 300.5
        s = load_settings(
            {
                **BASE,
                "AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS": "600",
                "AUTHSVC_SYNC_INTERVAL_SECONDS": "2",
            }
        )
        assert s.publish_lead_seconds == 62.0  # max-age 60 s (a tenth) beats the client's 30 s
        s = load_settings({**BASE, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "45.5"})
        assert s.publish_lead_seconds == 45.5

    def test_dev_mode_publishes_without_a_lead_unless_told(self, tmp_path: Path) -> None:
        """One loopback server, no fleet caching its JWK Set: the README walkthrough's
        `keys rotate --dev` runs at once instead of waiting out five minutes."""
        dev = {"dev": True, "dev_dir": str(tmp_path / "d")}
        assert load_settings({}, dev).publish_lead_seconds == 0.0
        told = load_settings({"AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "12"}, dev)
        assert told.publish_lead_seconds == 12.0

    @pytest.mark.parametrize("value", ["-1", "soon"])
    def test_a_bad_publish_lead_is_named(self, value: str) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_KEY_PUBLISH_LEAD_SECONDS"):
            load_settings({**BASE, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": value})

    def test_a_publish_lead_longer_than_the_rotation_interval_is_refused(self) -> None:
        short = {**BASE, "AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS": "20"}
        with pytest.raises(ConfigError, match="must not exceed AUTHSVC_KEY_ROTATION_INTERVAL"):
            load_settings(short)  # the default lead, 30.5 s
        with pytest.raises(ConfigError, match="AUTHSVC_KEY_PUBLISH_LEAD_SECONDS"):
            load_settings({**short, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "21"})
        assert load_settings({**short, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "20"})
        # Scheduled rotation off: nothing to compare with.
        off = {**BASE, "AUTHSVC_KEY_ROTATION_INTERVAL_SECONDS": "0"}
        assert load_settings({**off, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "99999"})

    def test_dev_mode_generates_a_private_kek_beside_its_database(self, tmp_path: Path) -> None:
        s = load_settings({}, {"dev": True, "dev_dir": str(tmp_path / "d")})
        assert s.dev and s.database_url.endswith("/d/authsvc.db")
        assert (tmp_path / "d" / "kek").stat().st_mode & 0o777 == 0o600
        again = load_settings({}, {"dev": True, "dev_dir": str(tmp_path / "d")})
        assert again.kek.derive(b"x") == s.kek.derive(b"x")

    def test_dev_mode_is_loopback_only(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="loopback"):
            load_settings({"AUTHSVC_LISTEN": "0.0.0.0:1"}, {"dev": True, "dev_dir": str(tmp_path)})


OTHER_KEK = "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs="


class TestKekRollSettings:
    def test_previous_kek_joins_the_ring_and_stays_masked(self) -> None:
        s = load_settings({**BASE, "AUTHSVC_KEK_PREVIOUS": OTHER_KEK})
        assert s.kek_previous is not None
        assert s.kek_ring.kek_ids == {s.kek.kek_id, s.kek_previous.kek_id}
        assert s.kek_ring.primary is s.kek
        assert OTHER_KEK not in repr(s) and TEST_KEK not in repr(s)

    def test_a_previous_kek_equal_to_the_kek_is_dropped(self) -> None:
        s = load_settings({**BASE, "AUTHSVC_KEK_PREVIOUS": TEST_KEK})
        assert s.kek_previous is None and len(s.kek_ring.kek_ids) == 1

    def test_previous_kek_file_follows_the_kek_file_rules(self, tmp_path: Path) -> None:
        path = tmp_path / "previous"
        path.write_text(OTHER_KEK + "\n")
        path.chmod(0o644)
        with pytest.raises(ConfigError, match="AUTHSVC_KEK_PREVIOUS_FILE") as info:
            load_settings({**BASE, "AUTHSVC_KEK_PREVIOUS_FILE": str(path)})
        assert OTHER_KEK not in str(info.value)
        path.chmod(0o600)
        s = load_settings({**BASE, "AUTHSVC_KEK_PREVIOUS_FILE": str(path)})
        assert s.kek_previous is not None

    @pytest.mark.parametrize("value", ["c2hvcnQ=", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
    def test_a_bad_previous_kek_is_named_not_shown(self, value: str) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_KEK_PREVIOUS") as info:
            load_settings({**BASE, "AUTHSVC_KEK_PREVIOUS": value})
        assert value not in str(info.value)

    def test_the_new_kek_comes_only_from_its_variables(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_NEW_KEK"):
            load_new_kek({})
        assert load_new_kek({"AUTHSVC_NEW_KEK": OTHER_KEK}).kek_id != load_settings(
            BASE
        ).kek.kek_id
        path = tmp_path / "new"
        path.write_text(OTHER_KEK)
        path.chmod(0o640)
        with pytest.raises(ConfigError, match="AUTHSVC_NEW_KEK_FILE") as info:
            load_new_kek({"AUTHSVC_NEW_KEK_FILE": str(path)})
        assert OTHER_KEK not in str(info.value)
        path.chmod(0o600)
        assert load_new_kek({"AUTHSVC_NEW_KEK_FILE": str(path)}).kek_id == load_new_kek(
            {"AUTHSVC_NEW_KEK": OTHER_KEK}
        ).kek_id


FLOAT_SETTINGS = [
    "AUTHSVC_SYNC_INTERVAL_SECONDS",
    "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS",
    "AUTHSVC_JWKS_FETCH_TIMEOUT_SECONDS",
    "AUTHSVC_JWKS_REFRESH_SECONDS",
    "AUTHSVC_HTTP_READ_TIMEOUT_SECONDS",
    "AUTHSVC_SHUTDOWN_GRACE_SECONDS",
]


class TestNumbers:
    """A number setting is plain decimal text, finite and within its bounds."""

    @pytest.mark.parametrize("name", FLOAT_SETTINGS)
    @pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
    def test_a_non_finite_float_is_refused_by_name(self, name: str, value: str) -> None:
        with pytest.raises(ConfigError, match=f"{name} must be a finite number") as info:
            load_settings({**BASE, name: value})
        assert value not in str(info.value)

    @pytest.mark.parametrize("name", FLOAT_SETTINGS)
    def test_a_huge_float_is_refused_by_name(self, name: str) -> None:
        with pytest.raises(ConfigError, match=f"{name} must be at most"):
            load_settings({**BASE, name: "1e300"})

    def test_plain_decimal_floats_are_read(self) -> None:
        s = load_settings(
            {
                **BASE,
                "AUTHSVC_SYNC_INTERVAL_SECONDS": " 0.25 ",
                "AUTHSVC_SHUTDOWN_GRACE_SECONDS": "5e-1",
                "AUTHSVC_JWKS_REFRESH_SECONDS": "60.",
            }
        )
        assert (s.sync_interval_seconds, s.shutdown_grace_seconds) == (0.25, 0.5)
        assert s.jwks_refresh_seconds == 60.0

    @pytest.mark.parametrize("value", ["+1", "1_0", "\u0661", "0x10", "1.5"])
    def test_an_integer_is_plain_ascii_digits(self, value: str) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_LEEWAY_SECONDS must be an integer"):
            load_settings({**BASE, "AUTHSVC_LEEWAY_SECONDS": value})

    @pytest.mark.parametrize("value", ["10000000000", "9" * 5000, "99999999999999999999999999999"])
    def test_a_huge_integer_is_refused_by_name(self, value: str) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_MAX_TTL_SECONDS must be at most"):
            load_settings({**BASE, "AUTHSVC_MAX_TTL_SECONDS": value})

    def test_integers_keep_their_bounds_and_allow_surrounding_space(self) -> None:
        assert load_settings({**BASE, "AUTHSVC_LEEWAY_SECONDS": " 45\n"}).leeway_seconds == 45
        with pytest.raises(ConfigError, match="AUTHSVC_LEEWAY_SECONDS must be at least 0"):
            load_settings({**BASE, "AUTHSVC_LEEWAY_SECONDS": "-1"})
        with pytest.raises(ConfigError, match="AUTHSVC_RSA_KEY_BITS must be at most 16384"):
            load_settings({**BASE, "AUTHSVC_RSA_KEY_BITS": "1000000"})


class TestLogLevel:
    @pytest.mark.parametrize("value", ["VERBOSE", "10", "trace", "info please"])
    def test_an_unknown_level_is_refused(self, value: str) -> None:
        with pytest.raises(ConfigError, match="AUTHSVC_LOG_LEVEL must be a logging level"):
            load_settings({**BASE, "AUTHSVC_LOG_LEVEL": value})

    @pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), ("Warning", "WARNING")])
    def test_a_level_is_read_in_any_case(self, value: str, level: str) -> None:
        s = load_settings({**BASE, "AUTHSVC_LOG_LEVEL": value})
        assert s.log_level == level
        # What logs.configure_logging does with it (on a logger of its own here).
        logging.getLogger("tests.unit.test_config.level").setLevel(s.log_level)


class TestUnknownVariables:
    """A misspelt AUTHSVC_* name warns (name and closest match only); client names do not."""

    def test_a_typo_warns_with_the_closest_name_and_never_the_value(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        value = "postgresql+psycopg://authsvc:hunter2@db.internal/authsvc"
        with caplog.at_level(logging.WARNING, logger="authsvc.config"):
            warn_unknown_variables({**BASE, "AUTHSVC_DATABSE_URL": value})
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        text = caplog.text
        assert "AUTHSVC_DATABSE_URL" in text and "did you mean AUTHSVC_DATABASE_URL?" in text
        assert "hunter2" not in text and "db.internal" not in text

    def test_a_name_like_nothing_warns_without_a_suggestion(self) -> None:
        assert unknown_variables({"AUTHSVC_ZQXJ": "1"}) == [("AUTHSVC_ZQXJ", None)]

    def test_client_and_server_names_do_not_warn(self, caplog: pytest.LogCaptureFixture) -> None:
        env = {
            **BASE,
            "AUTHSVC_SERVICE_ID": "orders",
            "AUTHSVC_SERVICE_SECRET": "x",
            "AUTHSVC_SERVICE_SECRET_FILE": "/x",
            "AUTHSVC_SERVICE_KEY_FILE": "/x",
            "AUTHSVC_TARGET": "localhost:1",
            "AUTHSVC_TLS_CA": "/x",
            "AUTHSVC_WORKLOAD_TOKEN_FILE": "/x",
            "AUTHSVC_KEK_FILE": "/x",
            "AUTHSVC_KEK_PREVIOUS_FILE": "/x",
            "AUTHSVC_NEW_KEK": "x",
            "AUTHSVC_NEW_KEK_FILE": "/x",
            "AUTHSVC_ADMIN_TOKEN": "x",
            "AUTHSVC_HEALTH_TLS_CA": "/x",
            "OTHER_DATABSE_URL": "x",
            "AUTHSVC_TEST_POSTGRES_URL": "postgresql+psycopg://postgres@127.0.0.1/test",
        }
        with caplog.at_level(logging.WARNING, logger="authsvc.config"):
            warn_unknown_variables(env)
        assert caplog.records == []

    def test_every_setting_read_from_the_environment_is_a_known_name(self) -> None:
        # Settings fields are AUTHSVC_<FIELD>; reuse_port alone is set by the supervisor, not
        # by the environment. The known names come from the loaders' own lookups.
        known = known_variables()
        for f in fields(Settings):
            if f.name != "reuse_port":
                assert f"AUTHSVC_{f.name.upper()}" in known, f.name
        assert "AUTHSVC_REUSE_PORT" not in known


class TestRiskySettings:
    """A publish lead below JWKS cache + sync is allowed (an operator may know their
    validators) but named at start, since it undoes "never an unknown kid at a rotation"."""

    def test_a_lead_below_cache_and_sync_is_named(self) -> None:
        s = load_settings({**BASE, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "5"})
        (sentence,) = risky_settings(s)
        # Default interval 24 h: max-age capped at 300 s, plus the default 0.5 s sync.
        assert sentence.startswith("AUTHSVC_KEY_PUBLISH_LEAD_SECONDS=5 is shorter than")
        assert "(300.5 s)" in sentence

    def test_the_default_and_a_longer_lead_are_not(self) -> None:
        assert risky_settings(load_settings(BASE)) == []
        longer = load_settings({**BASE, "AUTHSVC_KEY_PUBLISH_LEAD_SECONDS": "300.5"})
        assert risky_settings(longer) == []

    def test_dev_mode_chooses_zero_on_purpose(self, tmp_path: Path) -> None:
        dev = load_settings({"AUTHSVC_DEV": "1", "AUTHSVC_DEV_DIR": str(tmp_path)})
        assert dev.publish_lead_seconds == 0
        assert risky_settings(dev) == []


def test_every_variable_authsvc_reads_is_named_in_the_readme() -> None:
    """The README's configuration is where an operator looks: a setting the loaders read but
    the README never names is one nobody can find (five were missing before this test)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    unnamed = sorted(n for n in known_variables() if not re.search(rf"\b{n}\b", readme))
    assert unnamed == []
