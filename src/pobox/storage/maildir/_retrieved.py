"""When each message of a Maildir was first retrieved: ``pobox-retrieved``, for EXPIRE.

RFC 2449 §6.7 EXPIRE (``pop3_expire_days``) deletes a message some days after its first
RETR, so that time must outlive the session; the ``S`` flag cannot carry it (an IMAP client
sets it too, and a flag has no date).  pobox keeps it in ``<maildir>/pobox-retrieved``::

    pobox-retrieved 1
    1700000123 1700000012.M88P7.mx
    1700000456 1700000099.M12P8.mx

A header line (the format name and version ``1``), then one line per message retrieved: the
time of its first RETR (whole seconds since the epoch), a space, and the message's *base
name* (as the index, :mod:`._index`, keys it).  Lines that do not parse are dropped.

The file is below the maildir, so its user controls it: it is read through
:meth:`~pobox.storage._safefs.Dir.read_file` (a regular file of the owner, size-capped), every
line is checked, and what it says can only make the user's own mail expire sooner or later.
It is replaced whole (:meth:`~pobox.storage._safefs.Dir.replace`) under the index lock, so
concurrent sessions (``pop3_lock_session = false``) do not lose each other's times.

May import: the standard library, :mod:`pobox.storage._safefs` and :mod:`._index`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from pobox.storage._safefs import Dir
from pobox.storage.maildir._index import INDEX_MAX, INDEX_MAX_LINES

__all__ = [
    "RETRIEVED_NAME",
    "format_retrieved",
    "parse_retrieved",
    "read_retrieved",
    "update_retrieved",
]

#: File name of the first-retrieval times, inside the maildir.
RETRIEVED_NAME = "pobox-retrieved"
_HEADER = "pobox-retrieved 1"


def parse_retrieved(text: str) -> dict[str, int]:
    """Return ``base name → first retrieval`` from the text of a ``pobox-retrieved``.

    An unknown header gives nothing (a future format is not guessed at); lines that do not
    parse, and lines beyond :data:`~._index.INDEX_MAX_LINES`, are skipped.
    """
    lines = text.split("\n", INDEX_MAX_LINES + 1)
    if lines[0] != _HEADER:
        return {}
    out: dict[str, int] = {}
    for line in lines[1 : INDEX_MAX_LINES + 1]:
        when, _, base = line.partition(" ")
        if when.isascii() and when.isdigit() and len(when) <= 12 and base and "/" not in base:
            out.setdefault(base, int(when))
    return out


def format_retrieved(times: Mapping[str, int]) -> str:
    """Return the text of a ``pobox-retrieved`` holding ``times``, oldest first."""
    lines = [f"{when} {base}\n" for base, when in sorted(times.items(), key=lambda i: i[1])]
    return _HEADER + "\n" + "".join(lines)


def read_retrieved(root: Dir) -> dict[str, int]:
    """Return the times of the maildir at ``root`` (nothing if it has no ``pobox-retrieved``).

    Raises:
        StorageError: the file is not a regular file of the owner, too large, or unreadable.
    """
    raw = root.read_file(RETRIEVED_NAME, INDEX_MAX)
    return {} if raw is None else parse_retrieved(raw.decode("utf-8", "surrogateescape"))


def update_retrieved(
    root: Dir, add: Mapping[str, int], *, keep: Collection[str] | None, drop: Collection[str] = ()
) -> None:
    """Add first retrievals to the file (a time there stays), drop some; the caller locks.

    Args:
        root: the maildir.
        add: base name → time, for messages that have none yet.
        keep: when given, every entry whose base name is not in it is dropped too (the
            caller holds the session lock and passes its snapshot: any other entry is of a
            message gone).
        drop: base names to drop (messages deleted).

    Raises:
        StorageError: the file could not be read or written.
    """
    times = read_retrieved(root)
    before = dict(times)
    for base, when in add.items():
        times.setdefault(base, when)
    for base in drop:
        times.pop(base, None)
    if keep is not None:
        times = {base: when for base, when in times.items() if base in keep}
    if times != before:
        root.replace(RETRIEVED_NAME, format_retrieved(times).encode("utf-8", "surrogateescape"))
