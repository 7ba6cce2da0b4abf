"""``pobox serve`` starts the LMTP listener configured in its TOML file."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from pathlib import Path

from pobox.auth.passwdfile import add_user
from tests.helpers.accounts import ROOT_MAIL_SETTINGS

#: How long pobox may take to start (a deadline for the start-up, not a timed assertion).
_START_DEADLINE = 30.0


class TestServeStartsLmtp:
    """The composition root wires the delivery listeners."""

    def test_lmtp_on_unix_socket(self, tmp_path: Path) -> None:
        """A message sent to the configured LMTP socket lands in the user's maildir."""
        add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
        socket_path = tmp_path / "lmtp.sock"
        config = tmp_path / "pobox.toml"
        config.write_text(
            'listen = ["127.0.0.1:0"]\n'
            f'lmtp_listen = ["unix:{socket_path}"]\n'
            f'mail_location = "maildir:{tmp_path}/mail/%u"\n'
            f'passwd_file = "{tmp_path / "passwd"}"\n' + ROOT_MAIL_SETTINGS
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "pobox", "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + _START_DEADLINE
            while not socket_path.exists() and process.poll() is None:
                assert time.monotonic() < deadline, "pobox serve did not create the socket"
                time.sleep(0.05)
            client = smtplib.LMTP(str(socket_path))
            try:
                refused = client.sendmail("s@example.org", ["alice"], b"Subject: hi\r\n\r\nhi\r\n")
            finally:
                client.quit()
        finally:
            process.terminate()
            process.wait(10)
        files = list((tmp_path / "mail" / "alice" / "new").iterdir())
        assert {} == refused
        assert [b"Return-Path: <s@example.org>\nDelivered-To: alice\nSubject: hi\n\nhi\n"] == [
            path.read_bytes() for path in files
        ]
        assert 0 == process.returncode
        assert not socket_path.exists()
