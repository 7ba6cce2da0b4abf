"""The sans-IO boundary: importing pobox.protocol loads no I/O machinery (STYLE.md §3.1)."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FORBIDDEN = ("asyncio", "socket", "ssl", "logging", "selectors", "threading", "subprocess")
FORBIDDEN_POBOX = ("pobox.server", "pobox.storage", "pobox.auth", "pobox.cli", "pobox.config")

_PROBE = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
before = set(sys.modules)
import pobox.protocol
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def modules() -> dict[str, list[str]]:
    """The modules loaded before and after ``import pobox.protocol`` in a fresh interpreter.

    Without coverage measurement, which would load I/O modules of its own in the probe.
    """
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
    """What ``import pobox.protocol`` pulls in."""

    @pytest.mark.parametrize("name", FORBIDDEN)
    def test_no_io_module(self, modules, name):
        """No I/O or logging module is loaded."""
        assert name not in modules["after"]

    def test_no_other_pobox_package(self, modules):
        """No other pobox package is loaded."""
        loaded = [m for m in modules["after"] if m.startswith(FORBIDDEN_POBOX)]

        assert [] == loaded

    def test_probe_sees_the_import(self, modules):
        """The probe does load pobox.protocol, so the checks above mean something."""
        assert "pobox.protocol._server" in modules["after"]
        assert "pobox.protocol._server" not in modules["before"]
