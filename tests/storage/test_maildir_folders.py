"""Maildir++ folders (``pop3_folders``) on a maildir whose user is hostile.

The user controls ``.Junk`` as everything else in their maildir: it may be a link to another
maildir of the same uid (virtual users under one ``vmail``), a FIFO, have its ``cur/``
swapped for a link mid-session; ``pobox-folder-uidls`` may be forged or a link. Nothing
outside the maildir is ever read, listed, created or removed; the user's own session goes on
with what is safe. Also what only a Maildir shows: folders are not created by a session, a
delivery into a folder creates a proper Maildir++ folder, arrival order comes from file names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pobox.storage._safefs import UnsafeFile
from pobox.storage.base import MessageGone, StorageError
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._folders import FOLDER_UIDLS_NAME, folder_uidl
from tests.helpers.maildir import User, deliver, incoming, swap_for_link

ALICE = User("alice")
FOLDERS = ["INBOX", "Junk"]


async def _listing(store: MaildirStore) -> list[tuple[str, str, bytes]]:
    """(folder, UIDL, bytes) of every message of a folder session, in order."""
    maildrop = await store.open_folders(ALICE, FOLDERS)
    try:
        out = []
        for info in maildrop.messages:
            data = b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            out.append((info.folder, info.uidl, data))
        return out
    finally:
        await maildrop.close()


@pytest.fixture
def bob(tmp_path: Path) -> Path:
    """Bob's maildir, next to alice's, with one message (same uid: virtual users)."""
    path = tmp_path / "bob"
    deliver(path, b"Subject: bob's secret\n\nfor bob only\n")
    return path


class TestHostileFolders:
    """A ``.Junk`` that is not a directory of the owner is left out, never followed."""

    async def test_link_to_another_maildir(
        self, store: MaildirStore, maildir: Path, bob: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``.Junk -> ../bob``: alice sees her INBOX only; a warning says why."""
        deliver(maildir, b"mine\n")
        (maildir / ".Junk").symlink_to(bob)
        with caplog.at_level(logging.WARNING):
            assert [("INBOX", b"mine\n")] == [(f, d) for f, _, d in await _listing(store)]
        assert "left out" in caplog.text
        assert [] == list((bob / "cur").iterdir())  # not even flagged or moved
        assert not (bob / "pobox-uidlist").exists()

    async def test_fifo(self, store: MaildirStore, maildir: Path) -> None:
        """A FIFO named ``.Junk`` is never opened (no wait), and left out."""
        deliver(maildir, b"mine\n")
        os.mkfifo(maildir / ".Junk")
        assert [b"mine\n"] == [d for *_, d in await _listing(store)]

    async def test_cur_is_a_link(self, store: MaildirStore, maildir: Path, bob: Path) -> None:
        """``.Junk/cur -> ../bob/new``: the folder is left out; bob's message stays unseen."""
        deliver(maildir, b"mine\n")
        deliver(maildir / ".Junk", b"spam\n")
        os.rmdir(maildir / ".Junk" / "cur")
        (maildir / ".Junk" / "cur").symlink_to(bob / "new")
        assert [b"mine\n"] == [d for *_, d in await _listing(store)]
        assert 1 == len(list((bob / "new").iterdir()))

    async def test_folder_swapped_for_a_link_during_the_session(
        self, store: MaildirStore, maildir: Path, bob: Path
    ) -> None:
        """``.Junk`` swapped after the listing: its message is gone, nothing of bob's read."""
        deliver(maildir / ".Junk", b"spam\n")
        maildrop = await store.open_folders(ALICE, FOLDERS)
        try:
            (info,) = maildrop.messages
            swap_for_link(maildir / ".Junk", bob)
            with pytest.raises((MessageGone, UnsafeFile)):
                b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            result = await maildrop.delete([info.key])
        finally:
            await maildrop.close()
        assert (info.key,) == result.failed
        assert 1 == len(list((bob / "new").iterdir()))
        assert 1 == len(list((maildir / ".Junk.real" / "new").iterdir()))

    async def test_delivery_into_a_linked_folder_is_refused(
        self, store: MaildirStore, maildir: Path, bob: Path
    ) -> None:
        """``deliver_to_folder`` does not write through ``.Junk -> ../bob``."""
        deliver(maildir, b"mine\n")
        (maildir / ".Junk").symlink_to(bob)
        with pytest.raises(StorageError):
            await store.deliver_to_folder(ALICE, incoming(b"x\n"), "Junk")
        assert 1 == len(list((bob / "new").iterdir()))
        assert [] == list((bob / "tmp").iterdir())


