"""The Maildir writer: names, line endings, quota, the index update, the lock, and ``tmp/``."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pobox.storage._safefs import Dir, UnsafeFile
from pobox.storage.base import Quota, QuotaExceeded, StorageTemporaryError, Usage
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir import _deliver as deliver_module
from pobox.storage.maildir._deliver import (
    TmpCleaner,
    clean_tmp,
    deliver_message,
    maildir_usage,
    message_name,
)
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


class TestNamesGiven:
    """A caller may name the message first (the fetcher records the name before committing)."""

    def test_message_name_is_used(self, tmp_path: Path) -> None:
        """``deliver_message(name=message_name(...))`` stores under that very name."""
        message = incoming(b"Subject: a\r\n\r\nbody\r\n")
        name = message_name(message)
        assert (name, [name]) == (
            deliver_message(tmp_path, message, name=name),
            os.listdir(tmp_path / "new"),
        )

    def test_taken_name_is_a_temporary_failure(self, tmp_path: Path) -> None:
        """A name already in ``tmp/`` is never reused: the delivery fails, nothing is stored."""
        message = incoming(b"x\n")
        name = message_name(message)
        deliver_message(tmp_path, incoming(b"first\n"))
        (tmp_path / "tmp" / name).write_bytes(b"someone else's")
        with pytest.raises(StorageTemporaryError, match="free file name"):
            deliver_message(tmp_path, message, name=name)
        assert [b"someone else's"] == [(tmp_path / "tmp" / name).read_bytes()]

    def test_size_fields_can_be_left_out(self, tmp_path: Path) -> None:
        """``size_fields=False`` names the file as an MTA that writes no sizes would."""
        name = deliver_message(tmp_path, incoming(b"x\n"), size_fields=False)
        assert ",S=" not in name


class TestSwappedTmpFile:
    """The file written to ``tmp/`` is the one linked into ``new/``, or nothing is."""

    def test_file_swapped_before_the_link_is_not_delivered(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A ``tmp/`` file replaced by a link before the link step: nothing lands in ``new/``."""
        outside = tmp_path / "outside"
        outside.write_bytes(b"secret")
        real_flocked = deliver_module.flocked

        def swap_then_lock(directory: Dir, name: str, *, timeout: float) -> object:
            """Swap the written file for a link to ``outside``, then lock as usual."""
            (entry,) = os.listdir(tmp_path / "md" / "tmp")
            os.unlink(tmp_path / "md" / "tmp" / entry)
            os.symlink(outside, tmp_path / "md" / "tmp" / entry)
            return real_flocked(directory, name, timeout=timeout)

        monkeypatch.setattr(deliver_module, "flocked", swap_then_lock)
        with pytest.raises(UnsafeFile, match="replaced"):
            deliver_message(tmp_path / "md", incoming(b"x\n"))
        assert ([], [], b"secret") == (
            os.listdir(tmp_path / "md" / "new"),
            os.listdir(tmp_path / "md" / "tmp"),
            outside.read_bytes(),
        )


class TestTmpCleaner:
    """Leftovers in ``tmp/`` go after 36 hours; the look happens at most hourly."""

    def plant(self, maildir: Path, age_hours: float) -> Path:
        """Leave a file in ``tmp/`` last touched ``age_hours`` ago."""
        deliver_message(maildir, incoming(b"x\n"))
        path = maildir / "tmp" / f"leftover-{age_hours}"
        path.write_bytes(b"half")
        when = time.time() - age_hours * 3600
        os.utime(path, (when, when))
        return path

    def test_over_36_hours_is_removed(self, tmp_path: Path) -> None:
        """A file of 37 hours is removed, one of 35 hours kept."""
        old = self.plant(tmp_path, 37)
        young = self.plant(tmp_path, 35)
        with Dir.open_root(tmp_path, os.geteuid()) as root:
            removed = clean_tmp(root)
        assert (1, False, True) == (removed, old.exists(), young.exists())

    def test_once_an_hour_per_maildir(self, tmp_path: Path) -> None:
        """A second look within the hour does nothing, even if there is something to remove."""
        cleaner = TmpCleaner()
        self.plant(tmp_path, 40)
        with Dir.open_root(tmp_path, os.geteuid()) as root:
            first = cleaner.maybe_clean(root)
            later = self.plant(tmp_path, 40)
            second = cleaner.maybe_clean(root)
        assert (1, 0, True) == (first, second, later.exists())

    def test_linked_tmp_is_not_cleaned(self, tmp_path: Path) -> None:
        """``tmp/`` itself a link to another directory: nothing there is removed."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        victim = elsewhere / "old-file"
        victim.write_bytes(b"keep me")
        old = time.time() - 40 * 3600
        os.utime(victim, (old, old))
        maildir = tmp_path / "md"
        deliver_message(maildir, incoming(b"x\n"))
        (maildir / "tmp").rmdir()
        (maildir / "tmp").symlink_to(elsewhere)
        with Dir.open_root(maildir, os.geteuid()) as root:
            removed = clean_tmp(root)
        assert (0, True) == (removed, victim.exists())
