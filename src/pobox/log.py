"""Logging set-up, the session-scoped log prefix, and the one place log text is sanitised.

Log lines follow Dovecot's shapes so admins' tools keep working: ``pop3-login: ...`` before
login and ``pop3(USER)<SESSION>: ...`` after, ``Login: user=<...>, method=..., rip=..., lip=...,
session=<...>`` and ``Disconnected: Logged out top=N/B, retr=N/B, del=N/M, size=S``.

Theory of operation: one record, one physical line
--------------------------------------------------
A stranger controls every byte of a user name (USER, AUTH PLAIN/LOGIN, SCRAM ``n=``, ...), of
a traced command, of anything an exception message may quote.  fail2ban (and journald, and a
terminal) cut the log into lines, and fail2ban happily matches a line without a date or with
junk in front of ``pop3-login:``: a user name holding ``\\n`` and a well-shaped failure line
would get any address banned.  So every handler pobox installs formats with
:class:`SanitizingFormatter`, which guarantees that a record is written as exactly one line:

- the message, *after* ``%``-formatting, has every character that is not printable
  (``str.isprintable``: C0 controls with CR, LF, TAB and ESC, DEL, the C1 controls with NEL,
  the Unicode line and paragraph separators, bidirectional and other format characters,
  surrogates) replaced by ``?``, as Dovecot's ``str_sanitize()`` does; the cost is one
  ``isprintable()`` call for the usual all-printable line;
- exception and stack text, whose line breaks are legitimate, is folded onto the same line:
  each of its lines sanitised, joined with ``" | "``.  No part of it can begin a line.

It is done in the formatter, not at each call site, so no call site can forget it and text
from libraries (asyncio's, aiosmtpd's warnings, via the root logger) gets it too.

``log_format = "json"``: :class:`JsonFormatter` writes each record as one JSON object on one
line (``time``, ``level``, ``event``, the event's fields, ``message``: the text line).  The
events (:mod:`pobox._logevents`) put their fields on the record; :class:`SessionLog` adds the
session's (``service``, ``session``, ``user``, ``rip``, ``lip``, ``tls``, ``tls_version``).
Strings are sanitised the same way as in the text formats, so both say the same, and
:func:`json.dumps` (ASCII only) could not let a line break through even if they were not.

The log file is reopened by :func:`reopen_logs`, which ``pobox serve`` calls on ``SIGHUP`` and
``SIGUSR1`` (logrotate's ``postrotate``; see ``contrib/logrotate/pobox``).

May import: the standard library and :mod:`pobox.config`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from pobox.config import Config

__all__ = [
    "EVENT",
    "FIELDS",
    "JsonFormatter",
    "SanitizingFormatter",
    "SessionLog",
    "reopen_logs",
    "sanitize",
    "setup_logging",
]

_FORMAT: Final = "%(asctime)s %(levelname)s %(message)s"

#: What each unprintable character becomes (Dovecot's ``str_sanitize()`` writes ``?`` too).
REPLACEMENT: Final = "?"

#: How the lines of a traceback are joined on the record's one line.
FOLD: Final = " | "

#: The attributes of a log record that carry its event's name and fields (for JSON).
EVENT: Final = "pobox_event"
FIELDS: Final = "pobox_fields"

#: Level of the records from other libraries (asyncio, aiosmtpd) that reach pobox's log.
_FOREIGN_LEVEL: Final = logging.WARNING


def sanitize(text: str) -> str:
    """Return ``text`` with every unprintable character replaced by ``?``.

    "Unprintable" is what :meth:`str.isprintable` says: control characters (C0 with CR, LF,
    TAB, ESC; DEL; C1 with NEL), the line and paragraph separators U+2028/U+2029, other
    separators than the ASCII space, format characters (bidirectional overrides, zero-width
    joiners), surrogates, private-use and unassigned code points.  Nothing in the result
    can end a line or drive a terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else REPLACEMENT for c in text)


def fold(text: str) -> str:
    """Return multi-line ``text`` (a traceback) as one sanitised line, lines joined by `` | ``."""
    return FOLD.join(sanitize(line) for line in text.splitlines() if line.strip())


class SanitizingFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose every record comes out as one sanitised line."""

    #: The last second :meth:`formatTime` formatted, with its format, converter and text:
    #: a session's lines come many to the second, each ``strftime`` would be the same.
    _second: tuple[int, str | None, object, str] | None = None

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Format the record's time as :class:`logging.Formatter` does, once per second."""
        second = int(record.created)
        converter = self.converter
        cached = self._second
        if (
            cached is not None
            and cached[0] == second
            and cached[1] == datefmt
            and cached[2] is converter
        ):
            text = cached[3]
        else:
            text = time.strftime(datefmt or self.default_time_format, converter(record.created))
            self._second = (second, datefmt, converter, text)
        if datefmt or not self.default_msec_format:
            return text
        return self.default_msec_format % (text, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record``: the message sanitised, exception and stack text folded in."""
        record.message = sanitize(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info:
            line += FOLD + fold(self.formatException(record.exc_info))
        if record.stack_info:
            line += FOLD + fold(self.formatStack(record.stack_info))
        return line


def _json_value(value: object) -> object:
    """Return a field value for JSON: strings sanitised, numbers and booleans as they are."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return sanitize(value if isinstance(value, str) else str(value))


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line, for log shippers.

    Keys: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``event`` (``message`` for a
    record that is no event), ``logger``, the event's fields, ``message`` (the text line, as
    the other formats write it after their prefix) and, if any, ``exception`` (folded).
    """

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one line of JSON, every string in it sanitised."""
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": _json_value(getattr(record, EVENT, "message")),
            "logger": record.name,
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                obj.setdefault(sanitize(str(key)), _json_value(value))
        obj["message"] = sanitize(record.getMessage())
        if record.exc_info:
            obj["exception"] = fold(self.formatException(record.exc_info))
        if record.stack_info:
            obj["stack"] = fold(self.formatStack(record.stack_info))
        # ASCII only: U+2028/U+2029 and every other non-ASCII character leave as \uXXXX.
        return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))


class _ReopenableFileHandler(logging.FileHandler):
    """A file handler that opens its path afresh on :meth:`reopen` (after a log rotation)."""

    def reopen(self, opener: Callable[[], int] | None = None) -> None:
        """Close the current file and open ``baseFilename`` again (created if it is gone).

        Args:
            opener: gives a descriptor of the file open for appending, for a process that may
                not open it by path (default: open the path).
        """
        self.acquire()
        try:
            if opener is None:
                stream = self._open()
            else:
                stream = os.fdopen(opener(), "a", encoding=self.encoding, errors=self.errors)
            old, self.stream = self.stream, stream
            if old is not None:
                old.close()
        finally:
            self.release()


#: The handler :func:`setup_logging` installed last (what :func:`reopen_logs` reopens).
_installed: list[logging.Handler] = []


def setup_logging(config: Config) -> logging.Handler:
    """Send the log to ``config.log_path`` or standard error, through :class:`SanitizingFormatter`.

    pobox's own records go at ``config.log_level``; other libraries' warnings and errors (the
    root logger) go to the same place, sanitised the same way.

    Returns:
        The handler installed, for callers that must remove it again (tests).
    """
    handler: logging.Handler
    if config.log_path:
        handler = _ReopenableFileHandler(config.log_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "dovecot":
        # What syslog would have written for Dovecot, so fail2ban's stock dovecot filter
        # (and other tools reading Dovecot's log) match pobox's lines unchanged.
        fmt = f"%(asctime)s {socket.gethostname()} dovecot: %(message)s"
        handler.setFormatter(SanitizingFormatter(fmt, "%b %d %H:%M:%S"))
    elif config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(SanitizingFormatter(_FORMAT))
    pobox = logging.getLogger("pobox")
    pobox.handlers[:] = [handler]
    pobox.setLevel(config.log_level.upper())
    pobox.propagate = False
    root = logging.getLogger()
    for old in _installed:
        if old in root.handlers:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_FOREIGN_LEVEL)
    _installed[:] = [handler]
    return handler


