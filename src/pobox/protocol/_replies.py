"""Reply formatting and the message encoder: pure functions from values to wire bytes.

Multi-line replies (RFC 1939 §3) end with ``CRLF.CRLF``; a line of the body that starts with
"." gets one more "." in front ("byte-stuffing").  The :class:`MessageEncoder` turns stored
message bytes into that wire form chunk by chunk, with searches and ``replace`` calls that run
in C (no per-line Python work), carrying the little state a chunk boundary needs: a CR at the
end of a chunk may be the first half of a CRLF, and a "." at the start of a chunk is at the
start of a line when the previous chunk ended one.  Mail stored with CRLF line ends is
encoded in one pass per chunk: one compiled search finds both what may need a rewrite (a bare
LF) and what needs stuffing (a "." after an LF), and the chunk is copied once, and only when
a dot is stuffed.

May import: the standard library only.
"""

from __future__ import annotations

import enum
import re
from typing import Final

__all__ = [
    "CRLF",
    "ClientWorkarounds",
    "HeaderEnd",
    "MessageEncoder",
    "TopFilter",
    "WorkaroundEncoder",
    "err",
    "ok",
]

CRLF: Final = b"\r\n"

#: RFC 2449 §4: "Responses ... the initial status line ... MUST NOT exceed 512 octets".
MAX_STATUS_LINE: Final = 512


def _one_line(text: str) -> bytes:
    # Text may come from the shell (error messages): a CR or LF in it would end the status
    # line early and desynchronise the client, so they become spaces.
    data = text.encode()
    if b"\r" in data or b"\n" in data:
        data = data.replace(b"\r", b" ").replace(b"\n", b" ")
    return data


def ok(text: str = "") -> bytes:
    """Format a ``+OK`` status line."""
    return b"+OK " + _one_line(text) + CRLF if text else b"+OK" + CRLF


def err(text: str, resp_code: str | None = None) -> bytes:
    """Format a ``-ERR`` status line, with an RFC 2449 response code if given."""
    if resp_code:
        return b"-ERR [" + _one_line(resp_code) + b"] " + _one_line(text) + CRLF
    return b"-ERR " + _one_line(text) + CRLF


#: Below one dot per this many octets, dots are looked at one by one (see ``encode``).
_SPARSE_DOTS = 128
#: CRLF mail: after this many stuffed dots, dots denser than ``_SPARSE_DOTS`` end the one-pass
#: search (see ``_encode_crlf``).
_DENSE_AFTER = 32

#: What a chunk of CRLF mail may need done: a dot after an LF (stuffed), or a bare LF (an LF
#: not preceded by CR).  The pattern starts with a literal, so the regex engine skips to each
#: LF in C; the look-behind then rejects the CRLFs.  On mail's lines this one search is about
#: 2.5 times as fast as counting LFs and CRLFs; each LF costs a step of the engine, though,
#: so lines much shorter than mail's take the counts (see ``encode``).
_LF_DOT_OR_BARE_LF: Final = re.compile(rb"\n(?:\.|(?<!\r\n))")
#: The first this many octets of a chunk are sampled for its line length.
_SAMPLE = 4096
#: ... and the one search is used when they hold at most this many LFs (lines of 32 octets).
_SAMPLE_LFS = _SAMPLE // 32
#: A dot after an LF: what ``stuff`` looks for when the lines are mail's.  The engine steps
#: once per LF, so the first ``_PEEK`` octets must average lines of 32 octets or more.
_LF_DOT: Final = re.compile(rb"\n\.")
_PEEK = 1024
_PEEK_LFS = _PEEK // 32


