"""Events: what the core asks of the shell, and what the shell tells the core.

Events are frozen noun dataclasses ("don't subclass these", as h11 says).  The core answers
STAT, LIST, UIDL, DELE, RSET, NOOP, CAPA and bad input on its own, from the snapshot it got
with :class:`LoginAccepted`; only what needs I/O reaches the shell:

=========================  ================================================================
core → shell               shell → core (answer)
=========================  ================================================================
:class:`AuthenticateUser`  :class:`LoginAccepted` or :class:`LoginRejected`
:class:`RetrieveMessage`   :class:`MessageData`\\* then :class:`EndOfMessage`, or
                           :class:`MessageUnavailable`
:class:`CommitDeletions`   :class:`DeletionsCommitted`
:class:`ConnectionClosed`  (none: the shell flushes and closes)
:class:`Trace`             (none: only with ``trace=True``, for the ``--trace`` log)
=========================  ================================================================

May import: the standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

__all__ = [
    "FLUSH",
    "NEED_DATA",
    "PAUSED",
    "AuthenticateUser",
    "CommitDeletions",
    "ConnectionClosed",
    "DeletionsCommitted",
    "EndOfMessage",
    "Event",
    "LoginAccepted",
    "LoginRejected",
    "MessageData",
    "MessageUnavailable",
    "RetrieveMessage",
    "SnapshotEntry",
    "Trace",
]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"
    FLUSH = "FLUSH"


#: No complete command is buffered: read from the peer and call ``receive_data``.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: The core waits for the shell's answer to the last event; ``send`` it first.
PAUSED: Final = _Sentinel.PAUSED
#: Output is piling up (pipelined commands): write ``data_to_send()`` before going on.
FLUSH: Final = _Sentinel.FLUSH


class SnapshotEntry(Protocol):
    """What the core needs of each message in the snapshot (a storage ``MessageInfo``)."""

    @property
    def size(self) -> int:
        """Octets on the wire (CRLF line ends, before byte-stuffing)."""

    @property
    def uidl(self) -> str:
        """The RFC 1939 unique-id."""


# ----------------------------------------------------------------------- core → shell


@dataclass(frozen=True, slots=True)
class AuthenticateUser:
    """USER/PASS given: verify them, open the maildrop, answer with a Login* event."""

    username: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RetrieveMessage:
    """Stream message ``number`` (1-based) with MessageData/EndOfMessage.

    ``body_lines`` is ``None`` for RETR and the TOP line count otherwise; the core cuts the
    message itself, the shell may stop early once ``wants_message_data`` turns false.
    """

    number: int
    body_lines: int | None = None


@dataclass(frozen=True, slots=True)
class CommitDeletions:
    """QUIT in TRANSACTION: remove these messages (1-based numbers), then answer."""

    numbers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over: flush ``data_to_send()`` and close the connection.

    ``reason`` is one of ``"quit"``, ``"eof"``, ``"too-many-bad-commands"``,
    ``"message-failed"``.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class Trace:
    """A line of the dialogue for the ``--trace`` log; ``direction`` is ``"C"`` or ``"S"``.

    Passwords are already masked.
    """

    direction: str
    line: str


# ----------------------------------------------------------------------- shell → core


@dataclass(frozen=True, slots=True)
class LoginAccepted:
    """The credentials are good and the maildrop is open and locked."""

    messages: Sequence[SnapshotEntry]


@dataclass(frozen=True, slots=True)
class LoginRejected:
    """The login failed; ``text`` follows ``-ERR [resp_code]`` in the reply."""

    text: str = "Authentication failed."
    resp_code: str | None = "AUTH"


@dataclass(frozen=True, slots=True)
class MessageData:
    """A chunk of the stored message, in order, any size, line endings LF or CRLF."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The stored message is complete."""


@dataclass(frozen=True, slots=True)
class MessageUnavailable:
    """The message could not be read; before any MessageData only."""

    text: str = "Message is no longer available."
    resp_code: str | None = "SYS/TEMP"


@dataclass(frozen=True, slots=True)
class DeletionsCommitted:
    """UPDATE done; ``failed`` messages could not be removed."""

    failed: int = 0


Event = AuthenticateUser | RetrieveMessage | CommitDeletions | ConnectionClosed | Trace
