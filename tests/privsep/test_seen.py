"""Issue 15 through the storage helper: seen flags with the owner's rights, X-UIDL import.

The serving process asks the root helper (``seen``) to rename message files of a maildrop it
opened; the helper does it as the maildir's owner, through the same safe file layer as every
other operation. ``pop3_reuse_xuidl`` reaches the helper in its ``hello`` settings.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.config import build_config
from pobox.records import User
from pobox.storage.base import SeenFlags
from pobox.storage.privsep import OwnerPolicy, StorageHelper
from tests.helpers.accounts import chown_tree
from tests.helpers.maildir import deliver
from tests.privsep.conftest import World, settings, start_helper
from tests.privsep.serving import serve
from tests.privsep.test_serve import _passwd, _retrieve_all


@pytest.fixture
async def helper(world: World) -> AsyncIterator[StorageHelper]:
    """A started storage helper for the world's maildirs."""
    config = build_config(
        {"mail_location": "maildir:~/Maildir", "passwd_file": str(world.root / "passwd")}
    )
    started = await StorageHelper.start(
        config, OwnerPolicy.from_config(config, fallback=None), on_lost=lambda _: None
    )
    yield started
    await started.aclose()


def _alice(world: World) -> User:
    return User(
        world.alice.name,
        uid=world.alice.uid,
        gid=world.alice.gid,
        home=str(world.home(world.alice)),
    )


def _entries(maildir: Path) -> dict[str, tuple[int, int]]:
    """Map ``dir/name`` of each message file to its (owner, inode)."""
    found = {}
    for directory in ("new", "cur"):
        for entry in (maildir / directory).iterdir():
            st = entry.lstat()
            found[f"{directory}/{entry.name}"] = (st.st_uid, st.st_ino)
    return found


class TestSeenThroughTheHelper:
    """``mark_seen`` of a maildrop the helper holds."""

    async def test_renamed_as_the_owner_uidl_kept(
        self, helper: StorageHelper, world: World
    ) -> None:
        """The file moves to cur/ with ``:2,S``, same inode and owner; the UIDL stays."""
        maildir = world.maildir(world.alice)
        [(name, (uid, ino))] = _entries(maildir).items()
        maildrop = await helper.store.open(_alice(world))
        try:
            assert isinstance(maildrop, SeenFlags)
            [info] = maildrop.messages
            failed = await maildrop.mark_seen([info.key, "../../../etc/passwd"])
        finally:
            await maildrop.close()
        again = await helper.store.open(_alice(world))
        try:
            [info_again] = again.messages
        finally:
            await again.close()
        base = name.removeprefix("new/")
        assert ("../../../etc/passwd",) == failed
        assert {f"cur/{base}:2,S": (world.alice.uid, ino)} == _entries(maildir)
        assert world.alice.uid == uid
        assert (info.uidl, info.size) == (info_again.uidl, info_again.size)

    async def test_file_not_the_owners_is_not_renamed(
        self, helper: StorageHelper, world: World
    ) -> None:
        """A message replaced by a root-owned file after the snapshot is refused, not renamed."""
        maildir = world.maildir(world.alice)
        [name] = _entries(maildir)
        maildrop = await helper.store.open(_alice(world))
        try:
            [info] = maildrop.messages
            path = maildir / name
            path.unlink()
            path.write_bytes(b"planted by root\n")  # owned by root: not alice's
            failed = await maildrop.mark_seen([info.key])
        finally:
            await maildrop.close()
        assert (info.key,) == failed
        assert {name: (0, os.stat(maildir / name).st_ino)} == _entries(maildir)


