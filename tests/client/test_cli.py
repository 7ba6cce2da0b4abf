"""``pobox fetch`` on the command line: several accounts, summaries, exit codes for cron."""

from __future__ import annotations

import asyncio
import poplib
import shlex
import sys
from pathlib import Path

import pytest

from pobox.cli import main
from pobox.testing import RunningServer, running_server
from tests.client.conftest import lf, local_messages
from tests.helpers.ports import free_port

MESSAGE = b"From: a@example.test\nSubject: cli\n\nhello\n"


@pytest.fixture
async def srv(tmp_path: Path) -> RunningServer:
    """A pobox server with alice/secret and bob/hunter2."""
    async with running_server(tmp_path / "server", {"alice": "secret", "bob": "hunter2"}) as s:
        yield s


def flags(srv: RunningServer, tmp_path: Path, user: str = "alice", pw: str = "secret") -> list[str]:
    """Command-line flags for ``user`` on ``srv`` (plaintext on loopback)."""
    (tmp_path / f"{user}.pw").write_text(pw)
    return [
        "fetch",
        "--host",
        srv.host,
        "--port",
        str(srv.port),
        "--user",
        user,
        "--insecure",
        "--password-file",
        str(tmp_path / f"{user}.pw"),
        "--state-dir",
        str(tmp_path / "state"),
    ]


async def run(argv: list[str]) -> int:
    """Run ``pobox`` in a thread (the server shares the event loop)."""
    return await asyncio.to_thread(main, argv)


class TestFetchCommand:
    """The fetch subcommand."""

    async def test_two_accounts_from_a_file(
        self, srv: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One run fetches several accounts, one summary line each."""
        srv.deliver("alice", MESSAGE)
        srv.deliver("bob", MESSAGE)
        srv.deliver("bob", MESSAGE)
        (tmp_path / "bob.pw").write_text("hunter2")
        (tmp_path / "accounts.toml").write_text(
            f'[defaults]\nhost = "{srv.host}"\nport = {srv.port}\ntls = "none"\n'
            f'insecure = true\nstate_dir = "{tmp_path / "state"}"\n'
            f'[[account]]\nuser = "alice"\npassword_env = "POBOX_ALICE"\n'
            f'mbox = "{tmp_path / "alice.mbox"}"\n'
            f'[[account]]\nuser = "bob"\npassword_file = "{tmp_path / "bob.pw"}"\n'
            f'maildir = "{tmp_path / "bob"}"\n'
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("POBOX_ALICE", "secret")
            status = await run(["fetch", "--account-file", str(tmp_path / "accounts.toml")])
        size = len(MESSAGE)
        assert 0 == status
        assert (
            f"alice@127.0.0.1: fetched 1 ({size:,} bytes), deleted 1\n"
            f"bob@127.0.0.1: fetched 2 ({2 * size:,} bytes), deleted 2\n"
        ) == capsys.readouterr().out
        assert [lf(MESSAGE)] * 2 == local_messages(tmp_path / "bob")
        assert (tmp_path / "alice.mbox").read_bytes().endswith(b"\n\nhello\n\n")

    async def test_mda(self, srv: RunningServer, tmp_path: Path) -> None:
        """--mda pipes each message to the command."""
        srv.deliver("alice", MESSAGE)
        out = tmp_path / "delivered"
        script = f"import sys; open({str(out)!r}, 'ab').write(sys.stdin.buffer.read())"
        mda = shlex.join([sys.executable, "-c", script])
        assert 0 == await run([*flags(srv, tmp_path), "--quiet", "--mda", mda])
        assert lf(MESSAGE) == out.read_bytes()

    async def test_auth_failure_is_77(self, srv: RunningServer, tmp_path: Path) -> None:
        """A refused login exits with 77."""
        argv = [*flags(srv, tmp_path, pw="wrong"), "--maildir", str(tmp_path / "md")]
        assert 77 == await run(argv)

    async def test_in_use_is_75(
        self, srv: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A maildrop locked by another session ([IN-USE]) exits with 75 and says why."""
        srv.deliver("alice", MESSAGE)

        def locked_fetch() -> int:
            holder = poplib.POP3(srv.host, srv.port, timeout=10)
            try:
                holder.user("alice")
                holder.pass_("secret")
                return main([*flags(srv, tmp_path), "--maildir", str(tmp_path / "md")])
            finally:
                holder.quit()

        assert 75 == await asyncio.to_thread(locked_fetch)
        assert "in use by another session, try again later" in capsys.readouterr().err

    async def test_connection_refused_is_75(self, tmp_path: Path) -> None:
        """A server that does not answer is a temporary failure (75)."""
        port = free_port()
        (tmp_path / "pw").write_text("x")
        argv = ["fetch", "--host", "127.0.0.1", "--port", str(port), "--user", "a"]
        argv += ["--tls", "starttls", "--password-file", str(tmp_path / "pw")]
        argv += ["--maildir", str(tmp_path / "md"), "--state-dir", str(tmp_path / "st")]
        assert 75 == await run(argv)

    async def test_plaintext_without_insecure_is_78(self, tmp_path: Path) -> None:
        """--tls none without --insecure is a configuration error (78)."""
        argv = ["fetch", "--host", "h", "--user", "a", "--tls", "none"]
        argv += ["--password-env", "X", "--maildir", str(tmp_path / "md")]
        assert 78 == await run(argv)
