"""The mbox file format as Dovecot reads and writes it: From_ lines, hidden headers, quoting.

Pure functions over a *reader* (``pread(offset, size) -> bytes``) of a file whose size was
fixed when it was opened; nothing here opens, locks or writes a file.

Reading (what Dovecot's ``istream-raw-mbox`` does, so that LIST sizes and RETR bytes match a
Dovecot serving the same spool):

* The file starts with a ``From `` line; a file that does not is refused.
* Every later message starts at a ``From `` line that follows a line feed and parses as a
  From_ line (``From <sender> <asctime date>``, the date checked loosely: weekday, month,
  day, time, year, with an optional zone). Dovecot does not require an empty line before
  it, so pobox does not either; a body line ``From here on, ...`` (no date) never splits a
  message, even where an MTA forgot to quote it.
* A message's content runs from the line after its From_ line up to, not including, the
  line feed that precedes the next From_ line (that line feed is the separator; an MTA
  writes an empty line there). At the end of the file, one final line feed is the
  separator likewise. So ``From a\\nbody\\n\\nFrom b`` holds ``body\\n``, and a message without
  a final line feed (``body``) is written as ``From a\\nbody\\nFrom b`` and read back as is.
* ``>From `` lines are served as they are stored: Dovecot's reader does not unquote them
  (mboxo/mboxrd quoting is not reversed), and neither does pobox, so sizes stay the same.
* ``Content-Length:`` is never trusted blindly. Dovecot's LDA does not quote ``From `` lines
  but writes a ``Content-Length:`` and its reader uses it when it checks out: when a From_
  line (or the end of the file) is exactly where the length says the body ends, that is the
  end of the message, whatever From_ lines the body holds. pobox does the same, and ignores
  a length that does not check out (a stranger's header pointing anywhere else). Like
  Dovecot's other own headers (``Status``, ``X-Status``, ``X-Keywords``, ``X-UID``,
  ``X-IMAP``, ``X-IMAPbase``), it is hidden from what is served (:data:`HIDDEN_HEADERS`).
  Headers are looked at in the first :data:`HEADER_SCAN_MAX` octets of a message.

Writing (:class:`FromQuoter`, :func:`from_line`): a message is appended as a From_ line, the
message with every line that starts with ``From `` quoted as ``>From `` (what Dovecot's
``mbox_save`` once did, and procmail and Postfix do: mboxo quoting, which is what a reader that
does not unquote needs), and one line feed as the separator; no ``Content-Length:``.

May import: the standard library and :mod:`pobox.storage.base`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pobox.storage.base import StoragePermanentError

__all__ = [
    "HEADER_SCAN_MAX",
    "HIDDEN_HEADERS",
    "MAX_FROM_LINE",
    "FromQuoter",
    "NotAnMbox",
    "ParsedMessage",
    "Reader",
    "from_line",
    "is_from_line",
    "parse_mbox",
]

#: ``pread(offset, size)``: at most ``size`` octets of the file from ``offset``.
Reader = Callable[[int, int], bytes]

#: A From_ line longer than this is not one (Dovecot reads the line into a small buffer too).
MAX_FROM_LINE = 1024
#: How far into a message its header is looked at for hidden and ``X-UIDL:`` headers.
HEADER_SCAN_MAX = 1024 * 1024
#: What is read of a message first to find its header (more, up to HEADER_SCAN_MAX, if the
#: header does not end in it).
_HEADER_FIRST_READ = 8 * 1024
#: A Content-Length of more digits than this is no length of a file here.
_LENGTH_DIGITS = 18
#: The first chunk read when looking for the next From_ line (then doubling).
_FIRST_SCAN_CHUNK = 4 * 1024
#: Chunks the file is scanned in.
_SCAN_CHUNK = 1024 * 1024
#: Dovecot's ``mbox_hide_headers`` (``src/lib-storage/index/mbox/mbox-storage.c``): its own
#: bookkeeping headers, and those of other mbox programs, never shown to a client.
HIDDEN_HEADERS = frozenset(
    {b"content-length", b"status", b"x-imap", b"x-imapbase", b"x-keywords", b"x-status", b"x-uid"}
)

_DAYS = rb"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_MONTHS = rb"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*"
#: ``From sender Www Mmm dd hh:mm[:ss] [zone] yyyy [zone]``, as ctime(3) writes it and the
#: variants Dovecot's ``mbox_from_parse`` takes (zone before or after the year).
_FROM_LINE = re.compile(
    rb"From +\S+ +" + _DAYS + rb",? +" + _MONTHS + rb" +\d{1,2} +\d{1,2}:\d{2}(?::\d{2})?"
    rb"(?: +[A-Za-z]+| +[-+]\d{4})? +\d{2,4}(?: +[A-Za-z]+| +[-+]\d{4})?(?: .*)?\r?\Z",
    re.IGNORECASE | re.DOTALL,
)


class NotAnMbox(StoragePermanentError):
    """The file does not start with a From_ line: it is not an mbox (or it is damaged)."""


def is_from_line(line: bytes) -> bool:
    """Tell whether ``line`` (without its line feed) is a From_ line that starts a message."""
    return len(line) <= MAX_FROM_LINE and _FROM_LINE.match(line) is not None


def from_line(sender: str | None, when: float | None = None) -> bytes:
    """Return the From_ line (with its line feed) for a message from ``sender`` received now.

    A sender that is empty or holds white space or non-ASCII becomes ``MAILER-DAEMON``, as
    Dovecot writes for the null sender.
    """
    text = sender or ""
    if not text or not text.isascii() or any(c.isspace() or ord(c) < 0x21 for c in text):
        text = "MAILER-DAEMON"
    stamp = time.asctime(time.gmtime(time.time() if when is None else when))
    return f"From {text} {stamp}\n".encode("ascii")


class FromQuoter:
    """Quote ``From `` at the start of every line of a stream (``>From ``), chunk by chunk."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return the quoted form of everything fed so far up to its last line feed."""
        data = self._carry + chunk
        end = data.rfind(b"\n") + 1
        if not end:
            self._carry = data
            return b""
        self._carry = data[end:]
        return _quote(data[:end])

    def finish(self) -> bytes:
        """Return the quoted last line (one without a line feed)."""
        data, self._carry = self._carry, b""
        return _quote(data)


