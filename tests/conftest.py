"""Shared fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.postgres import pg_cluster, pg_dsn
from tests.integration.wire import Wire

# Property tests check outcomes, never speed: no per-example deadline, which a loaded machine
# (CI's two cores, busy with servers started by other tests) would turn into false failures.
settings.register_profile("pobox", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pobox")

# Each test process (pytest-xdist runs several) gives the servers it starts its own runtime
# directory, as systemd would: `control_socket = "auto"` (and the metrics' multiprocess
# directory) go there, never to /run/pobox, which other test processes and any pobox running
# on the machine would share. Sticky and world-writable: servers switch to unprivileged users.
_RUNTIME = tempfile.mkdtemp(prefix="pobox-test-run.")
os.chmod(_RUNTIME, 0o1777)
os.environ["RUNTIME_DIRECTORY"] = _RUNTIME
atexit.register(shutil.rmtree, _RUNTIME, ignore_errors=True)
# The throwaway PostgreSQL cluster and its per-test database, for every test directory.
__all__ = ["pg_cluster", "pg_dsn"]


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    """Close the raw test connections a test left open, in the test's own event loop."""
    yield
    await Wire.close_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Make a report's captured output UTF-8 encodable, as pytest-xdist must send it.

    Tests feed hostile names (lone surrogates among them) to the log; what they logged is
    captured with the report, which a worker could not send to the controller as it is.
    """
    report = yield
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]
    return report
