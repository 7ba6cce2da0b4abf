"""Maildir specifics of ``pop3_delete_retention``: the hidden folder, purging, a hostile user.

The contract (``test_contract.py``, ``TestDeletedMailRetention``) covers what every store that
keeps deleted mail promises; these tests look at the files: where a kept message is, that the
next UPDATE purges what expired, and that the maildir's user cannot make pobox follow a link.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import astuple
from pathlib import Path

import pytest

from pobox.config import build_config, parse_duration
from pobox.errors import ConfigError
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._retain import DELETED_FOLDER, DELETED_LIST
from pobox.storage.privsep import OwnerPolicy, StorageHelper
from pobox.storage.privsep._helper import Settings
from pobox.storage.privsep._protocol import InvalidRequest
from tests.helpers.accounts import ALICE as ACCOUNT
from tests.helpers.accounts import Account, chown_tree, system_user
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import User, deliver

WEEK = 7 * 86400
ALICE = User("alice")


@pytest.fixture
def keeping(tmp_path: Path) -> MaildirStore:
    """A store keeping deleted mail for a week, alice's maildir in ``<tmp_path>/alice``."""
    return MaildirStore(f"maildir:{tmp_path}/%n", retention=WEEK)


async def _delete_all(store: MaildirStore) -> tuple[str, ...]:
    maildrop = await store.open(ALICE)
    result = await maildrop.delete([info.key for info in maildrop.messages])
    await maildrop.close()
    assert () == result.failed
    return result.removed


async def test_kept_file_keeps_its_name_in_the_hidden_folder(
    keeping: MaildirStore, tmp_path: Path
) -> None:
    """The file is renamed, name unchanged, to ``.pobox-deleted/cur/``; new/ and cur/ are empty."""
    name = deliver(tmp_path / "alice", b"Subject: x\n\nbody\n")
    await _delete_all(keeping)
    folder = tmp_path / "alice" / DELETED_FOLDER
    kept = [p.name for p in (folder / "cur").iterdir()]
    assert [Path(name).name] == kept
    assert [] == list((tmp_path / "alice" / "new").iterdir())
    assert [] == list((tmp_path / "alice" / "cur").iterdir())
    assert {"cur", "new", "tmp", DELETED_LIST} == {p.name for p in folder.iterdir()}


async def test_next_update_purges_what_expired(keeping: MaildirStore, tmp_path: Path) -> None:
    """An UPDATE after the retention unlinks the expired message; the new one is kept."""
    deliver(tmp_path / "alice", b"old\n")
    await _delete_all(keeping)
    listing = tmp_path / "alice" / DELETED_FOLDER / DELETED_LIST
    header, line = listing.read_text().splitlines()
    stamp, rest = line.split(" ", 1)
    listing.write_text(f"{header}\n{int(stamp) - WEEK} {rest}\n")  # deleted a week ago
    deliver(tmp_path / "alice", b"new\n")
    await _delete_all(keeping)
    kept = await keeping.deleted_messages(ALICE)
    assert 1 == len(kept)
    assert 1 == len(list((tmp_path / "alice" / DELETED_FOLDER / "cur").iterdir()))
    restored = await keeping.restore_deleted(ALICE)
    maildrop = await keeping.open(ALICE)
    data = b"".join([c async for c in maildrop.read_message(maildrop.messages[0].key)])
    await maildrop.close()
    assert (kept, b"new\n") == (restored, data)


