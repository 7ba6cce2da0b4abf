"""Local destinations: Maildir, mbox (From_ lines, mboxrd quoting) and MDA commands."""

from __future__ import annotations

import mailbox
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.client import MaildirSink, MboxSink, MdaSink
from pobox.client._sinks import DeliveryError, DeliveryTemporaryError

MESSAGE = (
    b"Return-Path: <bounce@example.test>\n"
    b"From: a@example.test\n"
    b"Subject: quoting\n"
    b"\n"
    b"From the start of a line\n"
    b">From an already quoted line\n"
    b"not From here\n"
)


def store(sink: MaildirSink | MboxSink | MdaSink, data: bytes) -> None:
    """Store ``data`` through ``sink`` in two pieces."""
    delivery = sink.begin()
    delivery.write(data[:10])
    delivery.write(data[10:])
    delivery.commit()


class TestMaildirSink:
    """MaildirSink writes into tmp/ and renames into new/."""

    def test_commit_lands_in_new(self, tmp_path: Path) -> None:
        """A committed message is in new/ and tmp/ is empty."""
        store(MaildirSink(tmp_path / "md"), MESSAGE)
        assert [MESSAGE] == [p.read_bytes() for p in (tmp_path / "md" / "new").iterdir()]
        assert [] == list((tmp_path / "md" / "tmp").iterdir())

    def test_abort_leaves_nothing(self, tmp_path: Path) -> None:
        """An aborted message leaves neither a file in tmp/ nor one in new/."""
        delivery = MaildirSink(tmp_path / "md").begin()
        delivery.write(b"partial")
        delivery.abort()
        assert [] == list((tmp_path / "md" / "tmp").iterdir())
        assert [] == list((tmp_path / "md" / "new").iterdir())


class TestMboxSink:
    """MboxSink appends with a From_ line and mboxrd quoting."""

    def test_from_line_and_quoting(self, tmp_path: Path) -> None:
        """The From_ line names the Return-Path sender; From lines in the body get a '>'."""
        path = tmp_path / "box"
        store(MboxSink(path), MESSAGE)
        text = path.read_bytes()
        assert text.startswith(b"From bounce@example.test ")
        assert (
            b"\n\n>From the start of a line\n>>From an already quoted line\nnot From here\n\n"
            in text
        )

    def test_stdlib_reads_the_messages_back(self, tmp_path: Path) -> None:
        """Two appended messages read back with the standard library's mbox parser."""
        path = tmp_path / "box"
        second = b"From: b@example.test\nSubject: two\n\nsecond\n"
        store(MboxSink(path), MESSAGE)
        store(MboxSink(path), second)
        box = mailbox.mbox(path)
        try:
            subjects = [m["Subject"] for m in box]
            senders = [m.get_from().split()[0] for m in box]
            assert second == box.get_bytes(1).rstrip(b"\n") + b"\n"
        finally:
            box.close()
        assert ["quoting", "two"] == subjects
        assert ["bounce@example.test", "MAILER-DAEMON"] == senders


def mda(tmp_path: Path, status: int = 0) -> MdaSink:
    """An MDA command that appends stdin to tmp_path/delivered, then exits with ``status``."""
    script = (
        "import sys; d = sys.stdin.buffer.read(); "
        f"open({str(tmp_path / 'delivered')!r}, 'ab').write(d); sys.exit({status})"
    )
    return MdaSink(shlex.join([sys.executable, "-c", script]))


class TestMdaSink:
    """MdaSink runs the command with the message on its standard input."""

    def test_message_on_stdin(self, tmp_path: Path) -> None:
        """Exit status 0: the command received the whole message."""
        store(mda(tmp_path), MESSAGE)
        assert MESSAGE == (tmp_path / "delivered").read_bytes()

    def test_tempfail_is_temporary(self, tmp_path: Path) -> None:
        """Exit status 75 (EX_TEMPFAIL) is a temporary failure."""
        with pytest.raises(DeliveryTemporaryError, match="status 75"):
            store(mda(tmp_path, 75), MESSAGE)

    def test_other_status_fails(self, tmp_path: Path) -> None:
        """Any other non-zero status is a failure."""
        with pytest.raises(DeliveryError, match="status 1"):
            store(mda(tmp_path, 1), MESSAGE)

    def test_pobox_deliver_without_pobox_on_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--mda 'pobox deliver -u alice' works with an MTA's short PATH: this pobox runs."""
        add_user(tmp_path / "passwd", "alice", b"x", scheme="PLAIN")
        (tmp_path / "pobox.toml").write_text(
            f'mail_location = "maildir:{tmp_path}/mail/%u"\n'
            f'passwd_file = "{tmp_path}/passwd"\n'
            'mail_uid = "0"\nmail_gid = "0"\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n'
        )
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        assert shutil.which("pobox") is None
        store(MdaSink(f"pobox deliver -u Alice -c {tmp_path}/pobox.toml"), MESSAGE)
        [delivered] = list((tmp_path / "mail" / "alice" / "new").iterdir())
        assert delivered.read_bytes().endswith(MESSAGE)
