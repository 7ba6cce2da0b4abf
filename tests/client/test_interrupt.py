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

import pytest

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


#: Runs started before one is caught in the middle of the large message.
ATTEMPTS = 5


async def interrupted_run(
    peer: Peer, tmp_path: Path, signum: int
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start ``pobox fetch`` of the three messages and send it ``signum`` mid-message.

    A loaded machine may not wake the test before the run is over: such a run must have
    fetched everything (exit 0, the server maildrop empty), and the test starts again with
    the messages delivered anew, in a fresh folder; up to ``ATTEMPTS`` times.

    Returns:
        the signalled process and its command line.
    """
    for attempt in range(ATTEMPTS):
        work = tmp_path / f"attempt{attempt}"
        work.mkdir()
        for message in (SMALL_FIRST, LARGE, SMALL_LAST):
            peer.deliver(message)
        command = fetch_command(peer, work)
        run = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        while run.returncode is None and not partial_download(work / "local"):
            await asyncio.sleep(0.001)
        if run.returncode is None:
            run.send_signal(signum)
            return run, command
        _, err = await run.communicate()
        assert (0, 0) == (run.returncode, peer.remaining()), err
    pytest.fail(f"each of {ATTEMPTS} runs ended before it could be interrupted")


class TestInterruptedRun:
    """SIGKILL during a download, then a normal run."""

    async def test_kill_mid_download_loses_nothing(self, peer: Peer, tmp_path: Path) -> None:
        """After a kill -9 mid-message and a rerun, each message is stored exactly once."""
        first, command = await interrupted_run(peer, tmp_path, signal.SIGKILL)
        await first.communicate()
        assert -signal.SIGKILL == first.returncode
        assert 3 == peer.remaining()

        second = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await second.communicate()
        assert 0 == second.returncode
        assert b"password and every message go over the network IN CLEAR" in err
        assert b"alice@127.0.0.1: fetched " in out
        local = Path(command[command.index("--maildir") + 1])
        assert sorted(lf(m) for m in (SMALL_FIRST, LARGE, SMALL_LAST)) == local_messages(local)
        assert 0 == peer.remaining()


class TestCtrlC:
    """SIGINT (Ctrl-C) during a download."""

    async def test_interrupt_cleans_up_and_keeps_server_mail(
        self, peer: Peer, tmp_path: Path
    ) -> None:
        """Ctrl-C mid-message exits 130, removes the partial file and deletes nothing."""
        run, command = await interrupted_run(peer, tmp_path, signal.SIGINT)
        _, err = await run.communicate()
        assert 130 == run.returncode
        assert b"pobox fetch: alice@127.0.0.1: interrupted\n" in err
        local = Path(command[command.index("--maildir") + 1])
        assert [] == list((local / "tmp").iterdir())
        assert 3 == peer.remaining()
