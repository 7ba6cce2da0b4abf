"""pobox import and export killed with SIGKILL half-way, then run again: nothing lost or doubled.

The commands run as real processes; the test watches the database (import) or the target
Maildir (export) and kills the process as soon as part of the work is durable.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pobox.storage.base import ImportedMessage
from pobox.storage.postgres import PostgresStore
from tests.helpers.maildir import User, deliver
from tests.transfer.test_transfer import maildir_served, served

#: Enough messages that an import takes several batches (BATCH_MESSAGES is 200).
MESSAGES = 4000
#: An export syncs every file: fewer do.
EXPORTED = 600


def write_config(folder: Path, dsn: str) -> Path:
    """A configuration with mail in PostgreSQL and alice in a passwd-file."""
    (folder / "passwd").write_text("alice:{PLAIN}secret\n")
    path = folder / "pobox.toml"
    path.write_text(
        f'mail_location = "postgresql"\npostgresql_dsn = "{dsn}"\n'
        f'passwd_file = "{folder / "passwd"}"\n'
    )
    return path


def pobox(*args: str, **popen: object) -> subprocess.Popen[bytes]:
    """Start ``python -m pobox ARGS``."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "pobox", *args],
        **{"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
           **popen},
    )  # fmt: skip


def kill_when(proc: subprocess.Popen[bytes], progress: object, timeout: float = 60) -> int:
    """SIGKILL ``proc`` once ``progress()`` is above 0; return what it was right after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = progress()  # type: ignore[operator]
        if done:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return int(progress())  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    pytest.fail("no progress before the deadline")


def rows(dsn: str) -> int:
    """Messages in alice's maildrop."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pobox.message WHERE mailbox = 'alice'").fetchone()
    return int(row[0]) if row else 0


def counters(dsn: str) -> tuple[object, ...] | None:
    """alice's counters next to what her messages add up to."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT mb.messages, mb.octets, mb.next_uid - 1,"
            " (SELECT count(*) FROM pobox.message m WHERE m.mailbox = mb.mailbox),"
            " (SELECT sum(size) FROM pobox.message m WHERE m.mailbox = mb.mailbox),"
            " (SELECT max(uid) FROM pobox.message m WHERE m.mailbox = mb.mailbox)"
            " FROM pobox.mailbox mb WHERE mb.mailbox = 'alice'"
        ).fetchone()


class TestInterruptedImport:
    """kill -9 during pobox import, then run it again."""

    def test_resumed(self, pg_dsn: str, tmp_path: Path) -> None:
        """The second run completes the import: every UIDL once, every byte, exact counters."""
        source = tmp_path / "source"
        for n in range(MESSAGES):
            deliver(source, f"Subject: {n}\n\nmessage {n}\n".encode(), fields="S" * (n % 2))
        truth = asyncio.run(maildir_served(source))
        config = write_config(tmp_path, pg_dsn)
        argv = ["import", "--from", f"maildir:{source}", "--user", "alice", "-c", str(config)]
        at_kill = kill_when(pobox(*argv), lambda: rows(pg_dsn))
        again = pobox(*argv)
        out, err = again.communicate(timeout=120)

        async def listing() -> list[tuple[str, int, bytes]]:
            store = PostgresStore(pg_dsn)
            try:
                return await served(store, User("alice"))
            finally:
                await store.aclose()

        found = counters(pg_dsn)
        assert found is not None
        assert (True, 0, truth, found[:3]) == (
            0 < at_kill < MESSAGES,
            again.returncode,
            asyncio.run(listing()),
            found[3:],
        ), err.decode()
        assert f"{MESSAGES - at_kill} of {MESSAGES} messages" in out.decode()


class TestInterruptedExport:
    """kill -9 during pobox export, then run it again."""

    def test_resumed(self, pg_dsn: str, tmp_path: Path) -> None:
        """The second run completes the Maildir: every message once, with the store's UIDLs."""

        async def fill() -> list[tuple[str, int, bytes]]:
            store = PostgresStore(pg_dsn)
            try:
                batch = [
                    ImportedMessage(
                        f"uidl-{n}", 20 + len(str(n)), f"Subject: {n}\n\nx{n}\n".encode()
                    )
                    for n in range(EXPORTED)
                ]
                await store.import_messages(User("alice"), batch)
                return await served(store, User("alice"))
            finally:
                await store.aclose()

        truth = asyncio.run(fill())
        config = write_config(tmp_path, pg_dsn)
        target = tmp_path / "out"
        argv = ["export", "--user", "alice", "--to", f"maildir:{target}", "-c", str(config)]

        def written() -> int:
            cur = target / "cur"
            return len(os.listdir(cur)) if cur.exists() else 0

        at_kill = kill_when(pobox(*argv), written)
        listed_at_kill = (target / "dovecot-uidlist").exists()
        again = pobox(*argv)
        _, err = again.communicate(timeout=120)
        assert (True, False, 0, EXPORTED, [], truth) == (
            0 < at_kill < EXPORTED,
            listed_at_kill,
            again.returncode,
            written(),
            os.listdir(target / "tmp"),
            asyncio.run(maildir_served(target)),
        ), err.decode()


class TestProgressBar:
    """A progress bar on a terminal, none otherwise."""

    def test_bar_on_a_terminal(self, pg_dsn: str, tmp_path: Path) -> None:
        """With standard error on a terminal, the bar names the user and counts messages."""
        source = tmp_path / "source"
        for n in range(50):
            deliver(source, f"Subject: {n}\n\nm\n".encode())
        config = write_config(tmp_path, pg_dsn)
        primary, secondary = pty.openpty()
        proc = pobox(
            "import", "--from", f"maildir:{source}", "--user", "alice", "-c", str(config),
            stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            seen += chunk
        proc.communicate(timeout=60)
        os.close(primary)
        assert (0, True, True) == (proc.returncode, b"import alice" in seen, b"/50" in seen)
