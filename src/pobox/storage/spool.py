"""The spool: a message being received for delivery, in memory while small, then on disk.

Delivery (LMTP/SMTP ``DATA``, ``pobox deliver``'s standard input) writes the message into a
:class:`Spool` as it arrives; a store then copies it into each recipient's maildrop. The
spool keeps the *stored form* of the message: line endings are LF, each CRLF of the wire
turned into LF exactly as ``data.replace(b"\\r\\n", b"\\n")`` would on the whole message
(non-overlapping, left to right; a bare CR stays), the way Dovecot and Maildir store mail.
While it is written it works out what every store needs without reading it again: the
stored size, the wire size (:mod:`pobox.storage._wire`) and a SHA-256 digest (the key of a
content-addressed body).

Memory is bounded: up to ``memory_max`` octets stay in a buffer, beyond that everything
moves to an anonymous temporary file (``O_TMPFILE``: it has no name and vanishes with its
descriptor). Readers read by offset (``pread``), so any number of them may read one spool at
once, each from its start (LMTP delivers to several recipients concurrently).

May import: the standard library and :mod:`pobox.storage._wire`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator

from pobox.storage._wire import WireSizeCounter

__all__ = ["CHUNK_SIZE", "MEMORY_MAX", "Spool"]

#: Messages up to this size stay in memory: most mail is smaller (a typical message is tens
#: of kilobytes), and a larger one costs one temporary file.
MEMORY_MAX = 256 * 1024
#: Size of the chunks :meth:`Spool.chunks` yields.
CHUNK_SIZE = 256 * 1024


class Spool:
    """A message received for delivery, in its stored form (LF line endings).

    Use :meth:`write` for each piece as it arrives, then :meth:`finish`; then read it with
    :meth:`chunks` (any number of times, from any number of readers) and :meth:`close` it.
    """

    def __init__(self, *, memory_max: int = MEMORY_MAX, directory: str | None = None) -> None:
        """Create an empty spool.

        Args:
            memory_max: octets kept in memory; a larger message moves to a temporary file.
            directory: where that file is made (default: :func:`tempfile.gettempdir`).
        """
        self._memory_max = memory_max
        self._directory = directory
        self._buffer = bytearray()
        self._fd: int | None = None
        self._size = 0
        self._wire = WireSizeCounter()
        self._hash = hashlib.sha256()
        self._held_cr = False
        self._finished = False
        self._closed = False
        #: Sizes and digest told by :meth:`adopt` instead of computed here.
        self._told: tuple[int, str] | None = None

    @classmethod
    def from_bytes(cls, data: bytes, **kwargs: int | str | None) -> Spool:
        """Return a finished spool holding ``data`` (as received: CRLF or LF lines)."""
        spool = cls(**kwargs)  # type: ignore[arg-type]
        try:
            spool.write(data)
            spool.finish()
        except BaseException:
            spool.close()
            raise
        return spool

    # --- writing -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Add the next piece of the message as received.

        Raises:
            OSError: the temporary file cannot be written (disk full).
        """
        if self._finished:
            msg = "write() after finish()"
            raise ValueError(msg)
        if not data:
            return
        if self._held_cr:
            # The CR ending the previous piece is dropped if this piece's LF completes a CRLF.
            self._held_cr = False
            if data[:1] != b"\n":
                self._store(b"\r")
        if data[-1:] == b"\r":
            self._held_cr = True
            data = data[:-1]
        self._store(data.replace(b"\r\n", b"\n"))

    def finish(self) -> None:
        """Mark the end of the message.

        Raises:
            OSError: the temporary file cannot be written (disk full).
        """
        if self._finished:
            return
        if self._held_cr:
            self._held_cr = False
            self._store(b"\r")
        self._finished = True

    def _store(self, data: bytes) -> None:
        """Append stored-form octets, moving to a temporary file past ``memory_max``."""
        if not data:
            return
        self._hash.update(data)
        self._wire.feed(data)
        self._size += len(data)
        if self._fd is None and len(self._buffer) + len(data) <= self._memory_max:
            self._buffer += data
            return
        if self._fd is None:
            self._fd = _anonymous_file(self._directory)
            _write_all(self._fd, self._buffer)
            self._buffer = bytearray()
        _write_all(self._fd, data)

    # --- what a store needs ------------------------------------------------------------

    @property
    def size(self) -> int:
        """Octets of the stored form."""
        return self._size

    @property
    def wire_size(self) -> int:
        """Octets on the POP3 wire (every bare LF as CRLF; RFC 1939 §5)."""
        return self._wire.size if self._told is None else self._told[0]

    @property
    def digest(self) -> str:
        """The SHA-256 of the stored form, in hexadecimal."""
        self._check_finished()
        return self._hash.hexdigest() if self._told is None else self._told[1]

    @property
    def in_memory(self) -> bool:
        """Tell whether the message is still in memory (not in a temporary file)."""
        return self._fd is None

    def read_at(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` octets from ``offset`` (fewer only at the end).

        Raises:
            OSError: the temporary file cannot be read.
        """
        self._check_finished()
        if self._fd is None:
            return bytes(self._buffer[offset : offset + size])
        out = bytearray()
        while len(out) < size:
            piece = os.pread(self._fd, size - len(out), offset + len(out))
            if not piece:
                break
            out += piece
        return bytes(out)

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the stored form from its start, in chunks of up to ``size`` octets.

        Raises:
            OSError: the temporary file cannot be read.
        """
        offset = 0
        while offset < self._size:
            chunk = self.read_at(offset, size)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk

    def getvalue(self) -> bytes:
        """Return the whole stored form (for small messages and tests)."""
        return self.read_at(0, self._size)

    def export_fd(self) -> int:
        """Return a new descriptor of a file holding the stored form, for another process.

        A spool on disk gives a duplicate of its temporary file's descriptor; one in memory
        is copied into an anonymous memory file (``memfd_create``). The caller closes it.

        Raises:
            OSError: no memory file could be made.
        """
        self._check_finished()
        if self._fd is not None:
            return os.dup(self._fd)
        fd = os.memfd_create("pobox-spool", os.MFD_CLOEXEC)
        try:
            _write_all(fd, self._buffer)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @classmethod
    def adopt(cls, fd: int, *, wire_size: int, digest: str) -> Spool:
        """Return a finished spool reading the stored form from ``fd``, which it takes over.

        The other side of :meth:`export_fd`: the size is the file's (``fstat``); the wire
        size and digest are taken as told, since only their sender could check them without
        reading the whole message again.

        Raises:
            ValueError: ``fd`` is not a regular file (it is closed then).
        """
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                msg = "a spool is a regular file"
                raise ValueError(msg)
        except BaseException:
            os.close(fd)
            raise
        spool = cls()
        spool._fd = fd
        spool._size = info.st_size
        spool._told = (wire_size, digest)
        spool._finished = True
        return spool

    def close(self) -> None:
        """Free the memory or the temporary file; safe to call more than once."""
        self._closed = True
        self._buffer = bytearray()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Spool:
        """Return the spool; :meth:`close` it at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the spool."""
        self.close()

    def _check_finished(self) -> None:
        if not self._finished:
            msg = "the spool is still being written"
            raise ValueError(msg)
        if self._closed:
            msg = "the spool is closed"
            raise ValueError(msg)


def _anonymous_file(directory: str | None) -> int:
    """Return the descriptor of a new, nameless, private temporary file."""
    directory = directory or tempfile.gettempdir()
    try:
        return os.open(directory, os.O_RDWR | os.O_CLOEXEC | os.O_TMPFILE, 0o600)
    except OSError:
        pass  # a file system without O_TMPFILE: a named file, unlinked at once
    fd, path = tempfile.mkstemp(dir=directory)
    os.unlink(path)
    return fd


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