async def test_hidden_folder_as_link_is_not_followed(keeping: MaildirStore, tmp_path: Path) -> None:
    """``.pobox-deleted`` made a link by the user: nothing goes there, the mail stays put."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cur").mkdir(parents=True)
    deliver(tmp_path / "alice", b"stay\n")
    (tmp_path / "alice" / DELETED_FOLDER).symlink_to(elsewhere)
    maildrop = await keeping.open(ALICE)
    result = await maildrop.delete([info.key for info in maildrop.messages])
    await maildrop.close()
    assert ((), 1) == (result.removed, len(result.failed))
    assert [] == list((elsewhere / "cur").iterdir())
    maildrop = await keeping.open(ALICE)
    assert 1 == len(maildrop.messages)
    await maildrop.close()


async def test_planted_link_in_kept_folder_is_never_restored(
    keeping: MaildirStore, tmp_path: Path
) -> None:
    """A listed name that is a link (to a root-only file) is neither listed nor restored."""
    deliver(tmp_path / "alice", b"real\n")
    await _delete_all(keeping)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"secret\n")
    folder = tmp_path / "alice" / DELETED_FOLDER
    (folder / "cur" / "1700000000.M1P1.evil").symlink_to(secret)
    with (folder / DELETED_LIST).open("a") as listing:
        listing.write("1999999999 W8 Pevil-uidl :1700000000.M1P1.evil\n")
    kept = await keeping.deleted_messages(ALICE)
    restored = await keeping.restore_deleted(ALICE)
    assert 1 == len(kept) == len(restored)
    assert "evil-uidl" not in {k.uidl for k in kept}
    assert (folder / "cur" / "1700000000.M1P1.evil").is_symlink()


async def test_usage_does_not_count_kept_mail(keeping: MaildirStore, tmp_path: Path) -> None:
    """Kept mail is not counted against the quota (it is bounded by the retention)."""
    deliver(tmp_path / "alice", b"12345\n")
    await _delete_all(keeping)
    usage = await keeping.usage(ALICE)
    assert (0, 0) == (usage.octets, usage.messages)
    assert 1 == len(await keeping.deleted_messages(ALICE))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("7d", 604800), ("36h", 129600), ("90m", 5400), ("45s", 45), ("2w", 1209600),
     ("600", 600)],
)  # fmt: skip
def test_duration_parses(text: str, seconds: int) -> None:
    """Durations are a whole number and at most one unit."""
    assert seconds == parse_duration(text)


@pytest.mark.parametrize("text", ["", "7 days", "-1d", "1.5h", "d", "7dd", "1y"])
def test_bad_duration_is_a_config_error_naming_the_key(text: str) -> None:
    """A malformed duration is refused, naming the key."""
    with pytest.raises(ConfigError, match="pop3_delete_retention"):
        parse_duration(text, key="pop3_delete_retention")


def test_config_rejects_a_bad_duration() -> None:
    """``pobox config check`` and start-up say which key is wrong."""
    with pytest.raises(ConfigError, match="pop3_delete_retention: '7 days'"):
        build_config({"pop3_delete_retention": "7 days"})


@contextlib.asynccontextmanager
async def _owned_by_alice(
    junk: bytes | None = None,
) -> AsyncIterator[tuple[Account, User, Path, StorageHelper]]:
    """Mode 3 with retention on: alice's maildir (a message in the INBOX, ``junk`` in
    ``.Junk``), all hers, and a storage helper serving it (closed at the end if still open)."""
    owner = system_user(ACCOUNT)
    with searchable_tmpdir() as folder:
        config = build_config(
            {
                "mail_location": "maildir:~/Maildir",
                "passwd_file": str(folder / "passwd"),
                "pop3_delete_retention": "7d",
            }
        )
        home = folder / "home" / "alice"
        home.mkdir(parents=True)
        os.chown(home, owner.uid, owner.gid)
        user = User("alice", home=str(home), uid=owner.uid, gid=owner.gid)
        maildir = home / "Maildir"
        deliver(maildir, b"Subject: mine\n\nbody\n")
        if junk is not None:
            deliver(maildir / ".Junk", junk)
        chown_tree(maildir, owner)
        helper = await StorageHelper.start(
            config, OwnerPolicy.from_config(config, fallback=None), on_lost=print
        )
        try:
            yield owner, user, maildir, helper
        finally:
            await helper.aclose()


async def test_through_the_storage_helper_as_the_mail_owner() -> None:
    """Mode 3 (root, mail of an unprivileged user): kept and restored files stay the user's."""
    async with _owned_by_alice() as (owner, user, maildir, helper):
        maildrop = await helper.store.open(user)
        (info,) = maildrop.messages
        result = await maildrop.delete([info.key])
        await maildrop.close()
        await helper.aclose()
        kept = list((maildir / DELETED_FOLDER / "cur").iterdir())
        owners = {p.stat().st_uid for p in [maildir / DELETED_FOLDER, *kept]}
        local = MaildirStore("maildir:~/Maildir", owner=owner.uid, retention=WEEK)
        restored = await local.restore_deleted(user)
        index_owner = (maildir / "pobox-uidlist").stat().st_uid
    assert ((info.key,), 1, {owner.uid}) == (result.removed, len(kept), owners)
    assert [(info.uidl, info.size)] == [(m.uidl, m.size) for m in restored]
    assert owner.uid == index_owner


