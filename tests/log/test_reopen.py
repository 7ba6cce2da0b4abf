"""The log file let go on SIGHUP/SIGUSR1, and rotated by the real logrotate, on ``pobox serve``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import need
from tests.helpers.process import ServeProcess, pobox_serve
from tests.integration.wire import Wire

ROOT = Path(__file__).resolve().parents[2]
LOGROTATE = ROOT / "contrib" / "logrotate" / "pobox"


async def fail_login(proc: ServeProcess, user: bytes) -> None:
    """Fail one login as ``user`` on a connection of its own."""
    w = await Wire.connect("127.0.0.1", proc.port)
    await w.line()
    await w.command(b"USER " + user)
    await w.command(b"PASS wrong")
    await w.send(b"QUIT\r\n")
    await w.read_all()
    await w.close()


class TestReopen:
    """A signal makes pobox write to a new file at log_path."""

    @pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1])
    async def test_moved_log_is_let_go(self, tmp_path: Path, sig: signal.Signals) -> None:
        """After the file is moved and the signal sent, new lines land in a new file."""
        async with pobox_serve(tmp_path) as proc:
            await fail_login(proc, b"before")
            await proc.wait_log(r"Disconnected \(auth failed.*user=<before>")
            rotated = proc.log.rename(proc.log.with_name("pobox.log.1"))
            await fail_login(proc, b"moved")  # still written to the moved file
            await proc.wait_log(r"user=<moved>", rotated)
            proc.signal(sig)
            await proc.wait_log(r"master: log file reopened")
            await fail_login(proc, b"after")
            await proc.wait_log(r"Disconnected \(auth failed.*user=<after>")
            new, old = proc.log.read_text(), rotated.read_text()

        assert "user=<after>" not in old
        assert "user=<before>" not in new
        assert "user=<moved>" not in new

    async def test_sighup_still_reloads_tls(self, tmp_path: Path) -> None:
        """SIGHUP without TLS configured reopens the log and the server keeps serving."""
        async with pobox_serve(tmp_path) as proc:
            proc.signal(signal.SIGHUP)
            await proc.wait_log(r"master: log file reopened")
            await fail_login(proc, b"later")
            line = await proc.wait_log(r"Disconnected \(auth failed.*user=<later>")

        assert "rip=127.0.0.1" in line


@pytest.mark.external
class TestLogrotate:
    """contrib/logrotate/pobox, run by the real logrotate against a running pobox."""

    async def test_rotation(self, tmp_path: Path) -> None:
        """logrotate moves the log, creates the new one, signals pobox; pobox writes there."""
        async with pobox_serve(tmp_path / "srv") as proc:
            await fail_login(proc, b"before")
            await proc.wait_log(r"user=<before>")
            config = LOGROTATE.read_text()
            assert "/var/log/pobox/pobox.log {" in config
            signal_line = "systemctl kill --kill-whom=main --signal=USR1 pobox.service"
            assert signal_line in config
            # The same file, for this log and this process (the test has no systemd unit).
            config = config.replace("/var/log/pobox/pobox.log", str(proc.log))
            config = config.replace(signal_line, f"kill -USR1 {proc.proc.pid}")
            (tmp_path / "pobox.logrotate").write_text(config)
            result = await asyncio.to_thread(
                subprocess.run,
                [need("logrotate"), "-f", "-s", str(tmp_path / "state"), "pobox.logrotate"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert 0 == result.returncode, result.stderr
            await proc.wait_log(r"master: log file reopened")
            await fail_login(proc, b"after")
            await proc.wait_log(r"user=<after>")
            rotated = proc.log.with_name("pobox.log.1").read_text()
            mode = proc.log.stat().st_mode & 0o777

        assert "user=<before>" in rotated
        assert "user=<after>" not in rotated
        assert 0o640 == mode
