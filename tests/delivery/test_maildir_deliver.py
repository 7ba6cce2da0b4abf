"""The Maildir writer: names, line endings, quota, and the index update."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pobox.storage.base import Quota, QuotaExceeded, Usage
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._deliver import deliver_message, maildir_usage
from pobox.testing import deliver_to_maildir
from tests.helpers.maildir import incoming


class _User:
    """A user as the store sees one."""

    name = "alice"
    home = None
    mail = None


class TestDeliverMessage:
    """deliver_message()."""

    def test_name_follows_the_maildir_specification(self, tmp_path: Path) -> None:
        """The file in new/ is named <secs>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<wire size>."""
        name = deliver_message(tmp_path, incoming(b"Subject: a\r\n\r\nbody\r\n"))
        assert re.fullmatch(r"[0-9]+\.M[0-9]+P[0-9]+Q[0-9]+\.[^/:]+,S=17,W=20", name)
        assert [name] == [path.name for path in (tmp_path / "new").iterdir()]
        assert [] == list((tmp_path / "tmp").iterdir())

    def test_crlf_is_stored_as_lf(self, tmp_path: Path) -> None:
        """CRLF line endings from the wire are stored as LF, as Dovecot stores them."""
        name = deliver_message(tmp_path, incoming(b"Subject: a\r\n\r\nbody\r\n"))
        assert b"Subject: a\n\nbody\n" == (tmp_path / "new" / name).read_bytes()

    def test_names_are_unique(self, tmp_path: Path) -> None:
        """Two deliveries in a row get two files."""
        first = deliver_message(tmp_path, incoming(b"x\n"))
        second = deliver_message(tmp_path, incoming(b"x\n"))
        assert first != second

    def test_message_quota(self, tmp_path: Path) -> None:
        """A message beyond the message quota is refused and not stored."""
        deliver_message(tmp_path, incoming(b"x\n"), quota=Quota(max_messages=1))
        with pytest.raises(QuotaExceeded):
            deliver_message(tmp_path, incoming(b"y\n"), quota=Quota(max_messages=1))
        assert 1 == len(list((tmp_path / "new").iterdir()))

    def test_byte_quota_counts_the_new_message(self, tmp_path: Path) -> None:
        """A message that would take the maildrop over the byte quota is refused."""
        deliver_message(tmp_path, incoming(b"12345\n"), quota=Quota(max_bytes=10))
        with pytest.raises(QuotaExceeded):
            deliver_message(tmp_path, incoming(b"12345\n"), quota=Quota(max_bytes=10))

    def test_usage_counts_new_and_cur(self, tmp_path: Path) -> None:
        """Usage is the octets and number of messages in new/ and cur/, from ,S= or stat."""
        deliver_message(tmp_path, incoming(b"12345\n"))
        (tmp_path / "cur" / "1.M1P1.host:2,S").write_bytes(b"abc")
        (tmp_path / "tmp" / "2.M1P1.host").write_bytes(b"ignored")
        assert Usage(octets=9, messages=2) == maildir_usage(tmp_path)


class TestIndexUpdate:
    """A delivered message is added to an existing pobox-uidlist."""

    async def test_delivered_message_is_indexed_with_the_next_uid(self, tmp_path: Path) -> None:
        """The index gets the new message with the next UID and its wire size."""
        store = MaildirStore(f"maildir:{tmp_path}/%u")
        deliver_to_maildir(tmp_path / "alice", b"first\n")
        drop = await store.open(_User(), lock=False)
        first = drop.messages[0]
        await drop.close()
        name = deliver_message(tmp_path / "alice", incoming(b"second\n"))
        index = (tmp_path / "alice" / "pobox-uidlist").read_text()
        assert index.endswith(f"\n2 W8 :{name}\n")
        drop = await store.open(_User(), lock=False)
        assert [first.uidl, f"00000002{first.uidl[8:]}"] == [m.uidl for m in drop.messages]
        assert [7, 8] == [m.size for m in drop.messages]
        await drop.close()

    def test_no_index_is_created(self, tmp_path: Path) -> None:
        """Without an index, none is created: the first login builds it."""
        deliver_message(tmp_path, incoming(b"x\n"))
        assert not (tmp_path / "pobox-uidlist").exists()

    async def test_delivery_while_a_session_holds_the_lock(self, tmp_path: Path) -> None:
        """A delivery does not wait for the POP3 session lock and shows up at the next open."""
        store = MaildirStore(f"maildir:{tmp_path}/%u")
        drop = await store.open(_User())
        deliver_message(tmp_path / "alice", incoming(b"new\n"))
        assert 0 == len(drop.messages)
        await drop.close()
        drop = await store.open(_User())
        assert [5] == [m.size for m in drop.messages]
        await drop.close()