def _quote(lines: bytes) -> bytes:
    """Quote ``From `` in ``lines``, which start at the start of a line."""
    quoted = lines.replace(b"\nFrom ", b"\n>From ")
    return b">" + quoted if quoted.startswith(b"From ") else quoted


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """One message of an mbox, as found when the file was read.

    Attributes:
        start: offset of its From_ line.
        end: offset after its separator (the next From_ line, or the end of the file):
            ``[start, end)`` is what a rewrite copies to keep the message as it was.
        from_line: its From_ line, without the line feed.
        segments: ``(offset, length)`` of the content served, hidden headers left out.
        stored: octets of the content served (the sum of the segments).
        wire: the wire size of the content served (RFC 1939 §5).
        identity: a digest of the From_ line and the content served, CRLF taken as LF: what
            the UIDL list recognises the message by after the file was rewritten.
        xuidl: the value of its ``X-UIDL:`` header, if it has one.
    """

    start: int
    end: int
    from_line: bytes
    segments: tuple[tuple[int, int], ...]
    stored: int
    wire: int
    identity: str
    xuidl: str | None


def _next_start(read: Reader, size: int, position: int) -> int | None:
    """Return the offset of the first From_ line after ``position`` (which is in a line).

    Reads chunks that start small and double (most messages are small), each with enough
    after it to read a From_ line that starts in it whole.
    """
    offset = position
    chunk = _FIRST_SCAN_CHUNK
    while offset < size:
        limit = min(chunk, size - offset)
        buffer = read(offset, min(limit + MAX_FROM_LINE + 1, size - offset))
        limit = min(limit, len(buffer))
        if not limit:
            return None  # the file shrank under us: what is left is not ours to read
        at = buffer.find(b"\nFrom ")
        while 0 <= at < limit:
            line_end = buffer.find(b"\n", at + 1)
            if line_end < 0:
                line_end = len(buffer)
                complete = offset + len(buffer) >= size
            else:
                complete = True
            if complete and is_from_line(buffer[at + 1 : line_end]):
                return offset + at + 1
            at = buffer.find(b"\nFrom ", at + 1)
        offset += limit
        chunk = min(chunk * 2, _SCAN_CHUNK)
    return None


