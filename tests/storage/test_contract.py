"""The storage contract: what every backend promises the POP3 shell.

Each test runs against every backend of the ``backend`` fixture (``conftest.py``): memory,
and Maildir with and without size fields in file names, with files moved to ``cur/``, and
without an index. Expected sizes are worked out by hand in the test data, never computed by
the code under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from pobox.storage.base import (
    DeletedMailRetention,
    FolderNameError,
    IncomingMessage,
    Maildrop,
    MaildropFolders,
    MaildropLocked,
    MessageGone,
    Quota,
    QuotaExceeded,
    Usage,
    is_unique_id,
)
from pobox.storage.spool import Spool
from tests.helpers.maildir import incoming
from tests.storage.conftest import DELETING, RETENTION

if TYPE_CHECKING:
    from tests.storage.conftest import Backend

#: (stored bytes, wire size): every bare LF counts as CRLF, a CRLF is 2, a bare CR is 1.
MESSAGES = {
    "lf": (b"Subject: a\n\nbody\n", 20),
    "crlf": (b"Subject: a\r\n\r\nbody\r\n", 20),
    "bare-cr": (b"a\rb\r\n", 5),
    "mixed-endings": (b"a\r\nb\nc\rd", 9),
    "no-final-newline": (b"Subject: a\n\nbody", 18),
    "empty": (b"", 0),
    "8-bit": (b"Subject: \xe9\n\n\xff\xfe\x00\x80\n", 20),
    "dot-lines": (b".\n..\n.x\r\n", 11),
}


async def read_all(maildrop: Maildrop, key: str) -> bytes:
    """Return the whole stored message ``key``."""
    return b"".join([chunk async for chunk in maildrop.read_message(key)])


async def read_now_or_all(maildrop: Maildrop, key: str) -> bytes:
    """Return message ``key`` as the session reads it: read_now, else read_message."""
    data = maildrop.read_now(key)
    return await read_all(maildrop, key) if data is None else data


#: How a test reads a whole message: read_all or read_now_or_all.
Reader = Callable[[Maildrop, str], Awaitable[bytes]]


async def contents(maildrop: Maildrop) -> list[bytes]:
    """Return every message of the snapshot, in message-number order."""
    return [await read_all(maildrop, info.key) for info in maildrop.messages]


class TestOpen:
    """Opening a maildrop."""

    async def test_nothing_delivered_opens_empty(self, backend: Backend) -> None:
        """A maildrop nobody delivered to opens with no messages."""
        maildrop = await backend.store.open(backend.user("alice"))
        assert not maildrop.messages
        await maildrop.close()

    async def test_messages_in_delivery_order(self, backend: Backend) -> None:
        """Message 1 is the oldest delivery, then each later one in turn."""
        for number in range(1, 6):
            backend.deliver("alice", f"Subject: {number}\n\n".encode())
        maildrop = await backend.store.open(backend.user("alice"))
        expected = [f"Subject: {number}\n\n".encode() for number in range(1, 6)]
        assert expected == await contents(maildrop)
        await maildrop.close()

    async def test_maildrops_are_per_user(self, backend: Backend) -> None:
        """A user sees their own mail only."""
        backend.deliver("alice", b"for alice\n")
        backend.deliver("bob", b"for bob\n")
        maildrop = await backend.store.open(backend.user("bob"))
        expected = [b"for bob\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()


class TestSnapshot:
    """The message list is fixed when the maildrop is opened."""

    async def test_mail_delivered_after_open_is_invisible(self, backend: Backend) -> None:
        """Mail delivered during a session does not appear in that session."""
        backend.deliver("alice", b"first\n")
        maildrop = await backend.store.open(backend.user("alice"))
        backend.deliver("alice", b"second\n")
        expected = [b"first\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()

    async def test_mail_delivered_after_open_appears_at_reopen(self, backend: Backend) -> None:
        """Mail delivered during a session is there at the next open, after the older mail."""
        backend.deliver("alice", b"first\n")
        maildrop = await backend.store.open(backend.user("alice"))
        backend.deliver("alice", b"second\n")
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        expected = [b"first\n", b"second\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()


class TestSizes:
    """``MessageInfo.size`` is the wire size (RFC 1939 §5)."""

    @pytest.mark.parametrize("case", sorted(MESSAGES))
    async def test_size_is_wire_size(self, backend: Backend, case: str) -> None:
        """The size counts every bare LF as CRLF, and nothing else changes."""
        data, expected = MESSAGES[case]
        backend.deliver("alice", data)
        maildrop = await backend.store.open(backend.user("alice"))
        assert [expected] == [info.size for info in maildrop.messages]
        await maildrop.close()

    async def test_size_stays_the_same_at_reopen(self, backend: Backend) -> None:
        """A message keeps its size from session to session."""
        backend.deliver("alice", b"Subject: a\n\nbody\n")
        for _ in range(2):
            maildrop = await backend.store.open(backend.user("alice"))
            expected = [20]
            assert expected == [info.size for info in maildrop.messages]
            await maildrop.close()

    async def test_large_message_with_crlf_on_chunk_boundaries(self, backend: Backend) -> None:
        """CRLFs that straddle any power-of-two read boundary count as two octets."""
        data = bytearray()
        for boundary in (2**14, 2**16, 2**20):
            data += b"a" * (boundary - 1 - len(data)) + b"\r\n"
        data += b"line\n" * 1000
        backend.deliver("alice", bytes(data))
        maildrop = await backend.store.open(backend.user("alice"))
        assert [len(data) + 1000] == [info.size for info in maildrop.messages]
        await maildrop.close()


class TestReadMessage:
    """``read_message`` yields the stored bytes."""

    @pytest.mark.parametrize("case", sorted(MESSAGES))
    async def test_returns_stored_bytes(self, backend: Backend, case: str) -> None:
        """The chunks join to exactly the bytes delivered, line endings untouched."""
        data, _ = MESSAGES[case]
        backend.deliver("alice", data)
        maildrop = await backend.store.open(backend.user("alice"))
        assert [data] == await contents(maildrop)
        await maildrop.close()

    async def test_large_message_comes_in_several_chunks(self, backend: Backend) -> None:
        """A message of several hundred KiB is yielded in more than one chunk, intact."""
        data = bytes(range(256)) * 2000 + b"\n"
        backend.deliver("alice", data)
        maildrop = await backend.store.open(backend.user("alice"))
        chunks = [chunk async for chunk in maildrop.read_message(maildrop.messages[0].key)]
        assert (data, True) == (b"".join(chunks), len(chunks) > 1)
        await maildrop.close()

    async def test_message_read_twice(self, backend: Backend) -> None:
        """A message can be read again in the same session (TOP, then RETR)."""
        backend.deliver("alice", b"Subject: a\n\nbody\n")
        maildrop = await backend.store.open(backend.user("alice"))
        key = maildrop.messages[0].key
        expected = [b"Subject: a\n\nbody\n"] * 2
        assert expected == [await read_all(maildrop, key) for _ in range(2)]
        await maildrop.close()

    @pytest.mark.parametrize("read", [read_all, read_now_or_all], ids=["message", "now"])
    async def test_unknown_key_is_gone(self, backend: Backend, read: Reader) -> None:
        """A key that is not in the snapshot raises MessageGone (read_now: or read_message)."""
        maildrop = await backend.store.open(backend.user("alice"))
        with pytest.raises(MessageGone):
            await read(maildrop, "no-such-key")
        await maildrop.close()

    @pytest.mark.parametrize("read", [read_all, read_now_or_all], ids=["message", "now"])
    async def test_message_deleted_by_another_session_is_gone(
        self, backend: Backend, read: Reader
    ) -> None:
        """A message deleted after the snapshot raises MessageGone when read."""
        backend.deliver("alice", b"doomed\n")
        reader = await backend.store.open(backend.user("alice"), lock=False)
        deleter = await backend.store.open(backend.user("alice"))
        await deleter.delete([deleter.messages[0].key])
        await deleter.close()
        with pytest.raises(MessageGone):
            await read(reader, reader.messages[0].key)
        await reader.close()


class TestReadNow:
    """``read_now`` returns a small message at once, or ``None`` for read_message."""

    @pytest.mark.parametrize("case", sorted(MESSAGES))
    async def test_same_bytes_as_read_message(self, backend: Backend, case: str) -> None:
        """What read_now returns, when it returns anything, is what read_message yields."""
        data, _ = MESSAGES[case]
        backend.deliver("alice", data)
        maildrop = await backend.store.open(backend.user("alice"))
        now = maildrop.read_now(maildrop.messages[0].key)
        assert now in (None, data)
        assert data == await read_all(maildrop, maildrop.messages[0].key)
        await maildrop.close()

    async def test_large_message_is_left_to_read_message(self, backend: Backend) -> None:
        """A message of several hundred KiB is never read in one piece by read_now."""
        backend.deliver("alice", bytes(range(256)) * 2000 + b"\n")
        maildrop = await backend.store.open(backend.user("alice"))
        assert maildrop.read_now(maildrop.messages[0].key) is None
        await maildrop.close()


@pytest.mark.parametrize("backend", DELETING, indirect=True)
class TestUidl:
    """UIDLs follow RFC 1939 §7: unique, stable, never reused, 1-70 chars of 0x21-0x7E."""

    async def test_valid_characters_and_length(self, backend: Backend) -> None:
        """Every UIDL is 1 to 70 printable, non-space ASCII characters."""
        for data, _ in MESSAGES.values():
            backend.deliver("alice", data)
        maildrop = await backend.store.open(backend.user("alice"))
        invalid = [
            info.uidl
            for info in maildrop.messages
            if not 1 <= len(info.uidl) <= 70 or any(not 0x21 <= ord(c) <= 0x7E for c in info.uidl)
        ]
        assert not invalid
        await maildrop.close()

    async def test_unique(self, backend: Backend) -> None:
        """No two messages of a maildrop share a UIDL."""
        for number in range(20):
            backend.deliver("alice", f"message {number}\n".encode())
        maildrop = await backend.store.open(backend.user("alice"))
        expected = 20
        assert expected == len({info.uidl for info in maildrop.messages})
        await maildrop.close()

    async def test_identical_messages_differ(self, backend: Backend) -> None:
        """Two deliveries of the same bytes are two messages with two UIDLs."""
        backend.deliver("alice", b"Subject: same\n\nsame\n")
        backend.deliver("alice", b"Subject: same\n\nsame\n")
        maildrop = await backend.store.open(backend.user("alice"))
        expected = 2
        assert expected == len({info.uidl for info in maildrop.messages})
        await maildrop.close()

    async def test_stable_across_sessions(self, backend: Backend) -> None:
        """Each message keeps its UIDL from one session to the next."""
        for number in range(3):
            backend.deliver("alice", f"message {number}\n".encode())
        first = await backend.store.open(backend.user("alice"))
        before = [(await read_all(first, info.key), info.uidl) for info in first.messages]
        await first.close()
        second = await backend.store.open(backend.user("alice"))
        after = [(await read_all(second, info.key), info.uidl) for info in second.messages]
        await second.close()
        assert before == after

    async def test_stable_after_other_messages_are_deleted(self, backend: Backend) -> None:
        """Deleting a message does not change the UIDLs of the others."""
        for number in range(3):
            backend.deliver("alice", f"message {number}\n".encode())
        maildrop = await backend.store.open(backend.user("alice"))
        kept = {info.uidl for info in maildrop.messages[1:]}
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        assert kept == {info.uidl for info in maildrop.messages}
        await maildrop.close()

    async def test_never_reused_after_delete(self, backend: Backend) -> None:
        """Mail delivered after others were deleted never gets one of their UIDLs."""
        seen: set[str] = set()
        for _ in range(3):
            backend.deliver("alice", b"Subject: same\n\nsame\n")
            backend.deliver("alice", b"Subject: other\n\nother\n")
            maildrop = await backend.store.open(backend.user("alice"))
            uidls = {info.uidl for info in maildrop.messages}
            assert set() == uidls & seen
            seen |= uidls
            await maildrop.delete([info.key for info in maildrop.messages])
            await maildrop.close()


class TestLock:
    """A maildrop opened with ``lock=True`` is exclusive until closed (RFC 1939 §8)."""

    async def test_second_locked_open_is_refused(self, backend: Backend) -> None:
        """While a session holds the lock, another locked open raises MaildropLocked."""
        first = await backend.store.open(backend.user("alice"))
        with pytest.raises(MaildropLocked):
            await backend.store.open(backend.user("alice"))
        await first.close()

    async def test_close_releases_the_lock(self, backend: Backend) -> None:
        """After close, the maildrop can be locked again."""
        first = await backend.store.open(backend.user("alice"))
        await first.close()
        second = await backend.store.open(backend.user("alice"))
        await second.close()

    async def test_close_twice_is_harmless(self, backend: Backend) -> None:
        """Closing twice does not release a lock another session took meanwhile."""
        first = await backend.store.open(backend.user("alice"))
        await first.close()
        second = await backend.store.open(backend.user("alice"))
        await first.close()
        with pytest.raises(MaildropLocked):
            await backend.store.open(backend.user("alice"))
        await second.close()

    async def test_unlocked_open_ignores_the_lock(self, backend: Backend) -> None:
        """``lock=False`` opens a maildrop another session holds, and sees its mail."""
        backend.deliver("alice", b"hello\n")
        holder = await backend.store.open(backend.user("alice"))
        viewer = await backend.store.open(backend.user("alice"), lock=False)
        expected = [b"hello\n"]
        assert expected == await contents(viewer)
        await viewer.close()
        await holder.close()

    async def test_unlocked_session_does_not_lock(self, backend: Backend) -> None:
        """A ``lock=False`` session does not stop a locked open."""
        viewer = await backend.store.open(backend.user("alice"), lock=False)
        holder = await backend.store.open(backend.user("alice"))
        await holder.close()
        await viewer.close()

    async def test_locks_are_per_maildrop(self, backend: Backend) -> None:
        """Alice's session does not lock Bob's maildrop."""
        alice = await backend.store.open(backend.user("alice"))
        bob = await backend.store.open(backend.user("bob"))
        await bob.close()
        await alice.close()


@pytest.mark.parametrize("backend", DELETING, indirect=True)
class TestDelete:
    """``delete`` removes messages for good (UPDATE state, RFC 1939 §6)."""

    async def test_deleted_messages_are_gone_at_reopen(self, backend: Backend) -> None:
        """Deleted messages are not in the next session; the others are, in order."""
        for number in range(4):
            backend.deliver("alice", f"message {number}\n".encode())
        maildrop = await backend.store.open(backend.user("alice"))
        await maildrop.delete([maildrop.messages[1].key, maildrop.messages[3].key])
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        expected = [b"message 0\n", b"message 2\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()

    async def test_result_lists_removed_keys(self, backend: Backend) -> None:
        """The result names every removed key and no failure."""
        backend.deliver("alice", b"one\n")
        backend.deliver("alice", b"two\n")
        maildrop = await backend.store.open(backend.user("alice"))
        keys = [info.key for info in maildrop.messages]
        result = await maildrop.delete(keys)
        assert (tuple(keys), ()) == (result.removed, result.failed)
        await maildrop.close()

    async def test_already_gone_counts_as_removed(self, backend: Backend) -> None:
        """Deleting a message another session deleted first succeeds."""
        backend.deliver("alice", b"doomed\n")
        first = await backend.store.open(backend.user("alice"), lock=False)
        second = await backend.store.open(backend.user("alice"), lock=False)
        key = second.messages[0].key
        await first.delete([first.messages[0].key])
        result = await second.delete([key])
        assert ((key,), ()) == (result.removed, result.failed)
        await first.close()
        await second.close()

    async def test_key_outside_snapshot_fails(self, backend: Backend) -> None:
        """A key that is not in the session's snapshot is reported failed, nothing removed."""
        backend.deliver("alice", b"kept\n")
        maildrop = await backend.store.open(backend.user("alice"))
        result = await maildrop.delete(["no-such-key"])
        expected = ((), ("no-such-key",))
        assert expected == (result.removed, result.failed)
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        expected_contents = [b"kept\n"]
        assert expected_contents == await contents(maildrop)
        await maildrop.close()

    async def test_mail_delivered_during_session_survives(self, backend: Backend) -> None:
        """Deleting every message of the snapshot leaves mail that arrived meanwhile."""
        backend.deliver("alice", b"old\n")
        maildrop = await backend.store.open(backend.user("alice"))
        backend.deliver("alice", b"new\n")
        await maildrop.delete([info.key for info in maildrop.messages])
        await maildrop.close()
        maildrop = await backend.store.open(backend.user("alice"))
        expected = [b"new\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()

    async def test_nothing_to_delete(self, backend: Backend) -> None:
        """Deleting no keys removes nothing and fails nothing."""
        maildrop = await backend.store.open(backend.user("alice"))
        result = await maildrop.delete([])
        expected = ((), ())
        assert expected == (result.removed, result.failed)
        await maildrop.close()

    async def test_closed_maildrop_refuses_to_delete(self, backend: Backend) -> None:
        """After close, delete raises instead of touching a maildrop it no longer locks."""
        backend.deliver("alice", b"kept\n")
        maildrop = await backend.store.open(backend.user("alice"))
        await maildrop.close()
        with pytest.raises(RuntimeError):
            await maildrop.delete([maildrop.messages[0].key])


@pytest.mark.parametrize("backend", DELETING, indirect=True)
class TestDeliver:
    """Delivery through the store: what LMTP, SMTP and ``pobox deliver`` rely on."""

    async def test_header_and_body_are_stored_in_stored_form(self, backend: Backend) -> None:
        """The recipient's header comes first; the body's CRLF line endings are stored as LF."""
        message = incoming(b"Subject: a\r\n\r\nbody\r\n", header=b"Delivered-To: alice\n")
        await backend.store.deliver(backend.user("alice"), message)
        maildrop = await backend.store.open(backend.user("alice"))
        expected = ([b"Delivered-To: alice\nSubject: a\n\nbody\n"], [41])
        assert expected == (await contents(maildrop), [info.size for info in maildrop.messages])
        await maildrop.close()

    async def test_deliveries_come_in_order_after_existing_mail(self, backend: Backend) -> None:
        """Mail delivered through the store follows mail already there, in delivery order."""
        backend.deliver("alice", b"first\n")
        for text in (b"second\n", b"third\n"):
            await backend.store.deliver(backend.user("alice"), incoming(text))
        maildrop = await backend.store.open(backend.user("alice"))
        expected = [b"first\n", b"second\n", b"third\n"]
        assert expected == await contents(maildrop)
        await maildrop.close()

    async def test_one_body_for_many_recipients(self, backend: Backend) -> None:
        """One spooled body delivered to several users reaches each with their own header."""
        body = Spool.from_bytes(b"shared\r\n")
        for name in ("alice", "bob"):
            header = f"Delivered-To: {name}\n".encode()
            await backend.store.deliver(backend.user(name), IncomingMessage(header, body))
        got = []
        for name in ("alice", "bob"):
            maildrop = await backend.store.open(backend.user(name))
            got += await contents(maildrop)
            await maildrop.close()
        assert [b"Delivered-To: alice\nshared\n", b"Delivered-To: bob\nshared\n"] == got

    async def test_delivery_while_a_session_holds_the_lock(self, backend: Backend) -> None:
        """Delivery never waits for a session, and the session's snapshot does not change."""
        backend.deliver("alice", b"old\n")
        session = await backend.store.open(backend.user("alice"))
        await backend.store.deliver(backend.user("alice"), incoming(b"new\n"))
        assert [b"old\n"] == await contents(session)
        await session.close()
        maildrop = await backend.store.open(backend.user("alice"))
        assert [b"old\n", b"new\n"] == await contents(maildrop)
        await maildrop.close()

    async def test_concurrent_deliveries_are_all_kept(self, backend: Backend) -> None:
        """Twenty deliveries at once are all stored, each with its own UIDL."""
        await asyncio.gather(
            *(
                backend.store.deliver(backend.user("alice"), incoming(f"{n}\n".encode()))
                for n in range(20)
            )
        )
        maildrop = await backend.store.open(backend.user("alice"))
        expected = sorted(f"{n}\n".encode() for n in range(20))
        uidls = {info.uidl for info in maildrop.messages}
        assert (expected, 20) == (sorted(await contents(maildrop)), len(uidls))
        await maildrop.close()

    async def test_usage_counts_stored_octets_and_messages(self, backend: Backend) -> None:
        """usage() is the stored size (LF line endings) and the number of messages."""
        assert Usage(octets=0, messages=0) == await backend.store.usage(backend.user("alice"))
        await backend.store.deliver(backend.user("alice"), incoming(b"12345\r\n"))
        await backend.store.deliver(backend.user("alice"), incoming(b"ab\n", header=b"H\n"))
        assert Usage(octets=11, messages=2) == await backend.store.usage(backend.user("alice"))

    async def test_usage_drops_after_delete(self, backend: Backend) -> None:
        """Deleted messages no longer count."""
        await backend.store.deliver(backend.user("alice"), incoming(b"12345\n"))
        maildrop = await backend.store.open(backend.user("alice"))
        await maildrop.delete([info.key for info in maildrop.messages])
        await maildrop.close()
        assert Usage(octets=0, messages=0) == await backend.store.usage(backend.user("alice"))

    @pytest.mark.parametrize(
        ("quota", "second"),
        [(Quota(max_messages=1), b"y\n"), (Quota(max_bytes=10), b"123456\n")],
        ids=["messages", "bytes"],
    )
    async def test_quota_refuses_and_stores_nothing(
        self, backend: Backend, quota: Quota, second: bytes
    ) -> None:
        """A message that would go over the quota is refused and leaves the maildrop as it was."""
        await backend.store.deliver(backend.user("alice"), incoming(b"1234\n"), quota=quota)
        with pytest.raises(QuotaExceeded):
            await backend.store.deliver(backend.user("alice"), incoming(second), quota=quota)
        assert Usage(octets=5, messages=1) == await backend.store.usage(backend.user("alice"))

    async def test_quota_counts_the_message_itself(self, backend: Backend) -> None:
        """A message exactly filling the quota fits; one octet more does not."""
        quota = Quota(max_bytes=5)
        await backend.store.deliver(backend.user("alice"), incoming(b"1234\n"), quota=quota)
        with pytest.raises(QuotaExceeded):
            await backend.store.deliver(backend.user("bob"), incoming(b"12345\n"), quota=quota)
        assert Usage(octets=0, messages=0) == await backend.store.usage(backend.user("bob"))


def _retention(backend: Backend) -> DeletedMailRetention:
    """The store's retention capability (every ``retaining`` backend has it)."""
    store = backend.store
    assert isinstance(store, DeletedMailRetention)
    return store


async def _snapshot(backend: Backend) -> list[tuple[str, int, bytes]]:
    """(UIDL, size, bytes) of every message of a fresh session, in order."""
    maildrop = await backend.store.open(backend.user("alice"))
    try:
        return [(i.uidl, i.size, await read_all(maildrop, i.key)) for i in maildrop.messages]
    finally:
        await maildrop.close()


async def _delete(backend: Backend, numbers: list[int]) -> list[tuple[str, int]]:
    """Delete messages (0-based) in one session; return their (UIDL, size)."""
    maildrop = await backend.store.open(backend.user("alice"))
    chosen = [maildrop.messages[n] for n in numbers]
    result = await maildrop.delete([info.key for info in chosen])
    await maildrop.close()
    assert (len(chosen), ()) == (len(result.removed), result.failed)
    return [(info.uidl, info.size) for info in chosen]


class TestDeletedMailRetention:
    """``pop3_delete_retention``: deleted mail kept, invisible, restorable with its UIDL.

    Runs on the backends that keep deleted mail (``RETAINING`` in conftest: Maildir and
    PostgreSQL); memory does not offer :class:`DeletedMailRetention`, which the last test
    checks.
    """

    async def test_deleted_message_is_invisible_but_kept(self, retaining: Backend) -> None:
        """Gone from the next snapshot and from usage; listed as kept with UIDL and size."""
        for number in range(3):
            retaining.deliver("alice", f"Subject: {number}\n\nbody {number}\n".encode())
        before = await _snapshot(retaining)
        deleted = await _delete(retaining, [1])
        assert [before[0], before[2]] == await _snapshot(retaining)
        kept = await _retention(retaining).deleted_messages(retaining.user("alice"))
        assert deleted == [(k.uidl, k.size) for k in kept]
        usage = await retaining.store.usage(retaining.user("alice"))
        assert 2 == usage.messages

    async def test_restore_brings_back_uidl_size_and_bytes(self, retaining: Backend) -> None:
        """A restored message is listed again with the same UIDL, size and content."""
        for number in range(3):
            retaining.deliver("alice", f"Subject: {number}\r\n\r\nline\n{number}\n".encode())
        before = await _snapshot(retaining)
        await _delete(retaining, [0, 2])
        restored = await _retention(retaining).restore_deleted(retaining.user("alice"))
        assert {before[0][0], before[2][0]} == {m.uidl for m in restored}
        assert sorted(before) == sorted(await _snapshot(retaining))
        assert () == await _retention(retaining).deleted_messages(retaining.user("alice"))

    async def test_restore_by_uidl_only_that_one(self, retaining: Backend) -> None:
        """``uidls`` picks the messages; the others stay kept."""
        for number in range(3):
            retaining.deliver("alice", f"m{number}\n".encode())
        deleted = await _delete(retaining, [0, 1, 2])
        store = _retention(retaining)
        restored = await store.restore_deleted(retaining.user("alice"), uidls=[deleted[1][0]])
        assert [deleted[1][0]] == [m.uidl for m in restored]
        assert [(deleted[1][0], b"m1\n")] == [(u, b) for u, _, b in await _snapshot(retaining)]
        kept = await store.deleted_messages(retaining.user("alice"))
        assert {deleted[0][0], deleted[2][0]} == {k.uidl for k in kept}

    async def test_restore_since_skips_older_deletions(self, retaining: Backend) -> None:
        """``since`` after the deletion restores nothing; at or before it, everything."""
        retaining.deliver("alice", b"x\n")
        await _delete(retaining, [0])
        store = _retention(retaining)
        (kept,) = await store.deleted_messages(retaining.user("alice"))
        user = retaining.user("alice")
        assert () == await store.restore_deleted(user, since=kept.deleted + 1)
        assert (kept,) == await store.restore_deleted(user, since=kept.deleted)

    async def test_purge_removes_only_expired(self, retaining: Backend) -> None:
        """Kept messages are purged once the retention has passed, not before."""
        retaining.deliver("alice", b"x\n")
        await _delete(retaining, [0])
        store = _retention(retaining)
        user = retaining.user("alice")
        (kept,) = await store.deleted_messages(user)
        assert 0 == await store.purge_deleted(user, now=kept.deleted + RETENTION - 1)
        assert 1 == len(await store.deleted_messages(user))
        assert 1 == await store.purge_deleted(user, now=kept.deleted + RETENTION)
        assert () == await store.deleted_messages(user)
        assert () == await store.restore_deleted(user)
        assert [] == await _snapshot(retaining)

    async def test_restored_then_deleted_again_is_kept_again(self, retaining: Backend) -> None:
        """Restore and delete round-trip with the UIDL unchanged."""
        retaining.deliver("alice", b"again\n")
        (first,) = await _delete(retaining, [0])
        await _retention(retaining).restore_deleted(retaining.user("alice"))
        assert [first] == await _delete(retaining, [0])
        kept = await _retention(retaining).deleted_messages(retaining.user("alice"))
        assert [first] == [(k.uidl, k.size) for k in kept]

    async def test_uidl_of_restored_message_is_not_given_to_new_mail(
        self, retaining: Backend
    ) -> None:
        """Mail delivered while a message is kept never gets the kept message's UIDL."""
        retaining.deliver("alice", b"old\n")
        ((uidl, _),) = await _delete(retaining, [0])
        retaining.deliver("alice", b"new\n")
        await _retention(retaining).restore_deleted(retaining.user("alice"))
        uidls = [u for u, _, _ in await _snapshot(retaining)]
        assert 2 == len(set(uidls))
        assert uidl in uidls

    async def test_other_stores_do_not_offer_it(self, backend: Backend) -> None:
        """Maildir and PostgreSQL keep deleted mail; memory (and the helper) say not by type."""
        offers = isinstance(backend.store, DeletedMailRetention)
        in_process_maildir = backend.name.startswith("maildir") and backend.name != "maildir-helper"
        assert offers == (in_process_maildir or backend.name.startswith("postgresql"))


async def _folder_listing(
    backend: Backend, folders: list[str]
) -> list[tuple[str, str, int, bytes]]:
    """(folder, UIDL, size, bytes) of every message of a fresh folder session, in order."""
    store = _folders(backend)
    maildrop = await store.open_folders(backend.user("alice"), folders)
    try:
        return [
            (i.folder, i.uidl, i.size, await read_all(maildrop, i.key)) for i in maildrop.messages
        ]
    finally:
        await maildrop.close()


def _folders(backend: Backend) -> MaildropFolders:
    """The store's folder capability (every ``foldered`` backend has it)."""
    store = backend.store
    assert isinstance(store, MaildropFolders)
    return store


async def _into(backend: Backend, folder: str, data: bytes) -> object:
    assert backend.deliver_folder is not None
    return await backend.deliver_folder("alice", folder, data)


async def _move(backend: Backend, where: object, folder: str) -> object:
    assert backend.move is not None
    return await backend.move("alice", where, folder)


class TestFolders:
    """``pop3_folders``: other folders (Junk) merged into the one POP3 listing.

    Runs on the backends with folders (``FOLDERED`` in conftest): memory, Maildir (Maildir++
    ``.Junk/``) and PostgreSQL (the ``folder`` column).
    """

    async def test_plain_open_lists_the_inbox_only(self, foldered: Backend) -> None:
        """Mail filed into Junk is not in the INBOX listing of a plain open."""
        await _into(foldered, "INBOX", b"Subject: ham\n\nok\n")
        await _into(foldered, "Junk", b"Subject: spam\n\nbuy\n")
        assert [b"Subject: ham\n\nok\n"] == await _snapshot_bytes(foldered)

    async def test_merged_in_arrival_order(self, foldered: Backend) -> None:
        """INBOX and Junk messages come in the order they arrived, each with its folder."""
        await _into(foldered, "INBOX", b"one\n")
        await _into(foldered, "Junk", b"two\n")
        await _into(foldered, "INBOX", b"three\n")
        listing = await _folder_listing(foldered, ["INBOX", "Junk"])
        assert [("INBOX", 5, b"one\n"), ("Junk", 5, b"two\n"), ("INBOX", 7, b"three\n")] == [
            (folder, size, data) for folder, _, size, data in listing
        ]

    async def test_folder_alone(self, foldered: Backend) -> None:
        """``["Junk"]`` lists Junk only; the order of pop3_folders does not reorder mail."""
        await _into(foldered, "INBOX", b"one\n")
        await _into(foldered, "Junk", b"two\n")
        assert [b"two\n"] == [data for *_, data in await _folder_listing(foldered, ["Junk"])]
        both = await _folder_listing(foldered, ["Junk", "INBOX"])
        assert [b"one\n", b"two\n"] == [data for *_, data in both]

    async def test_uidls_valid_distinct_and_stable(self, foldered: Backend) -> None:
        """UIDLs are RFC 1939 unique-ids, distinct across folders, the same next session."""
        for number in range(3):
            await _into(foldered, "INBOX", f"same {number}\n".encode())
            await _into(foldered, "Junk", f"same {number}\n".encode())
        first = [uidl for _, uidl, _, _ in await _folder_listing(foldered, ["INBOX", "Junk"])]
        assert 6 == len(set(first))
        assert all(is_unique_id(uidl) for uidl in first)
        again = [uidl for _, uidl, _, _ in await _folder_listing(foldered, ["INBOX", "Junk"])]
        assert first == again

    async def test_move_from_junk_to_inbox_keeps_the_uidl(self, foldered: Backend) -> None:
        """A message an IMAP client moves Junk → INBOX keeps its UIDL: not downloaded twice."""
        await _into(foldered, "INBOX", b"ham\n")
        where = await _into(foldered, "Junk", b"not spam after all\n")
        before = await _folder_listing(foldered, ["INBOX", "Junk"])
        await _move(foldered, where, "INBOX")
        after = await _folder_listing(foldered, ["INBOX", "Junk"])
        assert [("INBOX", uidl, size, data) for _, uidl, size, data in before] == after

    async def test_move_from_inbox_to_junk_and_back_keeps_the_uidl(self, foldered: Backend) -> None:
        """A message moved INBOX → Junk, and back again, keeps the UIDL it had."""
        where = await _into(foldered, "INBOX", b"ham\n")
        ((_, uidl, _, _),) = await _folder_listing(foldered, ["INBOX", "Junk"])
        where = await _move(foldered, where, "Junk")
        assert [("Junk", uidl)] == [
            (f, u) for f, u, _, _ in await _folder_listing(foldered, ["INBOX", "Junk"])
        ]
        await _move(foldered, where, "INBOX")
        assert [("INBOX", uidl)] == [
            (f, u) for f, u, _, _ in await _folder_listing(foldered, ["INBOX", "Junk"])
        ]

    async def test_move_out_of_the_inbox_leaves_the_plain_listing(self, foldered: Backend) -> None:
        """A message moved into Junk after a session saw it is gone from the next plain one."""
        where = await _into(foldered, "INBOX", b"ham\n")
        await _into(foldered, "INBOX", b"more ham\n")
        assert [b"ham\n", b"more ham\n"] == await _snapshot_bytes(foldered)
        await _move(foldered, where, "Junk")
        assert [b"more ham\n"] == await _snapshot_bytes(foldered)
        assert [b"ham\n"] == [d for *_, d in await _folder_listing(foldered, ["Junk"])]

    async def test_delete_removes_from_the_folder_it_is_in(self, foldered: Backend) -> None:
        """DELE of a Junk message removes it from Junk; the INBOX keeps its mail."""
        await _into(foldered, "INBOX", b"ham\n")
        await _into(foldered, "Junk", b"spam\n")
        store = _folders(foldered)
        maildrop = await store.open_folders(foldered.user("alice"), ["INBOX", "Junk"])
        junk = [info.key for info in maildrop.messages if info.folder == "Junk"]
        result = await maildrop.delete(junk)
        await maildrop.close()
        assert (tuple(junk), ()) == (result.removed, result.failed)
        assert [] == await _folder_listing(foldered, ["Junk"])
        assert [b"ham\n"] == [data for *_, data in await _folder_listing(foldered, ["INBOX"])]

    async def test_missing_folder_is_empty(self, foldered: Backend) -> None:
        """A folder nobody delivered to lists nothing."""
        await _into(foldered, "INBOX", b"ham\n")
        listing = await _folder_listing(foldered, ["INBOX", "Spam"])
        assert [("INBOX", b"ham\n")] == [(folder, data) for folder, _, _, data in listing]

    async def test_open_folders_takes_the_session_lock(self, foldered: Backend) -> None:
        """A folder session locks the maildrop as a plain one does."""
        store = _folders(foldered)
        maildrop = await store.open_folders(foldered.user("alice"), ["INBOX", "Junk"])
        try:
            with pytest.raises(MaildropLocked):
                await foldered.store.open(foldered.user("alice"))
        finally:
            await maildrop.close()
        await (await foldered.store.open(foldered.user("alice"))).close()

    @pytest.mark.parametrize("name", ["../x", ".Junk", "a/b", "", "Junk\r\nX: y", "é"])
    async def test_bad_folder_names_are_refused(self, foldered: Backend, name: str) -> None:
        """A name that could leave the maildir or break a header line is refused."""
        with pytest.raises(FolderNameError):
            await _folders(foldered).open_folders(foldered.user("alice"), ["INBOX", name])
        with pytest.raises(FolderNameError):
            await _folders(foldered).deliver_to_folder(
                foldered.user("alice"), incoming(b"x\n"), name
            )

    async def test_delivery_into_a_folder(self, foldered: Backend) -> None:
        """The store's own delivery files a message into Junk (made if missing), or INBOX."""
        store = _folders(foldered)
        user = foldered.user("alice")
        await store.deliver_to_folder(user, incoming(b"spam\n", b"Delivered-To: a\n"), "Junk")
        await store.deliver_to_folder(user, incoming(b"ham\n"), "inbox")
        listing = await _folder_listing(foldered, ["INBOX", "Junk"])
        assert [("Junk", b"Delivered-To: a\nspam\n"), ("INBOX", b"ham\n")] == [
            (folder, data) for folder, _, _, data in listing
        ]


async def _snapshot_bytes(backend: Backend) -> list[bytes]:
    """The stored bytes of every message of a plain session, in order."""
    return [data for _, _, data in await _snapshot(backend)]


async def _delete_in(backend: Backend, folders: list[str], wanted: str) -> tuple[str, str, int]:
    """Delete, in a session of ``folders``, the messages of folder ``wanted``; return the
    (folder, UIDL, size) of the one deleted."""
    maildrop = await _folders(backend).open_folders(backend.user("alice"), folders)
    try:
        (info,) = [i for i in maildrop.messages if i.folder == wanted]
        result = await maildrop.delete([info.key])
    finally:
        await maildrop.close()
    assert ((info.key,), ()) == (result.removed, result.failed)
    return info.folder, info.uidl, info.size


class TestRetentionWithFolders:
    """``pop3_delete_retention`` with ``pop3_folders``: mail deleted from any listed folder
    is kept, and restored into the folder it was deleted from, with its UIDL.

    Runs on the backends with both capabilities (``RETAINING``: Maildir, where it is kept in
    the maildir's ``.pobox-deleted/``, and PostgreSQL, where ``deleted_message.folder`` says
    where it was).
    """

    async def test_junk_message_kept_and_restored_into_junk(self, retaining: Backend) -> None:
        """A Junk message DELE'd is kept (not lost), listed with its folder, and comes back
        into Junk with the same UIDL, size and bytes."""
        await _into(retaining, "INBOX", b"Subject: ham\n\nok\n")
        await _into(retaining, "Junk", b"Subject: spam\n\nbuy\n")
        both = ["INBOX", "Junk"]
        before = await _folder_listing(retaining, both)
        folder, uidl, size = await _delete_in(retaining, both, "Junk")
        assert [before[0]] == await _folder_listing(retaining, both)
        store = _retention(retaining)
        user = retaining.user("alice")
        kept = await store.deleted_messages(user)
        assert [(uidl, size, "Junk")] == [(k.uidl, k.size, k.folder) for k in kept]
        restored = await store.restore_deleted(user, folders=both)
        assert [(uidl, "Junk")] == [(m.uidl, m.folder) for m in restored]
        assert before == await _folder_listing(retaining, both)
        assert [b"Subject: ham\n\nok\n"] == await _snapshot_bytes(retaining)
        assert "Junk" == folder

    async def test_message_moved_into_junk_keeps_its_inbox_uidl(self, retaining: Backend) -> None:
        """A message an IMAP client moved INBOX → Junk kept its UIDL; deleted from Junk and
        restored, it still has it (the folder-UIDL map gives it again)."""
        where = await _into(retaining, "INBOX", b"ham after all\n")
        ((_, uidl, _, _),) = await _folder_listing(retaining, ["INBOX", "Junk"])
        await _move(retaining, where, "Junk")
        assert ("Junk", uidl) == (await _delete_in(retaining, ["INBOX", "Junk"], "Junk"))[:2]
        assert [] == await _folder_listing(retaining, ["INBOX", "Junk"])  # sessions go on
        await _retention(retaining).restore_deleted(retaining.user("alice"))
        assert [("Junk", uidl, b"ham after all\n")] == [
            (f, u, d) for f, u, _, d in await _folder_listing(retaining, ["INBOX", "Junk"])
        ]

    async def test_restored_into_the_inbox_if_the_folder_is_no_longer_listed(
        self, retaining: Backend
    ) -> None:
        """With ``folders`` not listing Junk any more, the message comes back into the INBOX,
        UIDL kept: POP3 sees it again."""
        await _into(retaining, "Junk", b"spam\n")
        _, uidl, size = await _delete_in(retaining, ["INBOX", "Junk"], "Junk")
        user = retaining.user("alice")
        restored = await _retention(retaining).restore_deleted(user, folders=["INBOX"])
        assert [(uidl, "INBOX")] == [(m.uidl, m.folder) for m in restored]
        assert [(uidl, size, b"spam\n")] == await _snapshot(retaining)
        assert [] == await _folder_listing(retaining, ["Junk"])

    async def test_inbox_message_of_a_folder_session(self, retaining: Backend) -> None:
        """An INBOX message deleted in a folder session is kept and restored as before."""
        await _into(retaining, "INBOX", b"ham\n")
        await _into(retaining, "Junk", b"spam\n")
        before = await _snapshot(retaining)
        _, uidl, _ = await _delete_in(retaining, ["INBOX", "Junk"], "INBOX")
        assert [] == await _snapshot(retaining)
        (kept,) = await _retention(retaining).deleted_messages(retaining.user("alice"))
        assert (uidl, "INBOX") == (kept.uidl, kept.folder)
        await _retention(retaining).restore_deleted(retaining.user("alice"))
        assert before == await _snapshot(retaining)
