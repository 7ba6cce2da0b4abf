"""The DATA phase of SMTP and LMTP as a pure decoder: wire lines in, message octets out.

RFC 5321 §4.5.2: a line holding a single ``.`` ends the message, and a line starting with
``.`` loses that first ``.`` (the client doubled it). Lines end at CRLF only: a bare LF,
or a ``.`` behind one, is message content (so ``<LF>.<LF>`` ends nothing; SMTP smuggling).

:class:`DataDecoder` takes the wire one line at a time, as the listener reads it (never
past the end of the message, so commands pipelined behind it stay unread), and hands out
the message in batches: the listener writes each batch to a spool as it arrives, so what
one connection holds in memory is one line and one batch, whatever the message size.

It goes on reading to the end of the message when a limit is broken (RFC 5321 §4.2.5: the
reply comes after the whole DATA), drops what it would have kept, and says which limit:
the message size (``max_message_size``, counted in octets on the wire, as aiosmtpd counts
them) or the line length.

May import: the standard library only.
"""

from __future__ import annotations

import enum

__all__ = ["BATCH_SIZE", "DataDecoder", "DataError"]

#: Octets of message gathered before :meth:`DataDecoder.take` hands them out: large enough
#: that a spool write costs little per line, small enough to be nothing per connection.
BATCH_SIZE = 64 * 1024

_END = b".\r\n"
_CRLF = b"\r\n"


class DataError(enum.Enum):
    """A limit the message broke; its reply comes once the message has been read."""

    #: Over ``max_message_size`` (RFC 3463 5.3.4).
    TOO_BIG = "552 5.3.4 Message too big for system"
    #: A line over the line-length limit (RFC 5321 §4.5.3.1.6; RFC 3463 5.5.2).
    LINE_TOO_LONG = "500 5.5.2 Line too long"

    @property
    def reply(self) -> str:
        """The reply that ends this DATA phase."""
        return self.value


class DataDecoder:
    """Decode one DATA phase, line by line (see the module documentation)."""

    def __init__(self, *, max_size: int | None, max_line: int) -> None:
        """Start a message.

        Args:
            max_size: the largest message, in octets on the wire (``None``: no limit).
            max_line: the longest line, CRLF included.
        """
        self._max_size = max_size
        self._max_line = max_line
        self._pending = bytearray()
        #: Octets of the line being read, when it came in pieces (an over-long line).
        self._partial = 0
        self._received = 0
        self._error: DataError | None = None
        self._done = False

    @property
    def received(self) -> int:
        """Octets received on the wire so far, counted toward ``max_size``."""
        return self._received

    @property
    def error(self) -> DataError | None:
        """The limit the message broke, if any (the first one broken)."""
        return self._error

    @property
    def done(self) -> bool:
        """Tell whether the end-of-data line has been fed."""
        return self._done

    def feed(self, piece: bytes) -> bool:
        """Take the next piece of the wire: a whole line with its CRLF, or part of one.

        The listener gives whole lines; a line longer than its read buffer comes as parts
        without CRLF and then a last part with it. Such a line is too long.

        Returns:
            whether the message has ended (the piece was the end-of-data line).
        """
        if self._done:
            msg = "feed() after the end of the message"
            raise ValueError(msg)
        if not self._partial and piece == _END:
            self._done = True
            return True
        self._received += len(piece)
        if self._error is None and self._max_size and self._received > self._max_size:
            self._fail(DataError.TOO_BIG)
        if not piece.endswith(_CRLF):
            self._partial += len(piece)
            self._fail(DataError.LINE_TOO_LONG)
            return False
        length, self._partial = self._partial + len(piece), 0
        if length > self._max_line:
            self._fail(DataError.LINE_TOO_LONG)
        if self._error is None:
            if piece[:1] == b".":
                self._pending += memoryview(piece)[1:]
            else:
                self._pending += piece
        return False

    def take(self, minimum: int = BATCH_SIZE) -> bytes:
        """Hand out the message decoded so far, if there are ``minimum`` octets of it.

        Returns:
            the octets (CRLF lines, unstuffed), or ``b""`` below ``minimum``. ``take(0)``
            after the end hands out the rest.
        """
        if len(self._pending) < minimum or not self._pending:
            return b""
        out = bytes(self._pending)
        self._pending.clear()
        return out

    def _fail(self, error: DataError) -> None:
        if self._error is None:
            self._error = error
        self._pending = bytearray()
