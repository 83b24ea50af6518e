"""The client distribution stands alone: no server or database module on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import authsvc_client


class TestPackage:
    def test_import_loads_no_server_or_database_module(self) -> None:
        code = (
            "import json, sys; import authsvc_client, authsvc_client.aio; "
            "print(json.dumps(sorted(sys.modules)))"
        )
        out = subprocess.run(
            [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True,
            timeout=60,
        ).stdout
        loaded = json.loads(out)
        forbidden = ("sqlalchemy", "alembic", "psycopg", "authsvc")
        assert [m for m in loaded if m.split(".")[0] in forbidden] == []
        assert "authsvc_client" in loaded

    def test_import_loads_no_opentelemetry(self) -> None:
        # Tracing is the optional `otel` extra: neither the client package nor a server with
        # AUTHSVC_TRACING off may need it installed.
        code = (
            "import json, sys; import authsvc_client, authsvc_client.aio, authsvc.server.app; "
            "print(json.dumps(sorted(sys.modules)))"
        )
        out = subprocess.run(
            [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True,
            timeout=60,
        ).stdout
        assert [m for m in json.loads(out) if m.split(".")[0] == "opentelemetry"] == []

    def test_public_surface_is_explicit_and_typed(self) -> None:
        for name in authsvc_client.__all__:
            assert hasattr(authsvc_client, name), name
        assert (Path(authsvc_client.__file__).parent / "py.typed").exists()
