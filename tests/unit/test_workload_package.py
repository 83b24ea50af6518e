"""authsvc.workload stays pure: no gRPC, no storage, no network at import; one public surface."""

from __future__ import annotations

import ast
from pathlib import Path

import authsvc.workload as workload

PACKAGE = Path(workload.__file__).parent
FORBIDDEN = ("grpc", "sqlalchemy", "authsvc.server", "authsvc.storage", "authsvc.usecases")


class TestPurity:
    def test_no_grpc_or_storage_imports(self) -> None:
        offenders = []
        for source in sorted(PACKAGE.glob("*.py")):
            for node in ast.walk(ast.parse(source.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                        offenders.append(f"{source.name}: {name}")
        assert offenders == []

    def test_public_names_exist(self) -> None:
        for name in workload.__all__:
            assert hasattr(workload, name), name
