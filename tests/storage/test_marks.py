"""Folder marks (``pop3_folder_mark``): the octets added, where, and the sizes that count them.

Run on the memory store (the reference backend); the Maildir and PostgreSQL stores are marked
by the same wrapper, end to end in ``tests/integration/test_folders.py``.
"""

from __future__ import annotations

import pytest

from pobox.storage.base import Maildrop
from pobox.storage.marks import HEAD_MAX, MarkedMaildrop, mark_folders, subject_offset
from pobox.storage.memory import CHUNK_SIZE, MemoryStore
from tests.helpers.maildir import User, incoming


async def _open(messages: list[tuple[str, bytes]], mark: str) -> Maildrop:
    """Deliver (folder, data) to alice of a new memory store; open INBOX+Junk, marked."""
    store = MemoryStore()
    for folder, data in messages:
        await store.deliver_to_folder(User("alice"), incoming(data), folder)
    return await mark_folders(await store.open_folders(User("alice"), ["INBOX", "Junk"]), mark)


async def _read(maildrop: Maildrop, key: str) -> bytes:
    return b"".join([chunk async for chunk in maildrop.read_message(key)])


class TestSubjectOffset:
    """Where ``[folder] `` goes: after ``Subject:`` and its blanks, in the header only."""

    @pytest.mark.parametrize(
        ("head", "expected"),
        [
            (b"Subject: hi\n\n", 9),
            (b"From: a\r\nSUBJECT:\t  x\r\n\r\n", 20),
            (b"From: a\nX-Subject: no\nsubject:x\n", 30),
            (b"From: a\n\nSubject: in the body\n", None),
            (b"From: a\r\n\r\nSubject: in the body\n", None),
            (b"Subject", None),
            (b"", None),
            (b"Subject:", 8),
        ],
    )
    def test_offsets(self, head: bytes, expected: int | None) -> None:
        """Offsets worked out by hand."""
        assert expected == subject_offset(head)


class TestMarks:
    """What a client reads of a marked maildrop, and the sizes announced for it."""

    async def test_none_returns_the_maildrop_itself(self) -> None:
        """``none`` wraps nothing."""
        store = MemoryStore()
        maildrop = await store.open_folders(User("alice"), ["INBOX", "Junk"])
        assert maildrop is await mark_folders(maildrop, "none")

    async def test_unknown_mark_is_refused(self) -> None:
        """A mark that is not one of the three is a ValueError."""
        store = MemoryStore()
        maildrop = await store.open_folders(User("alice"), ["INBOX"])
        with pytest.raises(ValueError, match="pop3_folder_mark"):
            await mark_folders(maildrop, "color")

    async def test_header_mark_on_junk_only(self) -> None:
        """Junk gets ``X-Folder: Junk`` CRLF on top (16 octets more), the INBOX nothing."""
        maildrop = await _open(
            [("INBOX", b"Subject: a\n\nx\n"), ("Junk", b"Subject: b\n\ny\n")], "header"
        )
        inbox, junk = maildrop.messages
        assert (17, 33) == (inbox.size, junk.size)
        assert b"Subject: a\n\nx\n" == await _read(maildrop, inbox.key)
        assert b"X-Folder: Junk\r\nSubject: b\n\ny\n" == await _read(maildrop, junk.key)
        assert b"X-Folder: Junk\r\nSubject: b\n\ny\n" == maildrop.read_now(junk.key)

    async def test_subject_mark_inserted_in_the_field(self) -> None:
        """``[Junk] `` goes before the subject text; 7 octets more."""
        maildrop = await _open([("Junk", b"From: x\nSubject:  buy\n\nnow\n")], "subject")
        (junk,) = maildrop.messages
        assert 31 + 7 == junk.size
        assert b"From: x\nSubject:  [Junk] buy\n\nnow\n" == await _read(maildrop, junk.key)

    async def test_subject_mark_added_when_there_is_none(self) -> None:
        """A message without a subject (or with one only in the body) gets a Subject line."""
        maildrop = await _open([("Junk", b"From: x\n\nSubject: body\n")], "subject")
        (junk,) = maildrop.messages
        assert 26 + 17 == junk.size  # 23 octets, 3 LFs, the line
        assert b"Subject: [Junk]\r\nFrom: x\n\nSubject: body\n" == await _read(maildrop, junk.key)

    async def test_subject_past_the_head_is_not_searched(self) -> None:
        """A Subject field after HEAD_MAX octets of header: the line goes on top instead."""
        filler = b"X-Pad: " + b"a" * (HEAD_MAX + 10) + b"\n"
        data = filler + b"Subject: late\n\nbody\n"
        maildrop = await _open([("Junk", data)], "subject")
        (junk,) = maildrop.messages
        read = await _read(maildrop, junk.key)
        assert b"Subject: [Junk]\r\n" + data == read

    async def test_large_message_marked_through_read_message(self) -> None:
        """A message read in several chunks gets its mark in the first one, once."""
        data = b"Subject: big\n\n" + b"c" * (3 * CHUNK_SIZE) + b"\n"
        maildrop = await _open([("Junk", data)], "subject")
        (junk,) = maildrop.messages
        assert maildrop.read_now(junk.key) is None
        chunks = [chunk async for chunk in maildrop.read_message(junk.key)]
        assert 1 < len(chunks)
        assert data.replace(b"Subject: big", b"Subject: [Junk] big") == b"".join(chunks)
        assert len(data) + 3 + 7 == junk.size

    @pytest.mark.parametrize("offset", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 5])
    async def test_insertion_on_chunk_boundaries(self, offset: int) -> None:
        """Octets inserted at any offset, chunk boundaries included, land there exactly once."""
        store = MemoryStore()
        data = bytes(range(256)) * (2 * CHUNK_SIZE // 256 + 1)
        store.add("alice", data)
        inner = await store.open(User("alice"))
        (info,) = inner.messages
        marked = MarkedMaildrop(inner, {info.key: (offset, b"<mark>")})
        assert data[:offset] + b"<mark>" + data[offset:] == await _read(marked, info.key)
        assert info.size + 6 == marked.messages[0].size