def reopen_logs(opener: Callable[[], int] | None = None) -> bool:
    """Reopen the log file (``SIGHUP``/``SIGUSR1``), so that a rotated log is let go.

    Args:
        opener: gives a descriptor of the log file open for appending, for a server that may
            not open it by path any more (the storage helper opens it).

    Returns:
        whether there was a log file to reopen (standard error is left as it is).

    Raises:
        OSError: the file cannot be opened again (the old one stays in use).
    """
    reopened = False
    for handler in _installed:
        if isinstance(handler, _ReopenableFileHandler):
            handler.reopen(opener)
            reopened = True
    return reopened


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that puts the Dovecot-style session prefix in front of each message.

    Client-supplied text goes in as ``%s`` arguments like any other; the handler's
    :class:`SanitizingFormatter` makes the whole line safe, prefix included.

    Every line of the session names it: after login in the prefix, ``pop3(user)<session>:``
    (Dovecot's shape); before login, where the prefix is ``pop3-login:``, with
    ``, session=<...>`` at the end (last, after any client text), unless the event's text
    has its ``session=<...>`` already.  In JSON the session's fields go on every record.

    Args:
        logger: where the records go.
        session: the session id.
        rip: the client's address; ``lip``: the one it connected to.
        tls_version: the TLS version (``TLSv1.3``) when the connection is encrypted; ``""``
            when it is but the version is unknown (HAProxy did TLS and did not say);
            ``None`` for plaintext.
        tls_by: who did the TLS: ``""`` pobox itself, ``"haproxy"`` a trusted HAProxy.
    """

    def __init__(
        self,
        logger: logging.Logger,
        session: str,
        *,
        rip: str = "",
        lip: str = "",
        tls_version: str | None = None,
        tls_by: str = "",
    ) -> None:
        super().__init__(logger, {})
        self.session = session
        self.user: str | None = None
        self.rip = rip
        self.lip = lip
        self.tls_version = tls_version
        self.tls_by = tls_by

    @property
    def prefix(self) -> str:
        """``pop3-login:`` before login, ``pop3(user)<session>:`` after."""
        if self.user is None:
            return "pop3-login:"
        return f"pop3({self.user})<{self.session}>:"

    @property
    def tls(self) -> bool:
        """Whether the client's connection is encrypted (by pobox or by HAProxy)."""
        return self.tls_version is not None

    def tls_started(self, version: str | None, by: str = "") -> None:
        """Note that TLS is up now (STLS), with ``version`` (``None``: unknown)."""
        self.tls_version = version or ""
        self.tls_by = by

    @property
    def fields(self) -> dict[str, object]:
        """The session's fields every JSON record of it carries."""
        return {
            "service": "pop3" if self.user is not None else "pop3-login",
            "session": self.session,
            "user": self.user,
            "rip": self.rip,
            "lip": self.lip,
            "tls": self.tls,
            "tls_version": self.tls_version or None,
        }

    def log(  # type: ignore[override]
        self,
        level: int,
        msg: object,
        *args: object,
        event: str = "message",
        fields: Mapping[str, object] | None = None,
        names_session: bool = False,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        """Log ``msg % args`` behind the prefix, as ``event`` with ``fields`` for JSON.

        The prefix goes in as an argument, never into the format string: a user name with a
        ``%`` in it (``user%domain``) must not break the line or lose it.

        Args:
            level: the record's level.
            msg: the ``%``-format of the text.
            args: its arguments.
            event: the event's name (JSON ``event``).
            fields: the event's fields besides the session's.
            names_session: whether ``msg`` has its own ``session=<%s>`` (no suffix then).
            kwargs: what :meth:`logging.Logger.log` takes (``exc_info``, ...).
        """
        if not self.logger.isEnabledFor(level):
            return
        text = "%s " + str(msg)
        if self.user is None and not names_session:
            text += ", session=<%s>"
            args = (*args, self.session)
        extra = {EVENT: event, FIELDS: {**self.fields, **(fields or {})}}
        logger = self.logger
        if kwargs:  # exc_info, stack_info, stacklevel: logging's own way
            logger.log(level, text, self.prefix, *args, extra=extra, **kwargs)
            return
        # The record logging makes without looking for the caller's frame (as with
        # ``logging._srcfile = None``): no format pobox installs names the caller.
        logger.handle(
            logger.makeRecord(
                logger.name,
                level,
                "(unknown file)",
                0,
                text,
                (self.prefix, *args),
                None,
                "(unknown function)",
                extra,
            )
        )
