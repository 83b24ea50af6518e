"""SECURITY.md names a test for every promise: every name it cites must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"`((?:tests/[\w/]+\.py)?(?:::\w+)*)`")


def _citations() -> list[tuple[str, list[str]]]:
    """(file, [names...]) for every cited test; `::X` continues the file cited before it."""
    out: list[tuple[str, list[str]]] = []
    for line in (ROOT / "SECURITY.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = ""
        for ref in CITATION.findall(line):
            path, _, rest = ref.partition("::")
            if path:
                current = path
            elif not current:
                continue
            names = [n for n in rest.split("::") if n] if rest else []
            out.append((current, names))
    return out


class TestSecurityMd:
    def test_every_cited_test_exists(self) -> None:
        cited = _citations()
        assert len(cited) > 30
        missing = []
        for path, names in cited:
            file = ROOT / path
            if not file.exists():
                missing.append(path)
                continue
            text = file.read_text()
            for name in names:
                if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", text, re.M):
                    missing.append(f"{path}::{name}")
        assert missing == []

    def test_no_citation_lacks_its_file_or_leading_colons(self) -> None:
        # `TestX::test_y` without `tests/...py` or a leading `::` would be skipped by the check
        # above, so a promise could name a test that does not exist.
        bare = re.compile(r"`((?:Test|test_)\w*(?:::\w+)*)`")
        found = [
            ref
            for line in (ROOT / "SECURITY.md").read_text().splitlines()
            if line.startswith("|")
            for ref in bare.findall(line)
        ]
        assert found == []
