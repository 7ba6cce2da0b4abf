"""The Maildir index caches whether each message has a header end (``oe-ns-eoh``).

``pop3_client_workarounds = oe-ns-eoh`` counts 2 more octets for a message without the empty
line that ends its header, so the server must know that of every message at login.  The
store finds it out once per message and keeps it in ``pobox-uidlist`` (``H1``/``H0``).  A
message whose content is changed behind pobox's back (same name) shows whether it was read
again: the cached answer is still the old one.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import re
from pathlib import Path

from pobox.storage.base import MessageInfo
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._index import (
    INDEX_NAME,
    IndexEntry,
    UidList,
    format_pobox_uidlist,
    parse_pobox_uidlist,
)
from pobox.storage.privsep._protocol import messages_from_wire, messages_to_wire
from tests.helpers.maildir import User, deliver

ALICE = User("alice")
NO_HEADER_END = b"Subject: no body\nX-Nul: a\0b\n"
WITH_HEADER_END = b"Subject: hi\n\nbody\n"
EMPTY_HEADER = b"\nbody only\n"  # the empty first line ends an empty header


def store(maildir: Path, *, header_ends: bool = True) -> MaildirStore:
    """A new store (its own, empty snapshot cache): all it knows comes from the disk."""
    return MaildirStore(f"maildir:{maildir.parent}/%n", header_ends=header_ends)


async def snapshot(maildir: Path, *, header_ends: bool = True) -> list[MessageInfo]:
    """Open Alice's maildrop with a new store, return its snapshot, close."""
    maildrop = await store(maildir, header_ends=header_ends).open(ALICE)
    try:
        return list(maildrop.messages)
    finally:
        await maildrop.close()


def rewrite_in_place(maildir: Path, base: str, data: bytes) -> None:
    """Change a message's content without renaming it (what pobox never expects)."""
    (path,) = (maildir / "new").glob(base + "*")
    path.write_bytes(data)


class TestCache:
    """Found once, kept in the index, not read again."""

    async def test_found_and_kept(self, tmp_path: Path) -> None:
        """Each message's answer is in the snapshot and in the index."""
        maildir = tmp_path / "alice"
        bases = [deliver(maildir, m) for m in (NO_HEADER_END, WITH_HEADER_END, EMPTY_HEADER)]

        infos = await snapshot(maildir)

        assert [False, True, True] == [info.header_end for info in infos]
        index = (maildir / INDEX_NAME).read_text()
        assert [" H0 ", " H1 ", " H1 "] == [
            re.search(r" H[01] ", line).group(0)  # type: ignore[union-attr]
            for base in bases
            for line in index.splitlines()
            if line.endswith(base)
        ]

    async def test_second_open_reads_no_message(self, tmp_path: Path) -> None:
        """A new process (no memory cache) takes the index's answer: the files are not read."""
        maildir = tmp_path / "alice"
        without = deliver(maildir, NO_HEADER_END)
        with_end = deliver(maildir, WITH_HEADER_END)
        assert [False, True] == [info.header_end for info in await snapshot(maildir)]
        # Swap the answers on disk, names unchanged: a read would see the swap.
        rewrite_in_place(maildir, without, b"\r\n" + NO_HEADER_END[:-2])
        rewrite_in_place(maildir, with_end, b"Subject: hi\nX: body\n")

        assert [False, True] == [info.header_end for info in await snapshot(maildir)]

    async def test_off_reads_nothing_and_says_unknown(self, tmp_path: Path) -> None:
        """Without header_ends the store says None (unknown) and writes no H field."""
        maildir = tmp_path / "alice"
        deliver(maildir, NO_HEADER_END)

        infos = await snapshot(maildir, header_ends=False)

        assert [None] == [info.header_end for info in infos]
        assert " H" not in (maildir / INDEX_NAME).read_text()

    async def test_index_from_before_is_completed(self, tmp_path: Path) -> None:
        """An index written without H fields gets them at the next open with header_ends."""
        maildir = tmp_path / "alice"
        deliver(maildir, NO_HEADER_END)
        deliver(maildir, WITH_HEADER_END)
        await snapshot(maildir, header_ends=False)

        infos = await snapshot(maildir)

        assert [False, True] == [info.header_end for info in infos]
        assert 2 == (maildir / INDEX_NAME).read_text().count(" H")

    async def test_new_arrival_looked_at_once(self, tmp_path: Path) -> None:
        """A message delivered after the first open is read at the next, then not again."""
        maildir = tmp_path / "alice"
        deliver(maildir, WITH_HEADER_END)
        await snapshot(maildir)
        late = deliver(maildir, NO_HEADER_END)

        first = await snapshot(maildir)
        rewrite_in_place(maildir, late, WITH_HEADER_END + b"12345678901")
        second = await snapshot(maildir)

        assert ([True, False], [True, False]) == (
            [info.header_end for info in first],
            [info.header_end for info in second],
        )


class TestIndexFormat:
    """The H field in ``pobox-uidlist``: written, read back, and ignored when malformed."""

    def test_round_trip(self) -> None:
        """H1, H0 and no H come back as True, False and None."""
        uidlist = UidList(7, 4)
        uidlist.entries = {
            "a": IndexEntry(1, 10, header_end=True),
            "b": IndexEntry(2, 20, header_end=False),
            "c": IndexEntry(3, 30, uidl="imported", header_end=False),
            "d": IndexEntry(4, 40),
        }
        text = format_pobox_uidlist(uidlist)

        parsed = parse_pobox_uidlist(text)

        assert parsed is not None
        assert (True, False, False, None) == tuple(parsed[0].entries[k].header_end for k in "abcd")
        assert "1 W10 H1 :a\n" in text

    def test_bad_value_is_unknown(self) -> None:
        """An H field other than H0/H1 means "not known" (the message is read again)."""
        parsed = parse_pobox_uidlist("pobox-uidlist 1 V7 N3\n1 W10 H7 :a\n2 W5 O1 H1 :b\n")

        assert parsed is not None
        assert (None, True) == (
            parsed[0].entries["a"].header_end,
            parsed[0].entries["b"].header_end,
        )


def test_privsep_wire_carries_it() -> None:
    """The root storage helper's snapshot frame keeps the field."""
    infos = (MessageInfo("a", 1, "u1", True), MessageInfo("b", 2, "u2", None))

    assert infos == messages_from_wire(messages_to_wire(infos))
