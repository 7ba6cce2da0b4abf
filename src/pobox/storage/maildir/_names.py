"""Maildir file names: the base name, the size fields, the delivery order.

A Maildir message file is named ``<base>[:2,<flags>]`` (https://cr.yp.to/proto/maildir.html).
The *base name* (everything before the first ``:``) is set once by the delivering MTA and never
changes, while the flags part changes whenever a client marks the message seen, replied, and
so on, and the file moves from ``new/`` to ``cur/``. So pobox identifies a message by its base
name, as Dovecot does (``maildir_filename_base_cmp``).

Base names often carry size fields, ``,S=<octets>`` (physical size, the file size) and
``,W=<octets>`` (Dovecot's "virtual size": the size with CRLF line endings, which is the POP3
wire size). Dovecot looks only at the first occurrence of ``,W=`` and accepts it only if the
digits end the name or are followed by ``,``; so do we.

May import: the standard library only.
"""

from __future__ import annotations

__all__ = [
    "base_name",
    "delivery_sort_key",
    "is_acceptable_name",
    "seen_name",
    "size_field",
]

_DIGITS = frozenset("0123456789")


def base_name(filename: str) -> str:
    """Return the part of a Maildir file name before the ``:`` that starts the flags."""
    return filename.partition(":")[0]


def seen_name(filename: str) -> str | None:
    """Return the name of message file ``filename`` with the ``S`` (seen) flag added.

    ``base`` becomes ``base:2,S``; ``base:2,FR`` becomes ``base:2,FRS``: the flags stay in
    ASCII order, as the Maildir specification wants (upper-case flags, then Dovecot's
    lower-case keyword letters), each once. ``None`` if the name has the flag already, or an
    info part other than ``2,`` (``1,`` is "experimental semantics": not ours to change).
    """
    base, colon, info = filename.partition(":")
    if not colon:
        return f"{base}:2,S"
    if not info.startswith("2,"):
        return None
    flags = info[2:]
    if "S" in flags:
        return None
    return f"{base}:2,{''.join(sorted({*flags, 'S'}))}"


def is_acceptable_name(filename: str) -> bool:
    """Tell whether a directory entry can be a message pobox handles.

    Hidden files (``.`` prefix, e.g. temporary files of other tools) are not messages, a name
    starting with ``:`` has no base name, and names with CR or LF could not be written to the
    index (Dovecot ignores them too).
    """
    return (
        bool(filename) and filename[0] not in ".:" and "\n" not in filename and "\r" not in filename
    )


def size_field(base: str, key: str) -> int | None:
    """Return the value of the ``,<key>=<digits>`` field of a base name, if it has a valid one.

    Args:
        base: a base name (no flags part).
        key: ``"W"`` for the wire (virtual) size, ``"S"`` for the file size.
    """
    marker = f",{key}="
    start = base.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = start
    while end < len(base) and base[end] in _DIGITS:
        end += 1
    if end == start or (end < len(base) and base[end] != ","):
        return None
    return int(base[start:end])


def delivery_sort_key(base: str) -> tuple[int, int, str]:
    """Return a key ordering base names by delivery time, as Dovecot orders new files.

    Dovecot assigns UIDs to new files sorted by the leading timestamp (seconds), then the
    microseconds of the ``M<usec>`` part of the unique name (``<secs>.M<usec>P<pid>.<host>``),
    then the rest of the name (``maildir_filename_sort_cmp``).
    """
    end = 0
    while end < len(base) and base[end] in _DIGITS:
        end += 1
    seconds = int(base[:end]) if end else 0
    rest = base[end:]
    return seconds, _microseconds(rest), rest


def _microseconds(rest: str) -> int:
    """Return the ``M<usec>`` value of the unique part after the timestamp, or 0."""
    if not rest.startswith("."):
        return 0
    unique = rest[1:].partition(".")[0]
    marker = unique.find("M")
    if marker < 0:
        return 0
    end = marker + 1
    while end < len(unique) and unique[end] in _DIGITS:
        end += 1
    return int(unique[marker + 1 : end] or 0)
