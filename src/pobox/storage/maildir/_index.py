"""The UID index of a Maildir: pobox's own ``pobox-uidlist`` and the import of Dovecot's.

POP3 needs a unique-id per message that is stable across sessions and never reused
(RFC 1939 §7), and a size in wire octets; a Maildir has neither. pobox keeps them in
``<maildir>/pobox-uidlist``, a text file modelled on Dovecot's ``dovecot-uidlist``::

    pobox-uidlist 1 V1700000000 N43
    41 W2310 :1700000012.M88P7.mx,S=2270,W=2310
    42 W517 O1 Pmigrated-uidl-7 :1700000099.M12P8.mx

* Header: the format name, the version (``1``), then space-separated ``<key><value>`` fields:
  ``V`` the UIDVALIDITY, ``N`` the next UID to assign. Unknown fields are ignored.
* One line per message, in UID order: the UID, ``<key><value>`` fields, then `` :`` and the
  message's *base name* (the file name without the ``:2,<flags>`` part, which changes; see
  :mod:`._names`). Fields: ``W`` the wire size (always written), ``P`` a UIDL that overrides the
  generated one (imported from Dovecot), ``O`` a POP3 order number (imported from Dovecot:
  messages with one are listed first, by it), ``H`` whether the message has the empty line
  that ends its header (``H1``) or not (``H0``), cached for ``pop3_client_workarounds =
  oe-ns-eoh`` so that a login reads no message to learn it (absent: not looked at yet).
  Unknown fields are ignored.

The UIDL of a message is ``P`` if present, else ``%08x`` of the UID followed by ``%08x`` of the
UIDVALIDITY: what Dovecot's default ``pop3_uidl_format = %08Xu%08Xv`` produces (Dovecot's
``X`` *modifier* converts to hexadecimal with lower-case digits).

Import: when a maildir has no ``pobox-uidlist`` yet but has a ``dovecot-uidlist`` (version 3,
or version 1 as Courier writes it), its UIDVALIDITY, next UID and UIDs are taken over, with the
``P`` (POP3 UIDL; empty means "the base name"), ``O`` (POP3 order) and ``W`` (wire size)
fields, so pobox answers UIDL exactly as Dovecot did. The import happens once; afterwards
pobox assigns UIDs itself and does not follow later changes to ``dovecot-uidlist``.

The file is read and written as UTF-8 with ``surrogateescape``, so any file name round-trips.

May import: the standard library and :mod:`._names`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pobox.storage.maildir._names import base_name, size_field

__all__ = [
    "DOVECOT_UIDLIST_NAME",
    "INDEX_MAX",
    "INDEX_MAX_LINES",
    "INDEX_NAME",
    "IndexEntry",
    "UidList",
    "format_pobox_uidlist",
    "is_valid_uidl",
    "parse_dovecot_uidlist",
    "parse_pobox_uidlist",
]

#: File name of pobox's index, inside the maildir.
INDEX_NAME = "pobox-uidlist"
#: File name of Dovecot's UID list, inside the maildir.
DOVECOT_UIDLIST_NAME = "dovecot-uidlist"
#: The largest index (of either kind) read: about two million messages. A larger file is
#: refused rather than read into memory (the maildir's user can make it any size).
INDEX_MAX = 128 * 1024 * 1024
#: The most lines an index (of either kind) may have: a million messages. Each parsed line
#: costs about 300 octets of memory, so a user's index of short made-up lines (7 million of
#: them fit in :data:`INDEX_MAX`) would take over 2 GB of the process that serves everyone;
#: capped, an open costs at most what a real million-message maildir costs.
INDEX_MAX_LINES = 1_000_000
_MAGIC = "pobox-uidlist"
_VERSION = "1"
#: ``<uid> W<size> [H<0|1>] :<base name>``, how almost every line of ``pobox-uidlist`` looks.
_COMMON_RECORD = re.compile(r"([0-9]+) W([0-9]+)(?: H([01]))? :([^/]+)")
#: The ``H`` field's value (absent: ``None``) as :attr:`IndexEntry.header_end`.
_HEADER_END: dict[str | None, bool | None] = {None: None, "0": False, "1": True}
#: RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_MAX_UIDL_LENGTH = 70


@dataclass(slots=True)
class IndexEntry:
    """What the index knows about one message.

    Attributes:
        uid: the UID, unique in the maildir for this UIDVALIDITY.
        size: the wire size, or ``None`` if not known yet (imported without ``W``).
        uidl: a UIDL overriding the generated one (Dovecot's ``P`` field), or ``None``.
        order: a POP3 order number (Dovecot's ``O`` field), or ``None``.
        header_end: whether the message has a header end (the ``H`` field), or ``None`` if
            not known yet.
    """

    uid: int
    size: int | None
    uidl: str | None = None
    order: int | None = None
    header_end: bool | None = None


@dataclass(slots=True)
class UidList:
    """The whole index: UIDVALIDITY, next UID and the entries by base name."""

    uidvalidity: int
    next_uid: int
    entries: dict[str, IndexEntry] = field(default_factory=dict)

    def uidl(self, entry: IndexEntry) -> str:
        """Return the POP3 UIDL of ``entry``."""
        if entry.uidl is not None:
            return entry.uidl
        return f"{entry.uid:08x}{self.uidvalidity:08x}"


def is_valid_uidl(uidl: str) -> bool:
    """Tell whether ``uidl`` is a valid RFC 1939 §7 unique-id."""
    return 0 < len(uidl) <= _MAX_UIDL_LENGTH and all("\x21" <= char <= "\x7e" for char in uidl)


def parse_pobox_uidlist(text: str) -> tuple[UidList, bool] | None:
    """Parse a ``pobox-uidlist``.

    Returns:
        The index and whether it was clean, or ``None`` if the header is unusable. Lines that
        cannot be parsed are skipped and make it unclean (the caller rewrites the file): their
        messages get new UIDs, from ``N``, so no UID is ever reused.
    """
    lines = text.split("\n")
    header = lines[0].split()
    if len(header) < 2 or header[0] != _MAGIC or header[1] != _VERSION:
        return None
    fields = _fields(header[2:])
    uidvalidity = _positive(fields.get("V"))
    next_uid = _positive(fields.get("N"))
    if uidvalidity is None or next_uid is None:
        return None
    uidlist = UidList(uidvalidity=uidvalidity, next_uid=next_uid)
    entries = uidlist.entries
    clean = True
    uids: set[int] = set()
    # This loop runs once per message at every open: the common line takes a fast path.
    common = _COMMON_RECORD.fullmatch
    for line in lines[1:]:
        if not line:
            continue
        match = common(line)
        if match is not None:
            uid_text, size_text, eoh, base = match.groups()
            fast_uid = int(uid_text)
            if fast_uid and fast_uid not in uids and base not in entries:
                uids.add(fast_uid)
                entries[base] = IndexEntry(fast_uid, int(size_text), None, None, _HEADER_END[eoh])
                continue
        head, _, base = line.partition(" :")
        tokens = head.split()
        uid = _positive(tokens[0]) if tokens else None
        if uid is None or uid in uids or not base or "/" in base or base in entries:
            clean = False
            continue
        uids.add(uid)
        size = order = None
        uidl: str | None = None
        header_end: bool | None = None
        for token in tokens[1:]:
            key = token[:1]
            if key == "W":
                size = _natural(token[1:])
            elif key == "P":
                uidl = token[1:]
                if not is_valid_uidl(uidl):
                    uidl = None
                    clean = False
            elif key == "O":
                order = _natural(token[1:])
            elif key == "H" and token[1:] in ("0", "1"):
                header_end = token[1:] == "1"
        if size is None:
            clean = False
        entries[base] = IndexEntry(
            uid=uid, size=size, uidl=uidl, order=order, header_end=header_end
        )
    _fix_next_uid(uidlist)
    return uidlist, clean


def format_pobox_uidlist(uidlist: UidList) -> str:
    """Return the text of a ``pobox-uidlist`` holding ``uidlist``."""
    out = [f"{_MAGIC} {_VERSION} V{uidlist.uidvalidity} N{uidlist.next_uid}\n"]
    for base, entry in sorted(uidlist.entries.items(), key=lambda item: item[1].uid):
        parts = [str(entry.uid)]
        if entry.size is not None:
            parts.append(f"W{entry.size}")
        if entry.header_end is not None:
            parts.append("H1" if entry.header_end else "H0")
        if entry.order is not None:
            parts.append(f"O{entry.order}")
        if entry.uidl is not None:
            parts.append(f"P{entry.uidl}")
        parts.append(f":{base}\n")
        out.append(" ".join(parts))
    return "".join(out)


def parse_dovecot_uidlist(text: str) -> UidList | None:
    """Parse a ``dovecot-uidlist`` (version 3, or Courier-compatible version 1).

    Version 3 (Dovecot's ``maildir-uidlist.c``)::

        3 V<uidvalidity> N<next uid> G<mailbox guid> [<key><value> ...]
        <uid> [<key><value> ...] :<base name>

    Version 1: ``1 <uidvalidity> <next uid>``, then ``<uid> <file name>``.

    Returns:
        The index (sizes from ``,W=`` in the name, else the ``W`` field, else unknown), or
        ``None`` if the header is unusable. Bad lines are skipped; as in Dovecot, a later line
        for the same base name replaces an earlier one, and the next UID is raised above the
        highest UID listed (Dovecot's header may lag behind its records).
    """
    lines = text.split("\n")
    header = lines[0].split()
    if not header:
        return None
    if header[0] == "3":
        fields = _fields(header[1:])
        uidvalidity = _positive(fields.get("V"))
        next_uid = _positive(fields.get("N"))
    elif header[0] == "1" and len(header) >= 3:
        uidvalidity = _positive(header[1])
        next_uid = _positive(header[2])
    else:
        return None
    if uidvalidity is None or next_uid is None:
        return None
    uidlist = UidList(uidvalidity=uidvalidity, next_uid=next_uid)
    by_uid: dict[int, str] = {}
    for line in lines[1:]:
        record = _record(line) if header[0] == "3" else _record_v1(line)
        if record is None:
            continue
        uid, record_fields, base = record
        base = base_name(base)
        previous = by_uid.pop(uid, None)
        if previous is not None:
            del uidlist.entries[previous]
        if base in uidlist.entries:
            del by_uid[uidlist.entries[base].uid]
        by_uid[uid] = base
        name_size = size_field(base, "W")
        uidlist.entries[base] = IndexEntry(
            uid=uid,
            size=name_size if name_size is not None else _natural(record_fields.get("W")),
            uidl=_dovecot_uidl(record_fields.get("P"), base),
            order=_natural(record_fields.get("O")),
        )
    _fix_next_uid(uidlist)
    return uidlist


def _dovecot_uidl(value: str | None, base: str) -> str | None:
    """Return the UIDL a Dovecot ``P`` field stands for, or ``None`` to use the generated one.

    An empty ``P`` means "the base name" (Dovecot's ``maildir_mail_get_special``). A value
    that is not a valid RFC 1939 unique-id (e.g. a base name over 70 characters, which Dovecot
    would send anyway) falls back to the generated UIDL.
    """
    if value is None:
        return None
    uidl = value or base
    return uidl if is_valid_uidl(uidl) else None


def dovecot_record(line: str) -> tuple[int, dict[str, str], str] | None:
    """Split a record line of a version 3 ``dovecot-uidlist``: UID, fields, base name."""
    return _record(line)


def _record(line: str) -> tuple[int, dict[str, str], str] | None:
    """Split ``<uid> [<key><value> ...] :<base name>``; ``None`` if malformed."""
    head, colon, base = line.partition(" :")
    if not colon or not base or "/" in base:
        return None
    tokens = head.split()
    if not tokens:
        return None
    uid = _positive(tokens[0])
    if uid is None:
        return None
    return uid, _fields(tokens[1:]), base


def _record_v1(line: str) -> tuple[int, dict[str, str], str] | None:
    """Split a version 1 line, ``<uid> <file name>``; ``None`` if malformed."""
    uid_text, _, name = line.partition(" ")
    uid = _positive(uid_text)
    if uid is None or not name or "/" in name:
        return None
    return uid, {}, name


def _fields(tokens: list[str]) -> dict[str, str]:
    """Map ``<key><value>`` tokens by their one-letter key (the first one wins)."""
    fields: dict[str, str] = {}
    for token in tokens:
        if token:
            fields.setdefault(token[0], token[1:])
    return fields


def _natural(text: str | None) -> int | None:
    """Return ``text`` as a non-negative integer, or ``None``."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _positive(text: str | None) -> int | None:
    """Return ``text`` as a positive integer, or ``None``."""
    value = _natural(text)
    return value if value else None


def _fix_next_uid(uidlist: UidList) -> None:
    """Raise the next UID above every UID in use, so none is ever handed out twice."""
    if uidlist.entries:
        highest = max(entry.uid for entry in uidlist.entries.values())
        uidlist.next_uid = max(uidlist.next_uid, highest + 1)