class TestFolderUidls:
    """``pobox-folder-uidls``: what the user may write there does no harm to anyone else."""

    async def test_forged_duplicate_uidls_are_made_distinct(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A map giving two messages one UIDL: the listing still has distinct UIDLs."""
        first = deliver(maildir, b"one\n")
        second = deliver(maildir / ".Junk", b"two\n")
        (maildir / FOLDER_UIDLS_NAME).write_text(f"{first} same\n{second} same\n")
        uidls = [uidl for _, uidl, _ in await _listing(store)]
        assert "same" == uidls[0]
        assert folder_uidl(second) == uidls[1]

    async def test_map_as_a_link_is_not_followed(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """A map that is a link to another file: ignored, replaced, the target untouched."""
        target = tmp_path / "elsewhere"
        target.write_text("do not touch\n")
        base = deliver(maildir / ".Junk", b"spam\n")
        (maildir / FOLDER_UIDLS_NAME).symlink_to(target)
        assert [folder_uidl(base)] == [uidl for _, uidl, _ in await _listing(store)]
        assert "do not touch\n" == target.read_text()

    async def test_map_keeps_only_the_current_listing(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """The map is rewritten with the messages listed: it does not grow without bound."""
        deliver(maildir, b"one\n")
        deliver(maildir / ".Junk", b"two\n")
        maildrop = await store.open_folders(ALICE, FOLDERS)
        await maildrop.delete([maildrop.messages[1].key])
        await maildrop.close()
        await _listing(store)
        assert 1 == len((maildir / FOLDER_UIDLS_NAME).read_text().splitlines())


class TestMaildirFolderLayout:
    """Folders on disk: not created by sessions, made properly by delivery, ordered by name."""

    async def test_session_creates_no_folder(self, store: MaildirStore, maildir: Path) -> None:
        """Listing ``Junk`` that does not exist makes no ``.Junk``."""
        deliver(maildir, b"mine\n")
        await _listing(store)
        assert not (maildir / ".Junk").exists()

    async def test_delivery_makes_a_maildirplusplus_folder(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """``deliver_to_folder`` makes ``.Junk`` with cur/new/tmp and ``maildirfolder``."""
        await store.deliver_to_folder(ALICE, incoming(b"spam\n"), "Junk")
        junk = maildir / ".Junk"
        assert {"cur", "new", "tmp", "maildirfolder"} <= {p.name for p in junk.iterdir()}
        assert 1 == len(list((junk / "new").iterdir()))

    async def test_arrival_order_from_file_names(self, store: MaildirStore, maildir: Path) -> None:
        """Folders interleave by the delivery time in the names, whatever the mtimes say."""
        for seconds, folder in ((1000, ""), (3000, ""), (2000, ".Junk"), (4000, ".Junk")):
            where = maildir / folder if folder else maildir
            for sub in ("cur", "new", "tmp"):
                (where / sub).mkdir(parents=True, exist_ok=True)
            path = where / "new" / f"{seconds}.M1P1.host"
            path.write_bytes(f"{seconds}\n".encode())
            os.utime(path, (5000 - seconds, 5000 - seconds))
        assert [b"1000\n", b"2000\n", b"3000\n", b"4000\n"] == [
            d for *_, d in await _listing(store)
        ]


class TestDovecotGuid:
    """A message Dovecot moved under a new name keeps its UIDL through its ``G`` GUID."""

    async def test_renamed_by_dovecot_keeps_the_uidl(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """INBOX → Junk as a new file whose uidlist line names the old base as GUID."""
        old = deliver(maildir, b"ham\n")
        ((_, uidl, _),) = await _listing(store)
        (path,) = (maildir / "new").iterdir()
        new = "1700000001.M2P3.host,S=4,W=5"
        for sub in ("cur", "new", "tmp"):
            (maildir / ".Junk" / sub).mkdir(parents=True, exist_ok=True)
        os.rename(path, maildir / ".Junk" / "cur" / f"{new}:2,S")
        (maildir / ".Junk" / "dovecot-uidlist").write_text(
            f"3 V1 N3 Gabc\n1 :{old}\n2 G{old} :{new}\n"
        )
        assert [("Junk", uidl, b"ham\n")] == await _listing(store)

    async def test_forged_guid_hides_no_mail(self, store: MaildirStore, maildir: Path) -> None:
        """Two files claiming one GUID are both listed, with distinct UIDLs."""
        first = deliver(maildir / ".Junk", b"one\n")
        second = deliver(maildir / ".Junk", b"two\n")
        (maildir / ".Junk" / "dovecot-uidlist").write_text(
            f"3 V1 N3 Gabc\n1 Gsame :{first}\n2 Gsame :{second}\n"
        )
        listing = await _listing(store)
        assert [b"one\n", b"two\n"] == [data for *_, data in listing]
        assert 2 == len({uidl for _, uidl, _ in listing})
