"""The sans-IO boundary of pobox.proxy: importing it loads no I/O machinery (STYLE.md §3.1)."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.protocol.test_boundary import FORBIDDEN

_PROBE = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
import pobox.proxy
print(json.dumps(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def loaded() -> list[str]:
    """The modules loaded by ``import pobox.proxy`` in a fresh interpreter (no coverage)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, json.dumps(sys.path)],
        capture_output=True,
        check=True,
        text=True,
        env=env,
    )
    return json.loads(result.stdout)


class TestImportBoundary:
    """What ``import pobox.proxy`` pulls in."""

    @pytest.mark.parametrize("name", FORBIDDEN)
    def test_no_io_module(self, loaded, name):
        """No I/O or logging module is loaded."""
        assert name not in loaded

    def test_only_itself_and_errors(self, loaded):
        """Of pobox, only the parser and the root of the error tree are loaded."""
        ours = [m for m in loaded if m.startswith("pobox")]

        assert ["pobox", "pobox.errors", "pobox.proxy", "pobox.proxy._header"] == ours
