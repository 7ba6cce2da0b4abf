"""The pobox command, run for real: demo, serve, user add/passwd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.cli import main
from tests.helpers.accounts import ALICE, system_user
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.ports import free_port

from ..integration.wire import Wire


async def wait_for_port(port: int, proc: asyncio.subprocess.Process) -> None:
    """Wait until something listens on ``port`` (bounded), failing if the process died."""
    for _ in range(200):
        if proc.returncode is not None:
            pytest.fail(f"pobox exited early with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    pytest.fail(f"nothing listening on {port}")


async def start(*args: str, cwd: Path) -> asyncio.subprocess.Process:
    """Start ``python -m pobox ARGS`` in ``cwd``."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pobox", *args,
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, bytes]:
    """SIGTERM the process we started and return its exit code and stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err


class TestDemo:
    """``pobox demo``: the one-command start of README.md."""

    async def test_seed_session_over_telnet_bytes(self, tmp_path: Path) -> None:
        """The demo serves user demo/demo with 3 messages, like the seeds' telnet session."""
        port = free_port()
        proc = await start("demo", "--dir", "demo", "--port", str(port), cwd=tmp_path)
        try:
            await wait_for_port(port, proc)
            w = await Wire.connect("127.0.0.1", port)
            assert b"+OK pobox ready.\r\n" == await w.line()
            assert b"+OK\r\n" == await w.command(b"USER demo")
            assert b"+OK Logged in.\r\n" == await w.command(b"PASS demo")
            assert (await w.command(b"STAT")).startswith(b"+OK 3 ")
            await w.send(b"LIST\r\n")
            assert 3 == (await w.multiline()).count(b"\r\n") - 2
            await w.send(b"RETR 3\r\n")
            assert b"Subject: Telnet email\r\n" in await w.multiline()
            assert b"+OK Message 3 marked to be deleted.\r\n" == await w.command(b"DELE 3")
            assert b"+OK Logging out.\r\n" == await w.command(b"QUIT")
        finally:
            code, err = await stop(proc)
        assert 0 == code, err
        assert b"Login: user=<demo>" in err
        assert b"(event loop uvloop)" in err  # event_loop = "auto" picks uvloop when installed
        assert 2 == len(list((tmp_path / "demo" / "mail" / "demo" / "new").iterdir())) + len(
            list((tmp_path / "demo" / "mail" / "demo" / "cur").iterdir())
        )

    async def test_restart_keeps_state_and_reset_restores(self, tmp_path: Path) -> None:
        """A second start reuses the folder; --reset brings the 3 messages back."""
        for args, expected in (((), 3), (("--reset",), 3)):
            port = free_port()
            proc = await start("demo", "--dir", "d", "--port", str(port), *args, cwd=tmp_path)
            try:
                await wait_for_port(port, proc)
                w = await Wire.connect("127.0.0.1", port)
                await w.login(b"demo", b"demo")
                assert (await w.command(b"STAT")).startswith(b"+OK %d " % expected)
                await w.command(b"DELE 1")
                await w.command(b"QUIT")
            finally:
                await stop(proc)


class TestServe:
    """``pobox serve`` with flags only, no config file."""

    async def test_flags_only(self) -> None:
        """--listen, --mail-location and --passwd-file are enough to serve.

        Started as root (as in CI), carol's mail belongs to an unprivileged user
        (``user add --uid``), which the server accesses it as.
        """
        with searchable_tmpdir() as folder:
            passwd = folder / "passwd"
            owner: list[str] = []
            expected_uid = os.geteuid()
            if os.geteuid() == 0:
                alice = system_user(ALICE)
                owner, expected_uid = ["--uid", alice.name], alice.uid
                (folder / "mail").mkdir()
                os.chown(folder / "mail", alice.uid, alice.gid)  # where carol's maildir is made
            assert 0 == main(["user", "add", "carol", "-f", str(passwd), "--scheme", "PLAIN",
                              "--password-file", str(self._pw(folder, "pw")), *owner])  # fmt: skip
            port = free_port()
            proc = await start(
                "serve", "--listen", f"127.0.0.1:{port}",
                "--mail-location", f"maildir:{folder}/mail/%u", "--passwd-file", str(passwd),
                cwd=folder,
            )  # fmt: skip
            try:
                await wait_for_port(port, proc)
                w = await Wire.connect("127.0.0.1", port)
                await w.login(b"carol", b"pw")
                assert b"+OK 0 0\r\n" == await w.command(b"STAT")
                await w.command(b"QUIT")
            finally:
                code, _ = await stop(proc)
            maildir = folder / "mail" / "carol"
            assert 0 == code
            assert (maildir / "new").is_dir()
            assert expected_uid == maildir.stat().st_uid

    def test_config_error_names_key(self, tmp_path: Path) -> None:
        """A bad config file stops the start with exit 78 and the key's name."""
        cfg = tmp_path / "bad.toml"
        cfg.write_text("idle_timeout = 'soon'\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pobox", "serve", "-c", str(cfg)],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert 78 == proc.returncode
        assert b"idle_timeout: expected float" in proc.stderr

    def test_missing_passwd_file(self, tmp_path: Path) -> None:
        """A passwd_file that does not exist is reported before serving."""
        proc = subprocess.run(
            [sys.executable, "-m", "pobox", "serve", "--listen", "127.0.0.1:0",
             "--passwd-file", str(tmp_path / "none")],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert 78 == proc.returncode
        assert b"passwd_file:" in proc.stderr

    @staticmethod
    def _pw(tmp_path: Path, password: str) -> Path:
        path = tmp_path / "password.txt"
        path.write_text(password + "\n")
        return path


class TestUserCommands:
    """``pobox user add`` and ``pobox user passwd``."""

    async def test_add_then_passwd(self, tmp_path: Path) -> None:
        """add writes an ARGON2ID entry; passwd replaces it; both verify."""
        passwd = tmp_path / "passwd"
        pw = tmp_path / "pw"
        pw.write_text("first\n")
        assert 0 == main(["user", "add", "dave", "-f", str(passwd), "--password-file", str(pw)])
        assert passwd.read_text().startswith("dave:{ARGON2ID}$argon2id$")
        assert 0o600 == passwd.stat().st_mode & 0o777
        auth = PasswdFileAuthenticator(str(passwd))
        assert await auth.authenticate("dave", b"first") is not None
        pw.write_text("second\n")
        os.utime(passwd, (0, 0))  # make the change visible even within one second
        assert 0 == main(["user", "passwd", "dave", "-f", str(passwd), "--password-file", str(pw)])
        auth = PasswdFileAuthenticator(str(passwd))
        assert await auth.authenticate("dave", b"second") is not None
        assert await auth.authenticate("dave", b"first") is None

    def test_passwd_unknown_user(self, tmp_path: Path) -> None:
        """Changing the password of a user who does not exist fails with exit 65."""
        passwd = tmp_path / "passwd"
        passwd.write_text("")
        pw = tmp_path / "pw"
        pw.write_text("x\n")
        assert 65 == main(["user", "passwd", "eve", "-f", str(passwd), "--password-file", str(pw)])
