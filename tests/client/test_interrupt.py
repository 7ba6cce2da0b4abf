"""``pobox fetch`` killed with SIGKILL in the middle of a large message, then run again.

The contract: nothing lost, nothing twice.  The first run is killed while the large message
is being written into the local Maildir's ``tmp/``; the second run must end with every
message in the local Maildir exactly once and the server maildrop empty.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from tests.client.conftest import PASSWORD, Peer, lf, local_messages

SMALL_FIRST = b"From: first@example.test\nSubject: before\n\nfirst\n"
LARGE = b"From: big@example.test\nSubject: large\n\n" + (b"y" * 99 + b"\n") * 250_000
SMALL_LAST = b"From: last@example.test\nSubject: after\n\nlast\n"


def fetch_command(peer: Peer, tmp_path: Path) -> list[str]:
    """The ``pobox fetch`` command line for alice (plaintext on loopback)."""
    (tmp_path / "password").write_text(PASSWORD + "\n")
    return [
        sys.executable,
        "-m",
        "pobox",
        "fetch",
        "--host",
        peer.host,
        "--port",
        str(peer.port),
        "--user",
        "alice",
        "--insecure",
        "--password-file",
        str(tmp_path / "password"),
        "--maildir",
        str(tmp_path / "local"),
        "--state-dir",
        str(tmp_path / "state"),
    ]


def partial_download(maildir: Path) -> bool:
    """Whether the large message is being written into the Maildir's ``tmp/``.

    Only the large message passes 1 MB there; a kill while a small one is in flight could
    legitimately repeat that one (stored, not yet recorded in the state).
    """
    try:
        return any(p.stat().st_size > 1_000_000 for p in (maildir / "tmp").iterdir())
    except FileNotFoundError:
        return False


class TestInterruptedRun:
    """SIGKILL during a download, then a normal run."""

    async def test_kill_mid_download_loses_nothing(self, peer: Peer, tmp_path: Path) -> None:
        """After a kill -9 mid-message and a rerun, each message is stored exactly once."""
        for message in (SMALL_FIRST, LARGE, SMALL_LAST):
            peer.deliver(message)
        command = fetch_command(peer, tmp_path)
        first = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        while first.returncode is None and not partial_download(tmp_path / "local"):
            await asyncio.sleep(0.001)
        if first.returncode is None:
            first.send_signal(signal.SIGKILL)
        assert -signal.SIGKILL == await first.wait()
        assert 3 == peer.remaining()

        second = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await second.communicate()
        assert 0 == second.returncode
        assert b"password and every message go over the network IN CLEAR" in err
        assert b"alice@127.0.0.1: fetched " in out
        assert sorted(lf(m) for m in (SMALL_FIRST, LARGE, SMALL_LAST)) == local_messages(
            tmp_path / "local"
        )
        assert 0 == peer.remaining()


class TestCtrlC:
    """SIGINT (Ctrl-C) during a download."""

    async def test_interrupt_cleans_up_and_keeps_server_mail(
        self, peer: Peer, tmp_path: Path
    ) -> None:
        """Ctrl-C mid-message exits 130, removes the partial file and deletes nothing."""
        for message in (SMALL_FIRST, LARGE, SMALL_LAST):
            peer.deliver(message)
        run = await asyncio.create_subprocess_exec(
            *fetch_command(peer, tmp_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        while run.returncode is None and not partial_download(tmp_path / "local"):
            await asyncio.sleep(0.001)
        if run.returncode is None:
            run.send_signal(signal.SIGINT)
        _, err = await run.communicate()
        assert 130 == run.returncode
        assert b"pobox fetch: alice@127.0.0.1: interrupted\n" in err
        assert [] == list((tmp_path / "local" / "tmp").iterdir())
        assert 3 == peer.remaining()
