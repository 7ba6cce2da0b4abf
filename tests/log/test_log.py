"""The sanitising formatter, the session prefix and the reopenable log file, in-process."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from pobox.config import Config
from pobox.log import SanitizingFormatter, SessionLog, reopen_logs, sanitize, setup_logging


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    """A log record as a logger makes it; with the exception being handled if ``exc``."""
    return logging.LogRecord(
        "pobox.test", logging.INFO, __file__, 1, msg, args, sys.exc_info() if exc else None
    )


class TestSanitize:
    """sanitize()."""

    @pytest.mark.parametrize(
        "char",
        [
            *("\n", "\r", "\t", "\0", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029"),
            *("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\u202e", "\u200b", "\ud800", "\ue000"),
        ],
    )
    def test_unprintable_becomes_question_mark(self, char: str) -> None:
        """Controls, separators, format characters and surrogates each become one ?."""
        assert "a?b" == sanitize(f"a{char}b")

    def test_printable_text_unchanged(self) -> None:
        """Printable text, non-ASCII letters and the ASCII space included, is kept."""
        text = "user=<jörg@例え.jp>, method=PLAIN, rip=::1"
        assert text == sanitize(text)

    def test_ansi_sequence_defused(self) -> None:
        """An ANSI escape sequence loses its ESC, so a terminal shows it as text."""
        assert "?[2K?[31mred" == sanitize("\x1b[2K\x1b[31mred")


class TestSanitizingFormatter:
    """SanitizingFormatter."""

    def test_arguments_sanitised(self) -> None:
        """A client string passed as an argument cannot break the line."""
        line = SanitizingFormatter("%(message)s").format(record("user=<%s>", "a\nb\rc"))
        assert "user=<a?b?c>" == line

    def test_format_string_sanitised_too(self) -> None:
        """An f-string message (no arguments) is sanitised as well."""
        line = SanitizingFormatter("%(levelname)s %(message)s").format(record("x\u2028y"))
        assert "INFO x?y" == line

    def test_exception_folded_on_one_line(self) -> None:
        """A traceback, forged lines in its message included, stays on the record's line."""
        try:
            raise ValueError("bad\npop3-login: Authentication failed: rip=192.0.2.1\r\nx")
        except ValueError:
            line = SanitizingFormatter("%(message)s").format(record("failed", exc=True))

        assert "\n" not in line
        assert "\r" not in line
        assert line.startswith("failed | Traceback (most recent call last): | ")
        assert line.endswith(
            " | ValueError: bad | pop3-login: Authentication failed: rip=192.0.2.1 | x"
        )

    def test_stack_info_folded(self) -> None:
        """Stack text is folded the same way."""
        rec = record("here")
        rec.stack_info = "Stack (most recent call last):\n  File 'a'\n    f()"
        line = SanitizingFormatter("%(message)s").format(rec)
        assert "here | Stack (most recent call last): |   File 'a' |     f()" == line


class TestFormatTime:
    """SanitizingFormatter.formatTime: what logging.Formatter writes, strftime once a second."""

    @pytest.mark.parametrize("datefmt", [None, "%b %d %H:%M:%S"])
    def test_same_as_logging(self, datefmt: str | None) -> None:
        """Records within a second and across seconds get logging's own time text."""
        ours = SanitizingFormatter("%(asctime)s", datefmt)
        theirs = logging.Formatter("%(asctime)s", datefmt)
        start = 1_767_225_599.0  # a second before a new year (UTC)
        for offset in (0.001, 0.5, 0.999, 1.0, 1.25, 2.5, 0.75, 86_400.2):
            rec = record("x")
            rec.created = start + offset
            assert theirs.formatTime(rec, datefmt) == ours.formatTime(rec, datefmt)
        other = "%d/%m/%Y %H" if datefmt else None  # the one formatter asked another format
        assert theirs.formatTime(rec, other) == ours.formatTime(rec, other)

    def test_converter_change(self) -> None:
        """A formatter given another ``converter`` (another zone) writes its time at once."""
        ours = SanitizingFormatter("%(asctime)s")
        ours.converter = time.gmtime
        rec = record("x")
        rec.created, rec.msecs = 1_767_225_599.5, 500.0
        assert "2025-12-31 23:59:59,500" == ours.formatTime(rec)
        ours.converter = lambda secs: time.gmtime(None if secs is None else secs + 3600)
        assert "2026-01-01 00:59:59,500" == ours.formatTime(rec)


