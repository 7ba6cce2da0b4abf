"""RETR marks a message seen, as Dovecot does, so pobox and an IMAP server can share a Maildir.

A real pobox serves real Maildirs to poplib on loopback. A message sent whole by RETR gets the
``S`` flag (``:2,S``, moved from ``new/`` to ``cur/``) at the end of the session, other flags
kept and sorted; TOP does not; ``pop3_no_flag_updates`` turns it off. UIDLs and sizes never
change with the rename. The last class runs Debian's Dovecot on the same Maildir: Dovecot's
own RETR marks a message seen, pobox keeps that flag, and Dovecot's UIDLs and sizes stay the
same after pobox marked messages seen.
"""

from __future__ import annotations

import asyncio
import poplib
from pathlib import Path

import pytest

from pobox.storage.base import SeenFlags
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._names import seen_name
from pobox.testing import RunningServer, running_server
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import User, deliver, set_flags

#: How long a client waits for any one answer (a deadline, never an assertion on time).
TIMEOUT = 10


def files(maildir: Path) -> dict[str, str]:
    """Map each message's base name to ``dir/name`` of its file."""
    found = {}
    for directory in ("new", "cur"):
        for entry in (maildir / directory).iterdir():
            found[entry.name.partition(":")[0]] = f"{directory}/{entry.name}"
    return found


def login(host: str, port: int, user: str = "alice") -> poplib.POP3:
    """Log in by USER/PASS (password ``secret``)."""
    client = poplib.POP3(host, port, timeout=TIMEOUT)
    client.user(user)
    client.pass_("secret")
    return client


def login_when_free(host: str, port: int) -> poplib.POP3:
    """Log in as soon as the previous session has released the maildrop (``[IN-USE]``)."""
    for _ in range(1000):
        try:
            return login(host, port)
        except poplib.error_proto as exc:
            if b"IN-USE" not in exc.args[0]:
                raise
    msg = "the maildrop stayed locked"
    raise AssertionError(msg)


def listing(client: poplib.POP3) -> list[tuple[str, int]]:
    """Return (UIDL, size) by message number."""
    _, uidls, _ = client.uidl()
    _, sizes, _ = client.list()
    return [
        (uidl.split()[1].decode(), int(size.split()[1]))
        for uidl, size in zip(uidls, sizes, strict=True)
    ]


def session(srv: RunningServer, *commands: tuple[str, int]) -> list[tuple[str, int]]:
    """Log in, note the listing, run ``("retr"|"top"|"dele", n)`` commands, QUIT."""
    client = login_when_free(srv.host, srv.port)
    before = listing(client)
    for command, number in commands:
        if command == "top":
            client.top(number, 0)
        else:
            getattr(client, command)(number)
    client.quit()
    return before


class TestSeenName:
    """The new name of a message file, by the Maildir rules."""

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("1.M1P1.host,S=5", "1.M1P1.host,S=5:2,S"),
            ("1.M1P1.host:2,", "1.M1P1.host:2,S"),
            ("1.M1P1.host:2,RF", "1.M1P1.host:2,FRS"),
            ("1.M1P1.host:2,Tba", "1.M1P1.host:2,STab"),
            ("1.M1P1.host:2,DFPRT", "1.M1P1.host:2,DFPRST"),
            ("1.M1P1.host:2,FS", None),
            ("1.M1P1.host:1,experimental", None),
        ],
    )
    def test_flag_added_in_ascii_order(self, name: str, expected: str | None) -> None:
        """``S`` joins the flags in ASCII order; a seen or non-``2,`` name is left alone."""
        assert expected == seen_name(name)


