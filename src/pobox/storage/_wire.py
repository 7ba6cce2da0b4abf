"""Wire sizes: how many octets a stored message occupies on the POP3 wire.

RFC 1939 §5 (LIST) counts a message in its wire form: every line ending is CRLF. Stored
messages may end their lines with LF (Maildir written by an MTA) or CRLF, so the wire size is
the stored size plus one octet for every *bare* LF (an LF not preceded by CR). A CRLF stays two
octets and a bare CR stays one, exactly as Dovecot computes its "virtual size" (the ``,W=``
field of Maildir file names). Byte-stuffing and the terminating ``.CRLF`` are not counted,
and neither is the CRLF the server adds after a message whose last line has no line ending
(Dovecot's LIST does not count it either).

May import: the standard library only.
"""

from __future__ import annotations

__all__ = ["WireSizeCounter", "wire_size"]


def wire_size(data: bytes) -> int:
    """Return the wire size of a whole message: ``data`` with every bare LF counted as CRLF.

    Args:
        data: the message as stored.

    Returns:
        The number of octets RETR sends before byte-stuffing.
    """
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class WireSizeCounter:
    """Compute a wire size from chunks, even when a CRLF straddles two chunks."""

    __slots__ = ("_ends_with_cr", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._ends_with_cr = False

    def feed(self, chunk: bytes) -> None:
        """Count one more chunk of the stored message."""
        if not chunk:
            return
        size = wire_size(chunk)
        if self._ends_with_cr and chunk[:1] == b"\n":
            # The LF completes the CR that ended the previous chunk: not a bare LF.
            size -= 1
        self._size += size
        self._ends_with_cr = chunk[-1:] == b"\r"

    @property
    def size(self) -> int:
        """The wire size of everything fed so far."""
        return self._size
