"""The sans-IO boundary of pobox.proxy: it imports no I/O machinery (STYLE.md §3.1).

Read from the source, so a module added to the package is checked too.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pobox.errors
import pobox.proxy

PACKAGE = Path(pobox.proxy.__file__).parent

#: What the parser may use: pure standard-library modules and the root of pobox's errors.
ALLOWED = {"__future__", "dataclasses", "ipaddress", "typing", "pobox.errors", "pobox.proxy"}


def imported(path: Path) -> set[str]:
    """The modules a source file imports (``pobox.proxy._header`` counts as pobox.proxy)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name.removesuffix("._header") for name in names}


class TestImportBoundary:
    """What pobox.proxy's modules import."""

    @pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
    def test_only_pure_modules(self, path):
        """No asyncio, socket, ssl, logging or other pobox package, directly or not."""
        assert set() == imported(path) - ALLOWED

    def test_errors_import_nothing(self):
        """pobox.errors, which the parser uses, imports nothing itself."""
        assert {"__future__"} == imported(Path(pobox.errors.__file__))

    def test_package_is_read(self):
        """The check above sees both modules of the package."""
        assert ["__init__.py", "_header.py"] == sorted(p.name for p in PACKAGE.glob("*.py"))
