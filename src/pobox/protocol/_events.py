"""Events: what the core asks of the shell, and what the shell tells the core.

Events are frozen noun dataclasses ("don't subclass these", as h11 says).  The core answers
STAT, LIST, UIDL, DELE, RSET, NOOP, CAPA and bad input on its own, from the snapshot it got
with :class:`LoginAccepted`; only what needs I/O reaches the shell:

=========================  ================================================================
core → shell               shell → core (answer)
=========================  ================================================================
:class:`AuthenticateUser`  :class:`LoginAccepted` or :class:`LoginRejected`
:class:`FetchSecret`       :class:`SecretFound` (or :class:`LoginRejected`)
:class:`VerifyToken`       :class:`LoginAccepted` or :class:`LoginRejected`
:class:`OpenMaildrop`      :class:`LoginAccepted` or :class:`LoginRejected`
:class:`LoginFailed`       :class:`LoginRejected`
:class:`RetrieveMessage`   :class:`MessageData`\\* or :class:`WireData`\\* then
                           :class:`EndOfMessage` (or a last ``MessageData(last=True)``),
                           or :class:`MessageUnavailable`
:class:`CommitDeletions`   :class:`DeletionsCommitted`
:class:`StartTLS`          :class:`TlsStarted` (or ``close()`` if the handshake failed)
:class:`ConnectionClosed`  (none: the shell flushes and closes)
:class:`Trace`             (none: only with ``trace=True``, for the ``--trace`` log)
=========================  ================================================================

May import: the standard library and :mod:`pobox.protocol._sasl`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from pobox.protocol._sasl import Secret

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
    "FetchSecret",
    "LoginAccepted",
    "LoginFailed",
    "LoginRejected",
    "MessageData",
    "MessageUnavailable",
    "OpenMaildrop",
    "RetrieveMessage",
    "SecretFound",
    "SnapshotEntry",
    "StartTLS",
    "TlsStarted",
    "Trace",
    "VerifyToken",
    "WireData",
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
    #: How the password came: ``"PLAIN"`` for USER/PASS (as Dovecot logs it) and AUTH PLAIN,
    #: ``"LOGIN"`` for AUTH LOGIN.
    mechanism: str = "PLAIN"


@dataclass(frozen=True, slots=True)
class FetchSecret:
    """AUTH CRAM-MD5/SCRAM-* or APOP: answer with :class:`SecretFound` (or LoginRejected)."""

    username: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """AUTH OAUTHBEARER/XOAUTH2: verify the bearer token for the user, open the maildrop,
    and answer with a Login* event."""

    username: str
    token: str = field(repr=False)
    mechanism: str


@dataclass(frozen=True, slots=True)
class OpenMaildrop:
    """The core verified the client's proof (SCRAM, CRAM-MD5, APOP, EXTERNAL): open the
    user's maildrop and answer with a Login* event."""

    username: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """The client's proof was wrong or malformed: log it, delay, answer LoginRejected.

    ``username`` is ``None`` when the client's message was too malformed to name one;
    ``reason`` is for the log only.
    """

    username: str | None
    mechanism: str
    reason: str


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
class StartTLS:
    """STLS accepted (RFC 2595 §4): write ``data_to_send()``, then do the TLS handshake.

    The core has already thrown away every byte the client sent after ``STLS``; the shell
    must feed it nothing more that was read before the handshake.  ``discarded`` counts the
    bytes dropped, for the log.
    """

    discarded: int = 0


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
    """The credentials are good and the maildrop is open and locked.

    ``expire`` and ``login_delay`` are the user's RFC 2449 EXPIRE argument (digits or
    ``NEVER``) and LOGIN-DELAY seconds that CAPA shows from now on (``None``: not shown).
    """

    messages: Sequence[SnapshotEntry]
    expire: str | None = None
    login_delay: int | None = None


@dataclass(frozen=True, slots=True)
class LoginRejected:
    """The login failed; ``text`` follows ``-ERR [resp_code]`` in the reply."""

    text: str = "Authentication failed."
    resp_code: str | None = "AUTH"


@dataclass(frozen=True, slots=True)
class SecretFound:
    """The answer to :class:`FetchSecret`: what is stored, or ``None`` for no such user."""

    secret: Secret | None


@dataclass(frozen=True, slots=True)
class MessageData:
    """A chunk of the stored message, in order, any size, line endings LF or CRLF.

    ``last``: this chunk ends the message, and the core ends it as :class:`EndOfMessage`
    would (a small message read whole is answered with one event).
    """

    data: bytes
    last: bool = False


@dataclass(frozen=True, slots=True)
class WireData:
    """The shell sends the next ``octets`` octets of the message itself (``sendfile``).

    They go out right after the bytes :meth:`~pobox.protocol.ServerConnection.data_to_send`
    returns once this is given (the reply line, for the first), exactly as stored: the shell
    vouches that they are in wire form already (every LF after a CR, no line starting with a
    dot) and that ``ends_line`` says whether they end with CRLF.  RETR only (TOP cuts lines),
    without client workarounds (they change octets), and never after a chunk that ended
    with a CR (:class:`MessageData`): else :class:`~pobox.protocol.LocalProtocolError`.
    """

    octets: int
    ends_line: bool


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The stored message is complete."""


@dataclass(frozen=True, slots=True)
class MessageUnavailable:
    """The message could not be read; before any MessageData only."""

    text: str = "Message is no longer available."
    resp_code: str | None = "SYS/TEMP"


@dataclass(frozen=True, slots=True)
class TlsStarted:
    """The TLS handshake after STLS succeeded; the session starts over (RFC 2595 §4).

    ``user_enabled`` is the new value of :attr:`ServerConnection.user_enabled`: whether
    plaintext logins are allowed now that the connection is encrypted.
    """

    user_enabled: bool = True


@dataclass(frozen=True, slots=True)
class DeletionsCommitted:
    """UPDATE done; ``failed`` messages could not be removed."""

    failed: int = 0


Event = (
    AuthenticateUser
    | FetchSecret
    | VerifyToken
    | OpenMaildrop
    | LoginFailed
    | RetrieveMessage
    | CommitDeletions
    | StartTLS
    | ConnectionClosed
    | Trace
)