@pytest.mark.parametrize(("value", "ok"), [(3600, True), (0, True), (-1, False), ("7d", False)])
def test_helper_hello_takes_only_a_whole_number_of_seconds(value: object, ok: bool) -> None:
    """The storage helper's ``hello`` carries the retention in seconds, checked."""
    frame = {
        "location": "maildir:~/Maildir", "mail_uid": None, "mail_gid": None,
        "first_valid_uid": 500, "last_valid_uid": 0, "first_valid_gid": 1, "last_valid_gid": 0,
        "files": {}, "appends": {}, "workers": 1, "retention": value,
    }  # fmt: skip
    if ok:
        assert value == Settings.from_wire(frame).retention
    else:
        with pytest.raises(InvalidRequest, match="retention"):
            Settings.from_wire(frame)


async def test_restore_without_index_writes_no_index(tmp_path: Path) -> None:
    """Served without an index (UIDLs from file names), a restore creates none."""
    store = MaildirStore(f"maildir:{tmp_path}/%n", index=False, retention=WEEK)
    deliver(tmp_path / "alice", b"x\n")
    maildrop = await store.open(ALICE)
    (info,) = maildrop.messages
    await maildrop.delete([info.key])
    await maildrop.close()
    (restored,) = await store.restore_deleted(ALICE)
    assert (info.uidl, info.size) == (restored.uidl, restored.size)
    assert not (tmp_path / "alice" / "pobox-uidlist").exists()


async def test_restore_never_changes_the_uidl_of_a_message_there(
    keeping: MaildirStore, tmp_path: Path
) -> None:
    """A kept message whose base name is in the maildrop again (copied back by hand in
    ``new/``) stays kept: the message there keeps its UIDL."""
    name = Path(deliver(tmp_path / "alice", b"x\n")).name
    await _delete_all(keeping)
    kept_file = tmp_path / "alice" / DELETED_FOLDER / "cur" / name
    (tmp_path / "alice" / "new" / name.split(":")[0]).write_bytes(kept_file.read_bytes())
    maildrop = await keeping.open(ALICE)
    (there,) = maildrop.messages
    await maildrop.close()
    assert () == await keeping.restore_deleted(ALICE)
    maildrop = await keeping.open(ALICE)
    assert [there] == list(maildrop.messages)
    await maildrop.close()
    assert 1 == len(await keeping.deleted_messages(ALICE))


async def test_junk_message_kept_in_the_maildirs_hidden_folder(
    keeping: MaildirStore, tmp_path: Path
) -> None:
    """A Junk message deleted in a pop3_folders session goes to the maildir's own
    ``.pobox-deleted/`` (not one inside ``.Junk``), its list line naming the folder."""
    name = Path(deliver(tmp_path / "alice" / ".Junk", b"Subject: spam\n\nbuy\n")).name
    maildrop = await keeping.open_folders(ALICE, ["INBOX", "Junk"])
    (info,) = maildrop.messages
    assert ((info.key,), ()) == astuple(await maildrop.delete([info.key]))
    await maildrop.close()
    assert [name] == [p.name for p in (tmp_path / "alice" / DELETED_FOLDER / "cur").iterdir()]
    assert not (tmp_path / "alice" / ".Junk" / DELETED_FOLDER).exists()
    text = (tmp_path / "alice" / DELETED_FOLDER / DELETED_LIST).read_text()
    assert f" P{info.uidl} FJunk :{name}\n" in text


