"""Logging set-up and the session-scoped log prefix, with secrets kept out of the log.

Log lines follow Dovecot's shapes so admins' tools keep working: ``pop3-login: ...`` before
login and ``pop3(USER)<SESSION>: ...`` after, ``Login: user=<...>, method=..., rip=..., lip=...,
session=<...>`` and ``Disconnected: Logged out top=N/B, retr=N/B, del=N/M, size=S``.

May import: the standard library and :mod:`pobox.config`.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import MutableMapping
from typing import Any

from pobox.config import Config

__all__ = ["SessionLog", "setup_logging"]

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(config: Config) -> None:
    """Send pobox's log to ``config.log_path`` or standard error at ``config.log_level``."""
    handler: logging.Handler
    if config.log_path:
        handler = logging.FileHandler(config.log_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "dovecot":
        # What syslog would have written for Dovecot, so fail2ban's stock dovecot filter
        # (and other tools reading Dovecot's log) match pobox's lines unchanged.
        fmt = f"%(asctime)s {socket.gethostname()} dovecot: %(message)s"
        handler.setFormatter(logging.Formatter(fmt, "%b %d %H:%M:%S"))
    else:
        handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger("pobox")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that puts the Dovecot-style session prefix in front of each message."""

    def __init__(self, logger: logging.Logger, session: str) -> None:
        super().__init__(logger, {})
        self.session = session
        self.user: str | None = None

    @property
    def prefix(self) -> str:
        """``pop3-login:`` before login, ``pop3(user)<session>:`` after."""
        if self.user is None:
            return "pop3-login:"
        return f"pop3({self.user})<{self.session}>:"

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:  # noqa: ANN401
        """Prefix the message."""
        return f"{self.prefix} {msg}", kwargs