class TestRetrMarksSeen:
    """What a session leaves in the Maildir."""

    async def test_retr_marks_seen_top_does_not_uidl_and_size_kept(self, tmp_path: Path) -> None:
        """RETR'd messages get ``S`` (new/ to cur/, flags kept); TOP'd and untouched do not."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            retr_new = deliver(maildir, b"Subject: 1\n\nretrieved\n")
            topped = deliver(maildir, b"Subject: 2\n\nonly TOP\n")
            untouched = deliver(maildir, b"Subject: 3\n\nnot asked for\n", fields="")
            flagged = deliver(maildir, b"Subject: 4\r\n\r\nflagged\r\n", flags="RF")
            seen = deliver(maildir, b"Subject: 5\n\nseen already\n", flags="S")
            before = await asyncio.to_thread(
                session, srv, ("retr", 1), ("top", 2), ("retr", 4), ("retr", 5)
            )
            after = await asyncio.to_thread(session, srv)
        assert {
            retr_new: f"cur/{retr_new}:2,S",
            topped: f"new/{topped}",
            untouched: f"new/{untouched}",
            flagged: f"cur/{flagged}:2,FRS",
            seen: f"cur/{seen}:2,S",
        } == files(maildir)
        assert before == after

    async def test_no_flag_updates_leaves_files_alone(self, tmp_path: Path) -> None:
        """With ``pop3_no_flag_updates``, RETR renames nothing."""
        async with running_server(tmp_path, pop3_no_flag_updates=True) as srv:
            maildir = srv.maildir("alice")
            fresh = deliver(maildir, b"Subject: 1\n\nbody\n")
            flagged = deliver(maildir, b"Subject: 2\n\nbody\n", flags="F")
            await asyncio.to_thread(session, srv, ("retr", 1), ("retr", 2))
        assert {fresh: f"new/{fresh}", flagged: f"cur/{flagged}:2,F"} == files(maildir)

    async def test_deleted_message_is_not_brought_back(self, tmp_path: Path) -> None:
        """A message RETR'd then DELE'd is gone after QUIT, not renamed back into cur/."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            gone = deliver(maildir, b"Subject: 1\n\nbody\n")
            kept = deliver(maildir, b"Subject: 2\n\nbody\n")
            await asyncio.to_thread(session, srv, ("retr", 1), ("dele", 1), ("retr", 2))
        assert {kept: f"cur/{kept}:2,S"} == files(maildir)
        assert gone not in files(maildir)

    async def test_dropped_session_keeps_the_seen_flag(self, tmp_path: Path) -> None:
        """A session that ends without QUIT marks what it sent seen, and deletes nothing."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            base = deliver(maildir, b"Subject: 1\n\nbody\n")
            other = deliver(maildir, b"Subject: 2\n\nbody\n")

            def drop() -> None:
                client = login(srv.host, srv.port)
                client.retr(1)
                client.dele(2)
                client.sock.close()  # no QUIT

            await asyncio.to_thread(drop)
            # The next login gets in once the dropped session has released the lock, which it
            # does after marking.
            await asyncio.to_thread(lambda: login_when_free(srv.host, srv.port).quit())
        assert {base: f"cur/{base}:2,S", other: f"new/{other}"} == files(maildir)

    async def test_imap_rename_during_the_session_is_followed_and_kept(
        self, tmp_path: Path
    ) -> None:
        """A flag an IMAP server sets meanwhile (a rename) is found and kept: ``:2,FS``."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            base = deliver(maildir, b"Subject: 1\n\nbody\n")

            def retr_while_imap_flags() -> list[tuple[str, int]]:
                client = login(srv.host, srv.port)
                before = listing(client)
                client.retr(1)
                set_flags(maildir, base, "F")  # as an IMAP client's STORE +FLAGS \Flagged
                client.quit()
                return before

            before = await asyncio.to_thread(retr_while_imap_flags)
            after = await asyncio.to_thread(session, srv)
        assert {base: f"cur/{base}:2,FS"} == files(maildir)
        assert before == after

    async def test_message_expunged_meanwhile_is_not_an_error(self, tmp_path: Path) -> None:
        """A message removed by another program after RETR is simply gone; the rest is marked."""
        async with running_server(tmp_path) as srv:
            maildir = srv.maildir("alice")
            gone = deliver(maildir, b"Subject: 1\n\nbody\n")
            kept = deliver(maildir, b"Subject: 2\n\nbody\n")

            def retr_then_expunge() -> None:
                client = login(srv.host, srv.port)
                client.retr(1)
                client.retr(2)
                (maildir / "new" / gone).unlink()
                client.quit()

            await asyncio.to_thread(retr_then_expunge)
        assert {kept: f"cur/{kept}:2,S"} == files(maildir)

    async def test_link_in_place_of_a_message_is_not_renamed(self, tmp_path: Path) -> None:
        """A message swapped for a symlink after RETR is not renamed (nor its target)."""
        target = tmp_path / "elsewhere"
        target.write_bytes(b"Subject: other\n\n")
        async with running_server(tmp_path / "srv") as srv:
            maildir = srv.maildir("alice")
            base = deliver(maildir, b"Subject: 1\n\nbody\n")

            def retr_then_swap() -> None:
                client = login(srv.host, srv.port)
                client.retr(1)
                (maildir / "new" / base).unlink()
                (maildir / "new" / base).symlink_to(target)
                client.quit()

            await asyncio.to_thread(retr_then_swap)
        assert {base: f"new/{base}"} == files(maildir)
        assert (maildir / "new" / base).is_symlink()