class MessageEncoder:
    """Turn a stored message into wire form: CRLF line ends, byte-stuffed, terminated."""

    __slots__ = ("_at_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._pending_cr = False
        self._at_line_start = True

    def normalize(self, chunk: bytes) -> bytes:
        """Return ``chunk`` with every bare LF made CRLF (no stuffing)."""
        chunk = self._hold_cr(chunk)
        if b"\n" not in chunk:
            return chunk
        if b"\r" in chunk:
            return _crlf(chunk)
        return chunk.replace(b"\n", b"\r\n")  # the usual Maildir file: LF only, one pass

    def _hold_cr(self, chunk: bytes) -> bytes:
        """Put back the CR held from the last chunk; hold back this chunk's last CR."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        return chunk

    def stuff(self, data: bytes) -> bytes:
        """Byte-stuff data whose line ends are all LF or all CRLF (normalized, or LF-only).

        A dot is doubled when it starts a line: after an LF, or first in the message.  On
        mail's lines one ``sub`` of a compiled pattern (LF, dot) does it in C: the regex
        engine skips to each LF, and the data is copied once, only if a dot is stuffed.  Lines much
        shorter than mail's (a hostile file's, judged by the first ``_PEEK`` octets) cost
        the engine a step each; there, and for a two-byte search (what bytes.replace does),
        which runs at a fraction of memchr's speed, the dots are counted: rare dots are
        found with a one-byte search and the byte before each is checked, dense ones with
        ``replace``.
        """
        if not data:
            return data
        if data.count(b"\n", 0, _PEEK) <= _PEEK_LFS:
            stuffed = _LF_DOT.sub(b"\n..", data)
            if self._at_line_start and data[0] == 0x2E:  # "."
                stuffed = b"." + stuffed
            self._at_line_start = data.endswith(b"\n")
            return stuffed
        dots = data.count(b".")
        if dots * _SPARSE_DOTS < len(data):
            data = self._stuff_sparse(data)
        else:
            if b"\n." in data:
                data = data.replace(b"\n.", b"\n..")
            if self._at_line_start and data[0] == 0x2E:  # "."
                data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def _stuff_sparse(self, data: bytes) -> bytes:
        """Byte-stuff data with few dots: one slice per dot at a line start."""
        pieces: list[bytes] = []
        start = 0
        find = data.find
        dot = find(b".")
        while dot >= 0:
            if (data[dot - 1] == 0x0A) if dot else self._at_line_start:
                pieces.append(data[start:dot])
                start = dot  # the dot is sent twice: once ending this piece, once starting the next
                pieces.append(b".")
            dot = find(b".", dot + 1)
        if not pieces:
            return data
        pieces.append(data[start:])
        return b"".join(pieces)

    def _encode_crlf(self, chunk: bytes) -> bytes | None:
        """Byte-stuff a chunk of CRLF mail in one pass; ``None`` on a bare LF or dense dots.

        ``chunk`` is not empty and holds no CR of a CRLF split from its LF
        (:meth:`_hold_cr`), so an LF first in it is a bare one.  Each match is a dot to stuff
        or the end of the attempt: the caller then rewrites the chunk's line ends and stuffs
        it; nothing of the encoder's state has changed by then.  Dots denser than one per
        ``_SPARSE_DOTS`` octets end it too (a hostile file of lines of dots): the caller's two
        C passes then beat a Python step per dot, and the work given up is bounded by what
        was searched, at most the chunk.
        """
        pieces: list[bytes] = []
        start = 0
        if self._at_line_start and chunk[:1] == b".":
            pieces.append(b".")
        for stuffed, match in enumerate(_LF_DOT_OR_BARE_LF.finditer(chunk), 1):
            lf = match.start()
            if not lf or chunk[lf - 1] != 0x0D:  # a bare LF, with or without a dot after it
                return None
            if stuffed > _DENSE_AFTER and stuffed * _SPARSE_DOTS > lf:
                return None
            pieces.append(chunk[start : lf + 1])
            start = lf + 1  # the dot is sent twice: once ending this piece, once starting the next
            pieces.append(b".")
        self._at_line_start = chunk.endswith(b"\n")  # never empty: see encode
        if not pieces:
            return chunk
        pieces.append(chunk[start:])
        return b"".join(pieces)

    def encode(self, chunk: bytes) -> bytes:
        """Return the wire form of the next chunk."""
        if self._pending_cr or b"\r" in chunk:
            # Stored with CRLF (or with CRs at least): one search finds the dots to stuff
            # and any bare LF; a bare LF, dots too dense or lines too short for that (a
            # hostile file) take two C passes whose speed does not depend on the lines.
            chunk = self._hold_cr(chunk)
            if not chunk:
                return chunk
            if chunk.count(b"\n", 0, _SAMPLE) <= _SAMPLE_LFS:
                data = self._encode_crlf(chunk)
                if data is not None:
                    return data
            return self.stuff(_crlf(chunk))
        # The usual Maildir file, LF only: stuff first, then turn LF into CRLF in one pass.
        return self.stuff(chunk).replace(b"\n", b"\r\n")

    def sent_as_stored(self, *, ends_line: bool) -> bool:
        """Note that octets in wire form went out as stored, past this encoder (``sendfile``).

        Returns ``False`` (and changes nothing) when a CR of the last chunk is held back:
        the octets that follow it must come through :meth:`encode`.
        """
        if self._pending_cr:
            return False
        self._at_line_start = ends_line
        return True

    def flush(self) -> bytes:
        """Return the CR held back at the end of the last chunk (normalized, not stuffed)."""
        held = b"\r" if self._pending_cr else b""
        self._pending_cr = False
        return held

    def finish(self) -> bytes:
        """Return what ends the message: a held CR, a CRLF if needed, and ``.CRLF``."""
        if self._at_line_start and not self._pending_cr:  # the usual end: the last line's
            return b"." + CRLF
        # A held CR is the last line's text (stuffed: it may be a line's first octet); the
        # message did not end its last line either way.
        return self.stuff(self.flush()) + CRLF + b"." + CRLF


class ClientWorkarounds(enum.Flag):
    """Dovecot's ``pop3_client_workarounds``: changes to the wire form old clients need."""

    NONE = 0
    #: ``outlook-no-nuls``: Outlook and Outlook Express hang on a NUL in a message; each NUL
    #: is sent as the octet 0x80 instead (one octet for one: sizes do not change).
    OUTLOOK_NO_NULS = enum.auto()
    #: ``oe-ns-eoh``: Outlook Express and Netscape Mail break on a message whose header is
    #: not ended by an empty line; one (CRLF) is sent before the terminating ``.CRLF``.
    OE_NS_EOH = enum.auto()