@pytest.mark.parametrize("folder", ["../x", ".Junk", "a/b", "Junk:", " Junk"])
async def test_forged_folder_in_the_list_is_dropped(
    keeping: MaildirStore, tmp_path: Path, folder: str
) -> None:
    """A list line whose folder could leave the maildir is ignored: nothing listed, nothing
    restored anywhere."""
    name = Path(deliver(tmp_path / "alice", b"x\n")).name
    await _delete_all(keeping)
    listing = tmp_path / "alice" / DELETED_FOLDER / DELETED_LIST
    listing.write_text(listing.read_text().replace(" :", f" F{folder} :"))
    assert () == await keeping.deleted_messages(ALICE)
    assert () == await keeping.restore_deleted(ALICE)
    assert (tmp_path / "alice" / DELETED_FOLDER / "cur" / name).exists()


async def test_restore_into_a_folder_that_is_gone_goes_to_the_inbox(
    keeping: MaildirStore, tmp_path: Path
) -> None:
    """If the folder was deleted since (an IMAP client removed Junk), the message comes back
    into the INBOX rather than into a folder made again."""
    deliver(tmp_path / "alice" / ".Junk", b"spam\n")
    maildrop = await keeping.open_folders(ALICE, ["INBOX", "Junk"])
    await maildrop.delete([info.key for info in maildrop.messages])
    await maildrop.close()
    shutil.rmtree(tmp_path / "alice" / ".Junk")
    (restored,) = await keeping.restore_deleted(ALICE, folders=["INBOX", "Junk"])
    assert "INBOX" == restored.folder
    assert not (tmp_path / "alice" / ".Junk").exists()
    maildrop = await keeping.open(ALICE)
    assert [restored.uidl] == [info.uidl for info in maildrop.messages]
    await maildrop.close()


async def test_junk_kept_through_the_storage_helper_and_restored_into_junk() -> None:
    """Mode 3: a Junk message deleted in a folder session through the helper is kept in the
    maildir's ``.pobox-deleted/`` (the user's file), and restored into ``.Junk/`` with the UIDL
    the merged listing gave it."""
    async with _owned_by_alice(junk=b"Subject: spam\n\nbuy\n") as (owner, user, maildir, helper):
        maildrop = await helper.store.open_folders(user, ["INBOX", "Junk"])
        before = [(i.folder, i.uidl, i.size) for i in maildrop.messages]
        (junk,) = [i for i in maildrop.messages if i.folder == "Junk"]
        result = await maildrop.delete([junk.key])
        await maildrop.close()
        await helper.aclose()
        kept = list((maildir / DELETED_FOLDER / "cur").iterdir())
        owners = {p.stat().st_uid for p in kept}
        local = MaildirStore("maildir:~/Maildir", owner=owner.uid, retention=WEEK)
        restored = await local.restore_deleted(user, folders=["INBOX", "Junk"])
        after = await local.open_folders(user, ["INBOX", "Junk"])
        listing = [(i.folder, i.uidl, i.size) for i in after.messages]
        await after.close()
        junk_owners = {p.stat().st_uid for p in (maildir / ".Junk" / "cur").iterdir()}
    assert ((junk.key,), 1, {owner.uid}) == (result.removed, len(kept), owners)
    assert [(junk.uidl, "Junk")] == [(m.uidl, m.folder) for m in restored]
    assert sorted(before) == sorted(listing)
    assert {owner.uid} == junk_owners
