"""UIDLs of an mbox, kept in a file beside the spool: ``.<spool>.pobox-uidl``.

An mbox has no file names to hang a UIDL on, and pobox never rewrites the spool just to
number its messages (Dovecot adds ``X-UID``/``X-IMAPbase`` headers, qpopper ``X-UIDL:``; both
change the file an MTA appends to, and the sizes clients saw). Instead the UIDL list records,
in mbox order, each message's *identity* (a digest of its From_ line and served content,
:attr:`~pobox.storage.mbox._format.ParsedMessage.identity`) and its UIDL::

    pobox-mbox-uidl 1 <uidvalidity> <next uid>
    <identity> <uidl>
    ...

At each open the messages of the file are matched to the list in order (a message matches
the first unused entry after the previous match with its identity, so two identical
messages keep their own UIDLs); a message that matches nothing is new and gets
``%08X%08X`` of the next uid and the uidvalidity (Dovecot's default ``pop3_uidl_format``
``%08Xu%08Xv``). Entries nothing matches any more are dropped. A UIDL is never given twice:
the next uid only grows, and a lost list starts again with a new uidvalidity (the time).

``pop3_reuse_xuidl``: when the list does not exist yet (pobox's first look at a spool that
qpopper or another server served), a message's ``X-UIDL:`` header gives its UIDL, if it is a
valid unique-id that no other message of the spool has in its header too: a stranger can mail
an ``X-UIDL:`` header with any value, so duplicates are all refused and fall back to numbered
UIDLs, and headers of mail arriving after that first look are never used.

May import: the standard library and :mod:`pobox.storage`.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pobox.storage.base import is_unique_id
from pobox.storage.mbox._format import ParsedMessage

__all__ = ["UidList", "assign_uidls"]

_MAGIC = "pobox-mbox-uidl"
_VERSION = "1"


@dataclass
class UidList:
    """The UIDL list of one spool.

    Attributes:
        validity: the uidvalidity of the numbered UIDLs.
        next_uid: the next uid to hand out.
        entries: ``(identity, uidl)`` in mbox order.
    """

    validity: int
    next_uid: int = 1
    entries: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def fresh(cls) -> UidList:
        """Return an empty list with a new uidvalidity."""
        return cls(validity=int(time.time()) & 0xFFFFFFFF)

    @classmethod
    def parse(cls, data: bytes) -> UidList | None:
        """Return the list ``data`` holds, ``None`` if it is not one (then start afresh)."""
        try:
            lines = data.decode("ascii").splitlines()
            magic, version, validity, next_uid = lines[0].split()
            if (magic, version) != (_MAGIC, _VERSION):
                return None
            entries = []
            for line in lines[1:]:
                identity, uidl = line.split()
                if not is_unique_id(uidl):
                    return None
                entries.append((identity, uidl))
            return cls(int(validity), int(next_uid), entries)
        except (UnicodeDecodeError, ValueError, IndexError):
            return None

    def render(self) -> bytes:
        """Return the file's text."""
        lines = [f"{_MAGIC} {_VERSION} {self.validity} {self.next_uid}\n"]
        lines.extend(f"{identity} {uidl}\n" for identity, uidl in self.entries)
        return "".join(lines).encode("ascii")


def assign_uidls(
    uidlist: UidList | None, messages: Sequence[ParsedMessage], *, reuse_xuidl: bool
) -> tuple[list[str], UidList, bool]:
    """Give every message its UIDL (see the module documentation).

    Args:
        uidlist: the list as stored, ``None`` if there is none.
        messages: the spool's messages in file order.
        reuse_xuidl: take ``X-UIDL:`` headers when there is no list yet.

    Returns:
        The UIDLs in message order, the updated list, and whether it changed.
    """
    first_look = uidlist is None
    current = UidList.fresh() if uidlist is None else uidlist
    positions: dict[str, list[int]] = {}
    for index, (identity, _) in enumerate(current.entries):
        positions.setdefault(identity, []).append(index)
    uidls: list[str | None] = []
    after = -1
    for message in messages:
        candidates = positions.get(message.identity, [])
        found = bisect.bisect_right(candidates, after)
        if found < len(candidates):
            after = candidates[found]
            uidls.append(current.entries[after][1])
        else:
            uidls.append(None)
    taken = {uidl for uidl in uidls if uidl is not None}
    headers: Counter[str] = Counter()
    if first_look and reuse_xuidl:
        headers.update(m.xuidl for m in messages if m.xuidl and is_unique_id(m.xuidl))
    next_uid = current.next_uid
    result: list[str] = []
    for message, matched in zip(messages, uidls, strict=True):
        uidl = matched
        xuidl = message.xuidl
        if uidl is None and xuidl and headers[xuidl] == 1 and xuidl not in taken:
            uidl = xuidl
        while uidl is None:
            candidate = f"{next_uid:08X}{current.validity:08X}"
            next_uid += 1
            if candidate not in taken and headers[candidate] == 0:
                uidl = candidate
        taken.add(uidl)
        result.append(uidl)
    updated = UidList(
        current.validity,
        next_uid,
        [(m.identity, u) for m, u in zip(messages, result, strict=True)],
    )
    changed = first_look or updated.entries != current.entries or next_uid != current.next_uid
    return result, updated, changed