def _from_line_at(read: Reader, size: int, position: int) -> bool:
    """Tell whether a line feed and a From_ line are at ``position``."""
    data = read(position, min(MAX_FROM_LINE + 2, size - position))
    if not data.startswith(b"\nFrom "):
        return False
    line_end = data.find(b"\n", 1)
    if line_end < 0:
        if position + len(data) < size:
            return False  # longer than any From_ line
        line_end = len(data)
    return is_from_line(data[1:line_end])


def _read_header(read: Reader, position: int, limit: int) -> bytes:
    """Read the start of a message's content, far enough to hold its header if it can."""
    scan = min(HEADER_SCAN_MAX, limit)
    header = read(position, min(_HEADER_FIRST_READ, scan))
    if len(header) < scan and not _has_header_end(header):
        header = read(position, scan)
    return header


def parse_mbox(read: Reader, size: int, start: int = 0) -> list[ParsedMessage]:
    """Parse the first ``size`` octets of an mbox into its messages, in file order.

    A message ends at the next From_ line, unless its ``Content-Length:`` header says where
    its body ends and a From_ line (or the end of the file) is exactly there, as Dovecot
    writes and reads it (dovecot-lda does not quote ``From `` lines but writes that header):
    a length that does not check out is ignored, never followed.

    Args:
        start: where to begin: 0, or the From_ line of a message parsed before (to parse
            only what was appended after it, and it again).

    Raises:
        NotAnMbox: the file does not start with ``From `` (or there is none at ``start``).
    """
    if size <= start:
        return []
    if read(start, 5) != b"From ":
        msg = "the file does not start with a 'From ' line: not an mbox"
        raise NotAnMbox(msg)
    last_is_lf = read(size - 1, 1) == b"\n"
    messages = []
    begin = start
    while begin < size:
        head = read(begin, min(MAX_FROM_LINE + 1, size - begin))
        line_end = head.find(b"\n")
        following = None if line_end < 0 else begin + line_end + 1
        end = content_end = None
        scanned = None
        if following is not None:
            scanned = _scan_header(_read_header(read, following, size - following))
            _, _, body, length = scanned
            if body is not None and length is not None:
                body_end = following + body + length
                if body_end == size or (body_end + 1 == size and last_is_lf):
                    end, content_end = size, body_end
                elif body_end < size and _from_line_at(read, size, body_end):
                    end, content_end = body_end + 1, body_end
        if end is None or content_end is None:
            found = _next_start(read, size, begin)
            if found is None:
                end, content_end = size, size - 1 if last_is_lf else size
            else:
                end, content_end = found, found - 1
        if following is None:
            # The From_ line runs to the end of the message (or is overlong): no content.
            messages.append(_message(read, (begin, end), head, end, end))
        else:
            content_end = max(following, content_end)
            assert scanned is not None
            if scanned[2] is None or following + scanned[2] > content_end:
                scanned = None  # the header scan ran past this message: scan it again
            messages.append(
                _message(read, (begin, end), head[:line_end], following, content_end, scanned)
            )
        begin = end
    return messages