class TestSessionLog:
    """SessionLog."""

    def test_percent_in_user_name(self, caplog: pytest.LogCaptureFixture) -> None:
        """A user name with % in it is logged as it is, the arguments still formatted."""
        log = SessionLog(logging.getLogger("pobox.test"), "SID")
        log.user = "a%sb%d"
        with caplog.at_level(logging.INFO, logger="pobox.test"):
            log.info("Disconnected: %s", "Logged out")
        assert ["pop3(a%sb%d)<SID>: Disconnected: Logged out"] == caplog.messages

    def test_prefix_before_login(self, caplog: pytest.LogCaptureFixture) -> None:
        """Before login the prefix is pop3-login:, the session id last; the message is kept."""
        log = SessionLog(logging.getLogger("pobox.test"), "SID")
        with caplog.at_level(logging.INFO, logger="pobox.test"):
            log.info("Closing the maildrop failed")
        assert ["pop3-login: Closing the maildrop failed, session=<SID>"] == caplog.messages


@pytest.fixture
def restore_logging() -> object:
    """Put the pobox and root loggers back as they were after the test."""
    pobox, root = logging.getLogger("pobox"), logging.getLogger()
    saved = (pobox.handlers[:], pobox.level, pobox.propagate, root.handlers[:], root.level)
    yield
    for handler in {*pobox.handlers, *root.handlers} - {*saved[0], *saved[3]}:
        handler.close()
    pobox.handlers[:], pobox.level, pobox.propagate = saved[:3]
    root.handlers[:], root.level = saved[3:]


@pytest.mark.usefixtures("restore_logging")
class TestSetupLogging:
    """setup_logging() and reopen_logs()."""

    def test_reopen(self, tmp_path: Path) -> None:
        """After the file is moved, reopen_logs() makes the next line go to a new file."""
        log = tmp_path / "pobox.log"
        setup_logging(Config(log_path=str(log)))
        logger = logging.getLogger("pobox.test")
        logger.info("one")
        log.rename(tmp_path / "pobox.log.1")

        assert reopen_logs()
        logger.info("two")

        assert log.read_text().endswith(" INFO two\n")
        assert (tmp_path / "pobox.log.1").read_text().endswith(" INFO one\n")

    def test_reopen_failure_keeps_the_old_file(self, tmp_path: Path) -> None:
        """When the path cannot be opened again, the error says so and the old file stays."""
        folder = tmp_path / "logs"
        folder.mkdir()
        setup_logging(Config(log_path=str(folder / "pobox.log")))
        (folder / "pobox.log").rename(tmp_path / "moved.log")
        folder.rmdir()

        with pytest.raises(FileNotFoundError):
            reopen_logs()
        logging.getLogger("pobox.test").warning("still here")

        assert (tmp_path / "moved.log").read_text().endswith(" WARNING still here\n")

    def test_no_file_nothing_to_reopen(self) -> None:
        """Logging to standard error, there is nothing to reopen."""
        setup_logging(Config())
        assert not reopen_logs()

    def test_foreign_warnings_sanitised(self, tmp_path: Path) -> None:
        """Another library's warning reaches the same file through the same formatter."""
        log = tmp_path / "pobox.log"
        setup_logging(Config(log_path=str(log)))
        logging.getLogger("mail.log").warning("peer said %s", "a\nb")
        logging.getLogger("mail.log").info("not at this level")

        assert log.read_text().endswith(" WARNING peer said a?b\n")
        assert "not at this level" not in log.read_text()
