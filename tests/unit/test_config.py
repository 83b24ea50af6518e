"""Settings: fail fast, name the variable, never show a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from authsvc.config import load_new_kek, load_settings
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
