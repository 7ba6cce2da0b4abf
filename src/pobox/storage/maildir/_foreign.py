"""UIDLs another POP3 server handed out, kept when pobox first opens a maildir.

A maildir moved from another server keeps the UIDLs its clients know, so that clients which
leave mail on the server do not download everything again. Besides Dovecot's
``dovecot-uidlist`` (:mod:`._index`), pobox reads, once, when the maildir has no
``pobox-uidlist`` yet:

* ``pobox-uidl-map``, a map the admin writes from the old server's answers: one message per
  line, ``<file name or base name> <UIDL>``, separated by spaces or tabs; empty lines and lines
  starting with ``#`` are ignored. A file name's flags part (``:2,S``) does not matter. It
  wins over every other source.
* ``courierpop3dsizelist``, Courier's POP3 list (versions 2 and 3): a header
  ``/<version> <next uid> <uidvalidity>``, then ``<file name> <size> <uid>:<uidvalidity>`` (version
  3 adds ``:<utf8 flag>``). Courier answers UIDL with ``UID<uid>-<uidvalidity>`` (``UID<uid>``
  when the UIDVALIDITY is 0); older headerless files (Courier before 0.43) are ignored, as
  Courier itself ignores them.
* with ``pop3_reuse_xuidl`` (Dovecot's key), an ``X-UIDL:`` header in the message itself, as
  qpopper and other mbox servers left them (read by the caller, see :func:`xuidl_header`).

Each file is the maildir user's to write: it is read through the safe file layer (a regular
file of the owner, no link followed), at most :data:`FOREIGN_MAX` octets (a larger one is
ignored, logged), and parsed line by line with anything malformed skipped. What is imported
must still be an RFC 1939 unique-id: 1-70 characters 0x21-0x7E, unique in the maildrop, and
never of the form of pobox's own generated UIDLs for this UIDVALIDITY (a message delivered
later could get it). A UIDL that fails gets a fresh one (logged): the first message (lowest
UID) keeps a duplicated one.

May import: the standard library, :mod:`._index` and :mod:`._names`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pobox.storage.maildir._index import is_valid_uidl
from pobox.storage.maildir._names import base_name

__all__ = [
    "COURIER_NAME",
    "FOREIGN_MAX",
    "MAP_NAME",
    "XUIDL_HEADER_MAX",
    "checked_uidls",
    "parse_courier_sizelist",
    "parse_uidl_map",
    "xuidl_header",
]

#: The admin's map, inside the maildir.
MAP_NAME = "pobox-uidl-map"
#: Courier's POP3 list, inside the maildir.
COURIER_NAME = "courierpop3dsizelist"
#: The largest foreign list read (about 200,000 messages); a larger one is ignored.
FOREIGN_MAX = 16 * 1024 * 1024
#: How much of a message's header is searched for ``X-UIDL:``.
XUIDL_HEADER_MAX = 64 * 1024
#: How much of a refused UIDL a complaint quotes.
_SHOWN = 80
_COURIER_HEADER = re.compile(r"/([23]) ([0-9]+) ([0-9]+)")
_COURIER_UID = re.compile(r"([0-9]+):([0-9]+)(?::[0-9]+)?")


def parse_uidl_map(text: str) -> dict[str, str]:
    """Parse ``pobox-uidl-map``: base name to UIDL (the first line for a base name wins).

    Lines with fewer or more than two fields are skipped; UIDLs are checked by the caller.
    """
    found: dict[str, str] = {}
    for line in text.split("\n"):
        fields = line.split()
        if len(fields) != 2 or fields[0].startswith("#"):  # a name and a UIDL, or not ours
            continue
        name, uidl = fields
        if "/" in name:
            continue
        found.setdefault(base_name(name), uidl)
    return found


def parse_courier_sizelist(text: str) -> dict[str, str]:
    """Parse ``courierpop3dsizelist`` (version 2 or 3): base name to Courier's UIDL.

    Returns an empty map for a file without a usable header. As in Courier, each line is
    split at its last two spaces (a file name may hold spaces); malformed lines are skipped.
    """
    lines = text.split("\n")
    if not lines or _COURIER_HEADER.fullmatch(lines[0].rstrip("\r")) is None:
        return {}
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, rest = line.rpartition(" ")
        name, _, size = name.rpartition(" ")
        uid = _COURIER_UID.fullmatch(rest)
        if not name or "/" in name or not size.isdigit() or uid is None:
            continue
        number, uidvalidity = int(uid[1]), int(uid[2])
        if number == 0:
            continue  # Courier would answer with the file name: not ours to guess
        uidl = f"UID{number}-{uidvalidity}" if uidvalidity else f"UID{number}"
        found.setdefault(base_name(name), uidl)
    return found


def xuidl_header(head: bytes) -> str | None:
    """Return the value of the first ``X-UIDL:`` field of a message's header, if any.

    ``head`` is the start of the message (up to :data:`XUIDL_HEADER_MAX`); the search stops at
    the empty line that ends the header. The value is stripped of blanks; continuation lines
    are not followed (a UIDL has no spaces).
    """
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            break
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"x-uidl":
            text = value.strip().decode("ascii", "replace")
            return text or None
    return None


def checked_uidls(
    assigned: Iterable[tuple[str, str | None, str]],
    generated: re.Pattern[str],
) -> tuple[dict[str, str | None], list[str]]:
    """Check the UIDLs of a maildrop's messages, in UID order.

    Args:
        assigned: ``(base name, imported UIDL or None, generated UIDL)`` per message.
        generated: matches any UIDL pobox may generate in this maildrop.

    Returns:
        The UIDL override to keep per base name (``None``: the generated one), and one
        complaint per UIDL refused.
    """
    keep: dict[str, str | None] = {}
    complaints: list[str] = []
    items = list(assigned)
    taken = {own for _, uidl, own in items if uidl is None}
    for base, uidl, own in items:
        if uidl is None:
            keep[base] = None
            continue
        if not is_valid_uidl(uidl):
            shown = uidl if len(uidl) <= _SHOWN else uidl[:_SHOWN] + "..."
            complaints.append(f"{base}: {shown} is not a valid UIDL")
        elif uidl != own and generated.fullmatch(uidl):
            complaints.append(f"{base}: UIDL {uidl} has the form of pobox's own")
        elif uidl in taken:
            complaints.append(f"{base}: UIDL {uidl} already used by another message")
        else:
            taken.add(uidl)
            keep[base] = uidl
            continue
        keep[base] = None
    return keep, complaints
