"""``pop3_folders`` end to end: Junk mail seen, marked, counted and deleted by real clients.

A real server on loopback, on Maildir (Maildir++ ``.Junk/``) and on PostgreSQL (the
``folder`` column); poplib checks the octet counts byte for byte (LIST, STAT, RETR, TOP) with
the marks, and that DELE + QUIT removes the message from Junk; fetchmail downloads Junk mail
with its mark and deletes it; an IMAP-style move between folders keeps the UIDL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import poplib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.storage.maildir import MaildirStore
from pobox.testing import RunningServer, running_server
from tests.helpers import need
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import deliver
from tests.integration.test_clients import fetchmail_all

HAM = b"From: a@example.test\nSubject: lunch\n\nsee you\n"
SPAM = b"From: s@example.test\nSubject: cheap pills\n\n.buy\nnow\n"
NO_SUBJECT = b"From: s@example.test\n\nno subject here\n"


def _wire(data: bytes) -> bytes:
    """``data`` with CRLF line ends, as POP3 sends it (before byte-stuffing)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _session(
    srv: RunningServer, *, user: str = "alice", delete: tuple[int, ...] = ()
) -> tuple[tuple[int, int], list[int], list[tuple[int, bytes]], list[str], bytes]:
    """STAT, LIST sizes, (octets, bytes) of each RETR, UIDLs and TOP n 0 of the last message."""
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    client.user(user)
    client.pass_("secret")
    stat = client.stat()
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    uidls = [line.split()[1].decode() for line in client.uidl()[1]]
    retrieved = []
    for number in range(1, len(sizes) + 1):
        _, lines, octets = client.retr(number)
        retrieved.append((octets, b"".join(line + b"\r\n" for line in lines)))
    top = b""
    if sizes:
        top = b"".join(line + b"\r\n" for line in client.top(len(sizes), 0)[1])
    for number in delete:
        client.dele(number)
    client.quit()
    return stat, sizes, retrieved, uidls, top


@pytest.fixture(params=["maildir", "postgresql"])
async def junk_srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A server listing INBOX and Junk with the header mark, on each store."""
    settings: dict[str, object] = {
        "pop3_folders": ["INBOX", "Junk"],
        "pop3_folder_mark": "header",
    }
    if request.param == "postgresql":
        settings |= {
            "mail_location": "postgresql",
            "postgresql_dsn": request.getfixturevalue("pg_dsn"),
            "postgresql_timeout": 10,
        }
    async with running_server(tmp_path, **settings) as server:
        yield server


class TestJunkOverPop3:
    """poplib sees INBOX and Junk merged, the Junk message marked, the counts exact."""

    async def test_listed_marked_exact_and_deleted_from_junk(self, junk_srv: RunningServer) -> None:
        """LIST/STAT/RETR/TOP count the mark; DELE + QUIT removes the message from Junk."""
        junk_srv.deliver("alice", HAM)
        junk_srv.deliver_to_folder("alice", "Junk", SPAM)
        stat, sizes, retrieved, uidls, top = await asyncio.to_thread(
            _session, junk_srv, delete=(2,)
        )
        marked = b"X-Folder: Junk\r\n" + _wire(SPAM)
        assert [_wire(HAM), marked] == [data.replace(b"\r\n..", b"\r\n.") for _, data in retrieved]
        # Expected sizes by hand: HAM 45 octets + 4 LFs; SPAM 52 + 5 LFs, + 16 for the mark.
        assert [49, 73] == sizes
        assert (2, 49 + 73) == stat
        # poplib's octet count is the bytes it read (with the stuffed dot taken off again).
        assert sizes == [octets for octets, _ in retrieved]
        assert 2 == len(set(uidls))
        assert b"X-Folder: Junk\r\nFrom: s@example.test\r\nSubject: cheap pills\r\n\r\n" == top
        assert (0, 1) == (junk_srv.count_folder("alice", "Junk"), junk_srv.count("alice"))

    async def test_per_user_field_turns_folders_on(self, tmp_path: Path) -> None:
        """The userdb field ``pop3_folders=INBOX,Junk`` shows bob his Junk; alice sees INBOX."""
        async with running_server(tmp_path) as srv:
            add_user(
                Path(srv.config.passwd_file),
                "bob",
                b"secret",
                scheme="PLAIN",
                extra=["pop3_folders=INBOX,Junk"],
            )
            for user in ("alice", "bob"):
                srv.deliver(user, HAM)
                srv.deliver_to_folder(user, "Junk", SPAM)
            alice = await asyncio.to_thread(_session, srv)
            bob = await asyncio.to_thread(_session, srv, user="bob")
        assert [_wire(HAM)] == [data for _, data in alice[2]]
        assert [_wire(HAM), _wire(SPAM)] == [
            data.replace(b"\r\n..", b"\r\n.") for _, data in bob[2]
        ]

    async def test_bad_per_user_field_is_ignored_and_logged(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``pop3_folders=../x`` in the userdb: the global folders, and a warning."""
        async with running_server(tmp_path, pop3_folders=["INBOX", "Junk"]) as srv:
            add_user(
                Path(srv.config.passwd_file),
                "bob",
                b"secret",
                scheme="PLAIN",
                extra=["pop3_folders=INBOX,../x"],
            )
            srv.deliver("bob", HAM)
            srv.deliver_to_folder("bob", "Junk", SPAM)
            with caplog.at_level(logging.WARNING):
                bob = await asyncio.to_thread(_session, srv, user="bob")
        assert 2 == len(bob[2])
        assert "bad pop3_folders ignored" in caplog.text

    @pytest.mark.parametrize(
        ("message", "expected", "added"),
        [
            (SPAM, b"From: s@example.test\r\nSubject: [Junk] cheap pills\r\n", 7),
            (NO_SUBJECT, b"Subject: [Junk]\r\nFrom: s@example.test\r\n", 17),
        ],
    )
    async def test_subject_mark(
        self, tmp_path: Path, message: bytes, expected: bytes, added: int
    ) -> None:
        """``subject`` tags the subject (or adds one); sizes count it."""
        async with running_server(
            tmp_path, pop3_folders="INBOX,Junk", pop3_folder_mark="subject"
        ) as srv:
            srv.deliver_to_folder("alice", "Junk", message)
            _, sizes, retrieved, _, _ = await asyncio.to_thread(_session, srv)
        ((octets, data),) = retrieved
        assert data.startswith(expected)
        assert sizes == [octets] == [len(_wire(message)) + added]
        assert len(data.replace(b"\r\n..", b"\r\n.")) == octets


