"""The seeds' point, shown by a test: a packet capture on loopback sees a plaintext password,
and does not see it once the same login goes through STLS.

tshark captures only the test server's port, with a capture filter, while one login happens,
prints each packet's TCP payload, and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server
from tests.helpers import need
from tests.integration.wire import Wire

from .helpers import Pki

PASSWORD = b"Tr0ub4dor&3-pobox-capture"
MARKER = b"XMARKER-end-of-capture"


async def capture(server: RunningServer, login: Callable[[], Awaitable[None]]) -> bytes:
    """Capture loopback traffic to the server while ``login()`` runs; return the TCP payload.

    tshark decodes live and prints each packet's payload.  Packets reach it in batches, so
    instead of stopping after a guessed delay, a last plaintext connection sends a marker
    and the capture is stopped once the marker has been seen: every packet of the login,
    all sent before it, has been seen by then.
    """
    proc = await asyncio.create_subprocess_exec(
        need("tshark"), "-i", "lo", "-f", f"tcp port {server.port}",
        "-l", "-T", "fields", "-e", "tcp.payload",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    payload = bytearray()
    try:
        async with asyncio.timeout(60):
            while b"Capture started" not in (line := await proc.stderr.readline()):
                assert line, "tshark exited before capturing"
            await login()
            marker = await Wire.connect(server.host, server.port)
            await marker.line()
            await marker.send(MARKER + b"\r\n")
            await marker.close()
            while MARKER not in payload:
                line = await proc.stdout.readline()
                assert line, "tshark exited before seeing the marker"
                payload += bytes.fromhex(line.decode().strip().replace(":", ""))
    finally:
        proc.send_signal(signal.SIGINT)  # our own tshark, by its PID
        async with asyncio.timeout(30):
            await proc.communicate()
    return bytes(payload)


@pytest.fixture
async def server(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningServer]:
    """A pobox with STLS and a user whose password is easy to spot in a capture."""
    async with running_server(
        tmp_path / "srv", {"carol": PASSWORD.decode()}, **pki.settings
    ) as srv:
        yield srv


@pytest.mark.external
class TestCapture:
    """What a passive observer on the wire sees of a login."""

    async def test_plaintext_login_exposes_password(self, server: RunningServer):
        """A USER/PASS login without TLS puts the password on the wire in clear."""

        async def login() -> None:
            wire = await Wire.connect(server.host, server.port)
            await wire.login(b"carol", PASSWORD)
            await wire.command(b"QUIT")
            await wire.read_all()

        payload = await capture(server, login)

        assert PASSWORD in payload
        assert b"+OK Logged in." in payload

    async def test_stls_login_hides_password(self, server: RunningServer, pki: Pki):
        """The same login after STLS leaves no trace of the password in the capture."""

        async def login() -> None:
            wire = await Wire.connect(server.host, server.port)
            await wire.line()
            await wire.command(b"STLS")
            await wire.writer.start_tls(pki.client_context(), server_hostname="localhost")
            assert b"+OK\r\n" == await wire.command(b"USER carol")
            assert b"+OK Logged in.\r\n" == await wire.command(b"PASS " + PASSWORD)
            await wire.command(b"QUIT")
            await wire.read_all()

        payload = await capture(server, login)

        assert b"+OK Begin TLS negotiation now." in payload  # the capture saw this session
        assert PASSWORD not in payload
        assert b"carol" not in payload
        assert b"Logged in" not in payload