class TestStore:
    """The store's side, without a session."""

    async def test_maildir_maildrop_offers_seen_flags(self, tmp_path: Path) -> None:
        """The Maildir maildrop is :class:`SeenFlags`; marking twice renames once."""
        maildir = tmp_path / "Maildir"
        base = deliver(maildir, b"Subject: 1\n\nbody\n")
        store = MaildirStore(f"maildir:{maildir}")
        maildrop = await store.open(User("alice"))
        try:
            assert isinstance(maildrop, SeenFlags)
            key = maildrop.messages[0].key
            first = await maildrop.mark_seen([key])
            second = await maildrop.mark_seen([key, "no-such-key"])
            data = b"".join([chunk async for chunk in maildrop.read_message(key)])
        finally:
            await maildrop.close()
        assert ((), ("no-such-key",)) == (first, second)
        assert {base: f"cur/{base}:2,S"} == files(maildir)
        assert b"Subject: 1\n\nbody\n" == data


@pytest.mark.external
class TestWithDovecot:
    """Debian's Dovecot and pobox take turns on one Maildir."""

    async def test_flags_and_uidls_survive_both_ways(self) -> None:
        """Dovecot's seen flag is kept by pobox; Dovecot's UIDLs and sizes survive pobox's."""
        with searchable_tmpdir() as tmp:
            maildir = tmp / "home" / "alice" / "Maildir"
            names = [
                deliver(maildir, b"Subject: 1\n\nread by Dovecot\n"),
                deliver(maildir, b"Subject: 2\n\nread by pobox\n", fields=""),
                deliver(maildir, b"Subject: 3\r\n\r\nonly TOP\r\n"),
                deliver(maildir, b"Subject: 4\n\nflagged in IMAP\n", flags="F"),
            ]
            with running_dovecot(tmp, users={"alice": "secret"}) as dovecot:

                def dovecot_session(*retr: int) -> list[tuple[str, int]]:
                    client = login(dovecot.host, dovecot.port)
                    found = listing(client)
                    for number in retr:
                        client.retr(number)
                    client.quit()
                    return found

                first = await asyncio.to_thread(dovecot_session, 1)
                await asyncio.to_thread(dovecot.wait_for_log, "Logged out", count=1)
                after_dovecot = files(maildir)
                store = MaildirStore(f"maildir:{maildir}", owner=maildir.stat().st_uid)
                async with running_server(tmp / "pobox", store=store) as srv:
                    by_pobox = await asyncio.to_thread(
                        session, srv, ("retr", 2), ("top", 3), ("retr", 4)
                    )
                after_pobox = files(maildir)
                last = await asyncio.to_thread(dovecot_session)
        assert f"cur/{names[0]}:2,S" == after_dovecot[names[0]]  # Dovecot marks RETR seen too
        assert {
            names[0]: f"cur/{names[0]}:2,S",
            names[1]: f"cur/{names[1]}:2,S",
            names[2]: after_dovecot[names[2]],  # Dovecot moves new/ to cur/ with ":2,"
            names[3]: f"cur/{names[3]}:2,FS",
        } == after_pobox
        assert (first, first) == (by_pobox, last)