class TestMaildirFolders:
    """What only a Maildir shows: IMAP moves, seen flags, files gone from ``.Junk/``."""

    async def test_imap_move_keeps_the_uidl_and_retr_marks_seen(self, tmp_path: Path) -> None:
        """Junk → INBOX by rename keeps the UIDL; a RETR gives the Junk file the S flag."""
        async with running_server(tmp_path, pop3_folders=["INBOX", "Junk"]) as srv:
            srv.deliver_to_folder("alice", "Junk", SPAM)
            _, _, _, before, _ = await asyncio.to_thread(_session, srv)
            junk = srv.maildir("alice") / ".Junk"
            (seen,) = (junk / "cur").iterdir()
            assert seen.name.endswith(":2,S")
            os.rename(seen, srv.maildir("alice") / "cur" / seen.name)  # the IMAP client's MOVE
            _, _, retrieved, after, _ = await asyncio.to_thread(_session, srv)
        assert before == after
        assert [_wire(SPAM)] == [data.replace(b"\r\n..", b"\r\n.") for _, data in retrieved]

    async def test_junk_as_a_link_to_another_maildir_is_left_out(self, tmp_path: Path) -> None:
        """``.Junk -> bob's maildir`` (same owner: virtual users) shows none of bob's mail."""
        async with running_server(
            tmp_path, {"alice": "secret", "bob": "secret"}, pop3_folders=["INBOX", "Junk"]
        ) as srv:
            srv.deliver("alice", HAM)
            srv.deliver("bob", SPAM)
            os.symlink(srv.maildir("bob"), srv.maildir("alice") / ".Junk")
            _, _, retrieved, _, _ = await asyncio.to_thread(_session, srv, delete=(1,))
            assert 1 == srv.count("bob")
        assert [_wire(HAM)] == [data for _, data in retrieved]


@pytest.mark.external
class TestFetchmailJunk:
    """fetchmail downloads Junk mail with its mark and deletes it from ``.Junk/``."""

    async def test_fetch_all_and_delete(self, tmp_path: Path) -> None:
        """Both messages arrive (Junk with ``X-Folder: Junk`` first); both folders are empty."""
        fetchmail = need("fetchmail")
        async with running_server(
            tmp_path / "srv", pop3_folders=["INBOX", "Junk"], pop3_folder_mark="header"
        ) as srv:
            srv.deliver("alice", HAM)
            srv.deliver_to_folder("alice", "Junk", SPAM)
            out = await fetchmail_all(fetchmail, srv, tmp_path)
            left = (srv.count("alice"), srv.count_folder("alice", "Junk"))
        got = sorted(p.read_bytes() for p in out.iterdir())
        assert sorted([HAM, b"X-Folder: Junk\n" + SPAM]) == got
        assert (0, 0) == left


@pytest.mark.external
class TestWithDovecot:
    """Debian's Dovecot moves a message between folders; pobox's UIDL does not change."""

    async def test_doveadm_move_keeps_the_pop3_uidl(self) -> None:
        """Junk → INBOX and back with ``doveadm move`` (IMAP MOVE's code): same UIDL each time."""
        doveadm = need("doveadm")
        with searchable_tmpdir() as tmp:
            maildir = tmp / "home" / "alice" / "Maildir"
            deliver(maildir, HAM)
            deliver(maildir / ".Junk", SPAM)
            with running_dovecot(tmp, users={"alice": "secret"}) as dovecot:

                def move(source: str, target: str) -> None:
                    subprocess.run(
                        [doveadm, "-c", str(dovecot.config), "move", "-u", "alice", target,
                         "mailbox", source, "all"],
                        check=True, capture_output=True, timeout=30,
                    )  # fmt: skip

                store = MaildirStore(f"maildir:{maildir}", owner=maildir.stat().st_uid)
                async with running_server(
                    tmp / "pobox", store=store, pop3_folders=["INBOX", "Junk"]
                ) as srv:
                    first = await asyncio.to_thread(_uidls_by_body, srv)
                    await asyncio.to_thread(move, "Junk", "INBOX")
                    moved_in = await asyncio.to_thread(_uidls_by_body, srv)
                    await asyncio.to_thread(move, "INBOX", "Junk")
                    moved_out = await asyncio.to_thread(_uidls_by_body, srv)
                junk_files = list((maildir / ".Junk" / "cur").iterdir()) + list(
                    (maildir / ".Junk" / "new").iterdir()
                )
        assert 2 == len(first)
        assert first == moved_in == moved_out
        assert 2 == len(junk_files)  # both went to Junk at the end: the moves happened


def _uidls_by_body(srv: RunningServer) -> dict[bytes, str]:
    """UIDL of each message of a session, by its body (the line after the empty one)."""
    _, _, retrieved, uidls, _ = _session(srv)
    return {
        data.split(b"\r\n\r\n", 1)[1]: uidl
        for (_, data), uidl in zip(retrieved, uidls, strict=True)
    }