def _message(  # noqa: PLR0917 - the parts of one message found by parse_mbox
    read: Reader,
    region: tuple[int, int],
    line: bytes,
    content_start: int,
    content_end: int,
    scanned: _Header | None = None,
) -> ParsedMessage:
    """Build one :class:`ParsedMessage` of ``region`` (start, end): hidden headers, sizes.

    ``scanned`` is its header, read already (``None``: read it here).
    """
    start, end = region
    if scanned is None:
        scanned = _scan_header(_read_header(read, content_start, content_end - content_start))
    hidden, xuidl, _, _ = scanned
    segments: list[tuple[int, int]] = []
    position = content_start
    for hide_start, hide_end in hidden:
        if hide_start > position - content_start:
            segments.append((position, content_start + hide_start - position))
        position = content_start + hide_end
    if position < content_end:
        segments.append((position, content_end - position))
    digest = hashlib.sha256(line.rstrip(b"\r") + b"\n")
    stored = lfs = crlfs = 0
    held_cr = b""
    for chunk in read_segments(read, segments):
        stored += len(chunk)
        lfs += chunk.count(b"\n")
        # The identity is taken over LF line ends: a CRLF rewritten as LF (Dovecot does
        # that to a header's last line) leaves the message, as served, the same. A CR that
        # ends a chunk waits for the next one; CRLFs are counted for the wire size too.
        text = held_cr + chunk if held_cr else chunk
        held_cr = b"\r" if text.endswith(b"\r") else b""
        if held_cr:
            text = text[:-1]
        if b"\r" in text:
            crlfs += text.count(b"\r\n")
            text = text.replace(b"\r\n", b"\n")
        digest.update(text)
    digest.update(held_cr)
    return ParsedMessage(
        start=start,
        end=end,
        from_line=line,
        segments=tuple(segments),
        stored=stored,
        wire=stored + lfs - crlfs,
        identity=digest.hexdigest()[:32],
        xuidl=xuidl,
    )


def read_segments(
    read: Reader, segments: tuple[tuple[int, int], ...] | list[tuple[int, int]]
) -> Iterator[bytes]:
    """Yield the octets of ``segments`` in chunks (stopping early if the file is shorter)."""
    for offset, length in segments:
        done = 0
        while done < length:
            chunk = read(offset + done, min(_SCAN_CHUNK, length - done))
            if not chunk:
                return
            done += len(chunk)
            yield chunk


def _has_header_end(data: bytes) -> bool:
    """Tell whether the empty line that ends a header is in ``data`` (the content's start)."""
    return data[:1] == b"\n" or data[:2] == b"\r\n" or b"\n\n" in data or b"\n\r\n" in data


#: What :func:`_scan_header` finds: hidden ranges, X-UIDL, body offset, Content-Length.
_Header = tuple[list[tuple[int, int]], str | None, int | None, int | None]


def _scan_header(header: bytes) -> _Header:
    """Read a message's header: what to hide, its X-UIDL, where the body starts, its length.

    ``header`` is the start of a message's content; the header ends at its first empty line.

    Returns:
        The ``(start, end)`` ranges of hidden header lines, the ``X-UIDL:`` value, the
        offset of the body (after the empty line; ``None`` if none was found) and the
        ``Content-Length:`` value (``None`` if there is none, or it is not a number).
    """
    hidden: list[tuple[int, int]] = []
    xuidl: str | None = None
    length: int | None = None
    position = 0
    hiding = False
    while position < len(header):
        newline = header.find(b"\n", position)
        line_end = len(header) if newline < 0 else newline + 1
        line = header[position:line_end]
        if line in {b"\n", b"\r\n"}:
            return hidden, xuidl, line_end, length
        if line[:1] in {b" ", b"\t"}:
            hide = hiding
        else:
            name, colon, value = line.partition(b":")
            field = name.strip().lower()
            hiding = hide = bool(colon) and field in HIDDEN_HEADERS
            if colon and field == b"x-uidl" and xuidl is None:
                text = value.strip().decode("ascii", "replace")
                xuidl = text or None
            if colon and field == b"content-length" and length is None:
                digits = value.strip()
                if digits.isdigit() and len(digits) <= _LENGTH_DIGITS:
                    length = int(digits)
        if hide:
            if hidden and hidden[-1][1] == position:
                hidden[-1] = (hidden[-1][0], line_end)
            else:
                hidden.append((position, line_end))
        position = line_end
    return hidden, xuidl, None, length