class TestReuseXuidlThroughTheHelper:
    """``pop3_reuse_xuidl`` reaches the helper's core (the ``hello`` settings)."""

    @pytest.mark.parametrize("reuse", [True, False])
    async def test_xuidl_kept_only_with_the_key(self, world: World, reuse: bool) -> None:
        """An ``X-UIDL:`` header in alice's maildir is her message's UIDL only with the key."""
        maildir = world.maildir(world.alice)
        deliver(maildir, b"X-UIDL: qpopper-1234\nSubject: old\n\nbody\n")
        chown_tree(world.home(world.alice), world.alice)
        config = build_config(
            {
                "mail_location": "maildir:~/Maildir",
                "passwd_file": str(world.root / "passwd"),
                "pop3_reuse_xuidl": reuse,
            }
        )
        started = await StorageHelper.start(
            config, OwnerPolicy.from_config(config, fallback=None), on_lost=lambda _: None
        )
        try:
            maildrop = await started.store.open(_alice(world))
            uidls = [info.uidl for info in maildrop.messages]
            await maildrop.close()
        finally:
            await started.aclose()
        assert reuse == ("qpopper-1234" in uidls)
        assert 2 == len(uidls)


class TestHeaderEndsThroughTheHelper:
    """``oe-ns-eoh`` reaches the helper's core: header ends come cached from the index."""

    @pytest.mark.parametrize("workaround", [True, False])
    async def test_header_end_known_only_with_the_workaround(
        self, world: World, workaround: bool
    ) -> None:
        """With the workaround the snapshot says which message lacks a header end."""
        maildir = world.maildir(world.alice)
        deliver(maildir, b"Subject: no body\n")
        chown_tree(world.home(world.alice), world.alice)
        config = build_config(
            {
                "mail_location": "maildir:~/Maildir",
                "passwd_file": str(world.root / "passwd"),
                "pop3_client_workarounds": "oe-ns-eoh" if workaround else "",
            }
        )
        started = await StorageHelper.start(
            config, OwnerPolicy.from_config(config, fallback=None), on_lost=lambda _: None
        )
        try:
            maildrop = await started.store.open(_alice(world))
            ends = [info.header_end for info in maildrop.messages]
            await maildrop.close()
        finally:
            await started.aclose()
        # The world's maildir holds one message of its own, with a header end.
        assert sorted(ends, key=str) == ([False, True] if workaround else [None, None])


class TestHelperLogsRefusedUidls:
    """The helper's core logs a refused imported UIDL on its standard error, sanitised."""

    def test_refused_uidl_logged_on_one_clean_line(self, world: World) -> None:
        """A map whose UIDLs hold an escape character: one clean line for each."""
        maildir = world.maildir(world.alice)
        deliver(maildir, b"Subject: second\n\nbody\n")
        names = sorted(path.name for path in (maildir / "new").iterdir())
        (maildir / "pobox-uidl-map").write_bytes(
            f"{names[0]} \x1b[2Jdup\n{names[1]} \x1b[2Jdup\n".encode()
        )
        chown_tree(world.home(world.alice), world.alice)
        running = start_helper(settings())
        try:
            running.ok("open", user=world.user(world.alice), lock=False)
        finally:
            _, err = running.stop()
        lines = [line for line in err.splitlines() if "imported UIDL refused" in line]
        assert "\x1b" not in err
        assert 2 == len(lines)
        assert all("?[2Jdup is not a valid UIDL" in line for line in lines)


class TestServeAsRoot:
    """``pobox serve`` as root (helper mode): a RETR'd message is marked seen as its owner."""

    async def test_retr_marks_seen_through_the_helper(self, world: World) -> None:
        """After RETR and QUIT alice's message is ``cur/…:2,S``, still hers; a link is not."""
        maildir = world.maildir(world.alice)
        [message] = (maildir / "new").iterdir()
        inode = message.stat().st_ino
        os.symlink(world.secret, maildir / "new" / "1700000001.M1P1.evil,S=17,W=18")
        async with serve(world.root, f'passwd_file = "{_passwd(world)}"\n') as served:
            stat, _ = await _retrieve_all(served.port)
        seen = maildir / "cur" / f"{message.name}:2,S"
        assert stat.startswith(b"+OK 1 ")
        assert (world.alice.uid, inode) == (seen.stat().st_uid, seen.stat().st_ino)
        assert ["1700000001.M1P1.evil,S=17,W=18"] == [p.name for p in (maildir / "new").iterdir()]
