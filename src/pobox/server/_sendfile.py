"""RETR with ``sendfile``: message files known to be in wire form go out from the page cache.

A stored message is *wire-ready* when RETR would send it unchanged: every LF after a CR, no
line starting with a dot, a CRLF at the end.  Then the octets need not pass through Python
at all: :func:`os.sendfile` copies them from the file to the socket in the kernel.  What
makes it safe:

- **Knowing, not trusting.** Whether a file is wire-ready is learnt only by sending it
  through the encoder once (the core's count of message octets then equals the file's size
  plus the terminator), and remembered in this process's memory
  (:class:`WireReadyFiles`) under the file's *identity*: device, inode, size, mtime and
  ctime (:class:`~pobox.storage.base.OpenedMessage`).  Nothing on disk says so: a file
  name, the index and the file's times are the maildir owner's to change, but a write to
  the file moves its ctime, which only the kernel sets.
- **Exactly the announced size.** The file is sent only when its size at open is the size
  LIST gave, and never more than that (``sendfile``'s count); a file that comes up short,
  or whose identity changed by the end of the send, ends the session instead of the
  terminator, as a failed read mid-message does: the client never takes a wrong message
  for a whole one, and the wire never carries more or fewer octets than announced.
- **Plain connections with nothing queued.** Over TLS the kernel cannot encrypt (no kTLS
  here): the encoder path stays.  The reply line goes first through the transport; the
  file follows only once the transport's buffer is empty, so nothing is reordered.
- **No wait for the disk in the event loop.** A call sends at most :data:`SENDFILE_MAX`
  octets; it runs in the event loop's thread when the page cache holds both ends of its
  range (:func:`cached`, ``RWF_NOWAIT`` reads of one octet), else in a worker thread on
  duplicates of both descriptors that the thread closes itself (:func:`sendfile_owned`):
  a session that ends meanwhile closes its own, never one the thread still uses.  With
  ``mail_inline_read_max = 0`` (network storage) files are never sent this way.
- **Waits like any write.** The socket is non-blocking: on ``EAGAIN`` the driver waits for
  it to be writable (a duplicate of its descriptor in the event loop, since the transport
  owns the original), under the session's idle timeout; a kick or a shutdown ends that
  wait as it ends a drain.  Between two calls of at most :data:`SENDFILE_MAX` octets other
  sessions get their turn.

A file written to while it is sent can still give the client octets that were not in the
file at the identity check; only the owner of the maildir can write to it, and only to
their own session's harm (the session then ends without the terminator).  Mail from
strangers is written once, by delivery, before any RETR sees it.

May import: the standard library.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

__all__ = [
    "SENDFILE_MAX",
    "WIRE_READY_MAX",
    "FileSender",
    "WireReadyFiles",
    "cached",
    "dup_pair",
    "sendfile_owned",
]

#: Octets one ``sendfile`` call may send before other sessions get their turn.
SENDFILE_MAX: Final = 1024 * 1024
#: Identities :class:`WireReadyFiles` remembers at most (about 100 octets each).
WIRE_READY_MAX: Final = 4096

Identity = tuple[int, int, int, int, int]

#: ``preadv`` flag: fail with ``EAGAIN`` rather than read the disk (0: the platform lacks it).
_NOWAIT: Final[int] = getattr(os, "RWF_NOWAIT", 0)
_PROBE = bytearray(1)


def cached(fd: int, offset: int, count: int) -> bool:
    """Say whether the page cache holds the first and the last octet of a range of ``fd``.

    Readahead fills a file's pages in order, so both ends cached means the range most
    likely is: a ``sendfile`` of it will not wait for the disk.  ``False`` when either is
    not, when the file ends before the range does, or when the platform cannot tell.
    """
    if not _NOWAIT:
        return False
    try:
        for at in (offset, offset + count - 1):
            if os.preadv(fd, [_PROBE], at, _NOWAIT) != 1:
                return False
    except OSError:  # BlockingIOError: not cached; others: the send itself will tell
        return False
    return True


def dup_pair(out: int, fd: int) -> tuple[int, int]:
    """Return duplicates of both descriptors (for :func:`sendfile_owned`); none leaks."""
    out_copy = os.dup(out)
    try:
        return out_copy, os.dup(fd)
    except OSError:
        os.close(out_copy)
        raise


def sendfile_owned(out: int, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` on descriptors of the caller's own, closed here (a worker thread).

    The session may end while the thread runs and close its descriptors, whose numbers the
    process may then give to other files: the thread must never use those.
    """
    try:
        return os.sendfile(out, fd, offset, count)
    finally:
        os.close(fd)
        os.close(out)


class FileSender(Protocol):
    """What the transport driver offers for sending a file (plain connections only)."""

    def sendfile_ready(self) -> bool:
        """Say whether a file may be sent now: a plain socket, nothing queued before it."""

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """Write what the core has queued, then ``count`` octets of ``fd`` from ``offset``.

        Returns:
            The octets of the file sent: fewer than ``count`` only if the file ended first.

        Raises:
            ConnectionError: the connection failed or was lost.
        """


class WireReadyFiles:
    """The message files this process has seen to be in wire form, by identity (bounded).

    The oldest entry is forgotten first; forgetting only costs a pass through the encoder.
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = WIRE_READY_MAX) -> None:
        self._limit = limit
        self._seen: dict[Identity, None] = {}

    def __contains__(self, identity: Identity) -> bool:
        return identity in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, identity: Identity) -> None:
        """Remember a file sent unchanged by the encoder."""
        if identity in self._seen:
            return
        if len(self._seen) >= self._limit:
            del self._seen[next(iter(self._seen))]
        self._seen[identity] = None

    def discard(self, identity: Identity) -> None:
        """Forget a file (it did not send as expected)."""
        self._seen.pop(identity, None)
