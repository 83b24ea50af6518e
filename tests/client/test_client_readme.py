"""clients/python/README.md is what pip users see: it must be the distribution's readme and
stay true to the package's names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from authsvc_client import errors, tokens

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


def _readme() -> str:
    return (CLIENT / "README.md").read_text(encoding="utf-8")


class TestClientReadme:
    def test_is_the_distribution_readme(self) -> None:
        project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
        assert project["readme"] == "README.md"
        assert _readme().startswith("# authsvc-client")

    def test_names_every_environment_variable(self) -> None:
        text = _readme()
        names = [getattr(tokens, n) for n in dir(tokens) if n.startswith("ENV_")]
        assert len(names) == 4
        assert [n for n in names if f"`{n}`" not in text] == []

    def test_shows_sync_and_asyncio_adoption_and_both_validators(self) -> None:
        text = _readme()
        for needle in ("TokenSource.from_env(", "AsyncTokenSource.from_env(", "call_credentials(",
                       "grpc.aio.secure_channel(", "LocalValidator(", "RemoteValidator(",
                       "bearer_interceptors(", "BearerTokenInterceptor(", "invalidate("):
            assert needle in text, needle

    def test_error_names_it_cites_exist(self) -> None:
        cited = set(re.findall(r"`(\w+(?:Error|Unavailable|Refused))`", _readme()))
        assert {"CredentialsError", "TokenRefused", "TokenUnavailable"} <= cited
        assert [name for name in cited if not hasattr(errors, name)] == []