_EOH: Final = b"\r\n\r\n"


class HeaderEnd:
    """Find whether a message in wire form has the empty line that ends its header.

    The start of the message counts as the start of a line, so a message whose first line
    is empty has an empty header and a header end.  Only the last three octets carry from
    chunk to chunk.  The shell uses the same class (:meth:`feed_stored`) to size messages
    the way :class:`WorkaroundEncoder` will send them.
    """

    __slots__ = ("_normalizer", "_tail", "found")

    def __init__(self) -> None:
        self.found = False
        self._tail = CRLF
        self._normalizer: MessageEncoder | None = None

    def feed(self, wire: bytes) -> None:
        """Look at the next octets of the wire form (CRLF line ends)."""
        if self.found or not wire:
            return
        if _EOH in self._tail + wire[:3] or _EOH in wire:
            self.found = True
            return
        self._tail = (self._tail + wire)[-3:]

    def feed_stored(self, chunk: bytes) -> None:
        """Look at the next chunk of a message as stored (LF or CRLF line ends)."""
        if self._normalizer is None:
            self._normalizer = MessageEncoder()
        self.feed(self._normalizer.normalize(chunk))


class WorkaroundEncoder(MessageEncoder):
    """A :class:`MessageEncoder` that also applies the :class:`ClientWorkarounds` given.

    A subclass, so that sessions without workarounds keep the plain encoder's code path:
    the flags are looked at once per message (which class to use), then once per chunk.
    """

    __slots__ = ("_header_end", "_no_nuls")

    def __init__(self, workarounds: ClientWorkarounds) -> None:
        super().__init__()
        self._no_nuls = ClientWorkarounds.OUTLOOK_NO_NULS in workarounds
        self._header_end = HeaderEnd() if ClientWorkarounds.OE_NS_EOH in workarounds else None

    def _nuls(self, chunk: bytes) -> bytes:
        if self._no_nuls and b"\0" in chunk:
            return chunk.replace(b"\0", b"\x80")
        return chunk

    def _seen(self, wire: bytes) -> bytes:
        if self._header_end is not None:
            self._header_end.feed(wire)
        return wire

    def normalize(self, chunk: bytes) -> bytes:
        """Return ``chunk`` normalized (see :meth:`MessageEncoder.normalize`), NULs replaced."""
        return self._seen(super().normalize(self._nuls(chunk)))

    def encode(self, chunk: bytes) -> bytes:
        """Return the wire form of the next chunk, NULs replaced."""
        return self._seen(super().encode(self._nuls(chunk)))

    def finish(self) -> bytes:
        """Return what ends the message, with the missing end of the header (``oe-ns-eoh``)."""
        tail = super().finish()
        if self._header_end is not None and not self._header_end.found:
            return tail[:-3] + CRLF + tail[-3:]
        return tail


def _crlf(chunk: bytes) -> bytes:
    """Return ``chunk`` (with CRs in it) with every bare LF made CRLF.

    Two counts (no copies) say whether it is wire-ready already, and only a chunk with a bare
    LF is rewritten (the rewrite leaves the CRs alone).
    """
    if chunk.count(b"\n") == chunk.count(b"\r\n"):
        return chunk
    return chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class TopFilter:
    """Keep the header, the blank line and the first ``lines`` body lines (RFC 1939 §7 TOP).

    Works on the output of :meth:`MessageEncoder.normalize`, which never splits a CRLF
    across chunks, so only "are we at the start of a line" carries from chunk to chunk.
    """

    __slots__ = ("_at_line_start", "_in_body", "_remaining")

    def __init__(self, lines: int) -> None:
        self._remaining = lines
        self._in_body = False
        self._at_line_start = True

    @property
    def done(self) -> bool:
        """Whether no more input can be part of the output."""
        return self._in_body and self._remaining <= 0

    def feed(self, data: bytes) -> bytes:
        """Return the part of ``data`` that belongs to the TOP output."""
        if self.done:
            return b""
        pos = 0
        while True:
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                if pos < len(data):
                    self._at_line_start = False
                return data
            if self._in_body:
                self._remaining -= 1
            elif self._at_line_start and nl == pos:  # the empty line that ends the header
                self._in_body = True
            self._at_line_start = True
            pos = nl + 2
            if self.done:
                return data[:pos]
