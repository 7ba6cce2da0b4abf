"""mbox end to end: poplib against pobox, Dovecot on the same spool, procmail appending meanwhile.

The spools are written as an MTA writes them (:mod:`tests.helpers.mbox`) or by a real MTA
(procmail, with its dotlock and kernel lock). Dovecot runs its mail processes as ``nobody``
when the tests run as root, so the spool Dovecot shares belongs to ``nobody``, and pobox's
store is told that owner.
"""

from __future__ import annotations

import asyncio
import os
import poplib
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pobox.auth.passwdfile import add_user
from pobox.storage.mbox import MboxStore
from pobox.testing import RunningServer, deliver_to_maildir, running_server
from tests.delivery.helpers import retrieve_all, running_pobox
from tests.helpers.accounts import ROOT_MAIL_SETTINGS
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import User, incoming
from tests.helpers.mbox import append

#: Messages that exercise the reader: hidden headers (Status, X-UID, a lying Content-Length,
#: X-Keywords, a folded X-Status), >From lines (never unquoted), CRLF, no final newline,
#: dot lines, an empty message, a quoted From_-looking line and trailing empty lines.
MESSAGES = [
    b"Subject: one\nFrom: a@example.org\n\nHello\n",
    b"Status: RO\nX-UID: 5\nContent-Length: 9999\nX-Keywords: \nSubject: two\n\nbody\n"
    b">From quoted\n",
    b"Subject: three\r\n\r\nline\r\n",
    b"Subject: four\n\nlast line",
    b"Subject: five\n\n.\n..\n.x\n",
    b"X-Status: A\n  continued\nSubject: six\n\nx\n",
    b"",
    b"Subject: eight\n\nFrom me Mon Dec  7 15:00:00 2026 looks like a From_ line\n",
    b"Subject: nine\n\nend\n\n\n",
]


def _session(
    host: str, port: int, delete: tuple[int, ...] = ()
) -> list[tuple[str, int, list[bytes]]]:
    """Log in as alice; return (UIDL, LIST size, RETR lines) of each message; DELE; QUIT."""
    client = poplib.POP3(host, port, timeout=10)
    client.user("alice")
    client.pass_("secret")
    _, uidls, _ = client.uidl()
    _, sizes, _ = client.list()
    out = []
    for uidl_line, size_line in zip(uidls, sizes, strict=True):
        number, uidl = uidl_line.decode().split()
        _, lines, _ = client.retr(int(number))
        out.append((uidl, int(size_line.split()[1]), lines))
    for number in delete:
        client.dele(number)
    client.quit()
    return out


def _shared_spool(folder: Path, messages: list[bytes] = MESSAGES) -> tuple[Path, int]:
    """Write ``messages`` into ``folder/spool/alice``, owned by Dovecot's mail user (the spool
    directory too); return the directory and the owner."""
    owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    spool = folder / "spool"
    spool.mkdir()
    for message in messages:
        append(spool / "alice", message)
    for path in (spool, *spool.iterdir()):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    spool.chmod(0o775)
    return spool, owner.pw_uid


def _comparable(session: list[tuple[str, int, list[bytes]]]) -> list[tuple[int, list[bytes]]]:
    """(size, lines) of each message of a session, as both servers must agree on them.

    The one known difference is left out: Dovecot sends an empty message (LIST 0) as one
    empty line (``+OK``, CRLF, ``.``), pobox as no line at all, as its LIST size says.
    """
    return [(size, lines if size else []) for _, size, lines in session]


class TestDovecotOnTheSameSpool:
    """pobox and Dovecot (``mail_location = mbox:...``) serve one spool alike."""

    async def test_same_count_sizes_and_bytes(self) -> None:
        """Same message count, LIST sizes and RETR lines; pobox's UIDLs survive Dovecot's
        rewrite of the spool (it adds X-IMAPbase, X-UID and Status headers, which are hidden).
        """
        with searchable_tmpdir() as folder:
            spool, owner = _shared_spool(folder)
            store = MboxStore(f"mbox:{spool}/%u", owner=owner)
            async with running_server(folder / "pobox", store=store) as srv:
                before = await asyncio.to_thread(_session, srv.host, srv.port)
                location = f"mbox:~/mail:INBOX={spool}/%u"
                with running_dovecot(folder, {"alice": "secret"}, location) as dovecot:
                    theirs = await asyncio.to_thread(_session, dovecot.host, dovecot.port)
                rewritten = b"X-IMAPbase:" in (spool / "alice").read_bytes()
                after = await asyncio.to_thread(_session, srv.host, srv.port)
        assert len(MESSAGES) == len(before)
        assert _comparable(theirs) == _comparable(before)
        # Dovecot's rewrite even turns the CRLF empty line that ends message 3's header into
        # LF: the same message on the wire, so the same UIDL (identities read CRLF as LF).
        assert (True, before) == (rewritten, after)

    async def test_dovecot_sees_what_pobox_left(self) -> None:
        """After pobox deleted messages 1 and 3, Dovecot lists the others, same sizes and bytes."""
        with searchable_tmpdir() as folder:
            spool, owner = _shared_spool(folder)
            store = MboxStore(f"mbox:{spool}/%u", owner=owner)
            async with running_server(folder / "pobox", store=store) as srv:
                first = await asyncio.to_thread(_session, srv.host, srv.port, (1, 3))
                location = f"mbox:~/mail:INBOX={spool}/%u"
                with running_dovecot(folder, {"alice": "secret"}, location) as dovecot:
                    theirs = await asyncio.to_thread(_session, dovecot.host, dovecot.port)
                mode = (spool / "alice").stat()
        assert _comparable(first[1:2] + first[3:]) == _comparable(theirs)
        assert (owner, 0o600) == (mode.st_uid, mode.st_mode & 0o7777)

    async def test_spool_written_by_dovecot_lda(self) -> None:
        """What dovecot-lda appends (From_ lines in bodies unquoted, a Content-Length written)
        is listed and sent by pobox as by Dovecot."""
        lda = Path("/usr/lib/dovecot/dovecot-lda")
        if not lda.exists():
            pytest.fail("dovecot-lda is not installed: apt install dovecot-core")
        with searchable_tmpdir() as folder:
            spool, owner = _shared_spool(folder, messages=[])
            location = f"mbox:~/mail:INBOX={spool}/%u"
            with running_dovecot(folder, {"alice": "secret"}, location) as dovecot:
                results = [
                    subprocess.run(
                        [str(lda), "-c", str(dovecot.config), "-d", "alice", "-f", "s@x.org"],
                        input=_LDA_MESSAGE % (number, number),
                        capture_output=True,
                        check=False,
                        timeout=60,
                    )
                    for number in range(3)
                ]
                theirs = await asyncio.to_thread(_session, dovecot.host, dovecot.port)
            store = MboxStore(f"mbox:{spool}/%u", owner=owner)
            async with running_server(folder / "pobox", store=store) as srv:
                ours = await asyncio.to_thread(_session, srv.host, srv.port)
        assert [(0, b"")] * 3 == [(r.returncode, r.stderr) for r in results]
        assert 3 == len(ours)
        assert _comparable(theirs) == _comparable(ours)


#: A message whose body has an unquoted From_ line, a quoted one and a dot line.
_LDA_MESSAGE = (
    b"Subject: lda %d\nMessage-ID: <%d@lda>\n\nfirst\n"
    b"From x@y Mon Dec  7 15:00:00 2026\n>From z\n.dot\nlast\n"
)


class TestPoplib:
    """A real client on a pobox serving an mbox spool."""

    async def test_retrieve_delete_and_deliver(self, tmp_path: Path) -> None:
        """RETR gives the bytes in wire form, DELE+QUIT removes, delivery appends after."""
        spool = tmp_path / "spool"
        spool.mkdir()
        append(spool / "alice", b"Subject: a\n\nFrom the start\n.dot\n")
        append(spool / "alice", b"Subject: b\n\nsecond\n")
        async with running_server(tmp_path, mail_location=f"mbox:{spool}/%u") as srv:
            first = await asyncio.to_thread(_session, srv.host, srv.port, (1,))
            mta = MboxStore(f"mbox:{spool}/%u")
            await mta.deliver(User("alice"), incoming(b"Subject: c\r\n\r\nFrom here\r\n"))
            second = await asyncio.to_thread(_session, srv.host, srv.port)
        assert [b"Subject: a", b"", b">From the start", b".dot"] == first[0][2]
        assert [37, 22] == [size for _, size, _ in first]
        assert [first[1][0]] == [uidl for uidl, _, _ in second[:1]]
        assert [b"Subject: c", b"", b">From here"] == second[1][2]


def _messages_of(srv: RunningServer, user: str, password: str) -> list[list[bytes]]:
    """Log in as ``user``; return the lines of each message; QUIT."""
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    client.user(user)
    client.pass_(password)
    count, _ = client.stat()
    out = [client.retr(number)[1] for number in range(1, count + 1)]
    client.quit()
    return out


class TestMixedFormats:
    """``userdb_mail`` may name the other format than ``mail_location`` (users moving over)."""

    async def test_mbox_user_on_a_maildir_server(self, tmp_path: Path) -> None:
        """With Maildir the default, a user whose mail field is mbox: is served from the spool."""
        spool = tmp_path / "spool"
        spool.mkdir()
        append(spool / "bob", b"Subject: spooled\n\nin mbox\n")
        add_user(tmp_path / "passwd", "bob", b"pw", scheme="PLAIN", mail=f"mbox:{spool}/%u")
        async with running_server(tmp_path, {"alice": "secret"}) as srv:
            srv.deliver("alice", b"Subject: maildir\n\nin Maildir\n")
            bob = await asyncio.to_thread(_messages_of, srv, "bob", "pw")
            alice = await asyncio.to_thread(_messages_of, srv, "alice", "secret")
        assert [[b"Subject: spooled", b"", b"in mbox"]] == bob
        assert [[b"Subject: maildir", b"", b"in Maildir"]] == alice

    async def test_maildir_user_on_an_mbox_server(self, tmp_path: Path) -> None:
        """With mbox the default, a user whose mail field is maildir: is served from it."""
        spool = tmp_path / "spool"
        spool.mkdir()
        append(spool / "alice", b"Subject: spooled\n\nin mbox\n")
        maildir = tmp_path / "maildirs" / "bob"
        add_user(tmp_path / "passwd", "bob", b"pw", scheme="PLAIN", mail=f"maildir:{maildir}")
        deliver_to_maildir(maildir, b"Subject: maildir\n\nin Maildir\n")
        async with running_server(
            tmp_path, {"alice": "secret"}, mail_location=f"mbox:{spool}/%u"
        ) as srv:
            bob = await asyncio.to_thread(_messages_of, srv, "bob", "pw")
            alice = await asyncio.to_thread(_messages_of, srv, "alice", "secret")
        assert [[b"Subject: maildir", b"", b"in Maildir"]] == bob
        assert [[b"Subject: spooled", b"", b"in mbox"]] == alice


class TestLmtp:
    """LMTP delivers into mbox spools, then POP3 serves them."""

    async def test_lmtp_to_two_spools(self, tmp_path: Path) -> None:
        """LMTP deliveries to alice and bob land in their spools, ``From `` quoted."""
        spool = tmp_path / "spool"
        spool.mkdir()
        settings = {"mail_location": f"mbox:{spool}/%u"}
        async with running_pobox(tmp_path, ("alice", "bob"), **settings) as pobox:
            host, port = pobox.lmtp

            def send() -> list[dict[str, tuple[int, bytes]]]:
                with smtplib.LMTP(host, port, timeout=30) as client:
                    return [
                        client.sendmail("s@x.org", [name], b"Subject: lmtp\r\n\r\nFrom far\r\n")
                        for name in ("alice", "bob")
                    ]

            refused = await asyncio.to_thread(send)
            got = [
                await asyncio.to_thread(retrieve_all, pobox.pop3.host, pobox.pop3.port, name)
                for name in ("alice", "bob")
            ]
        assert [{}, {}] == refused
        assert [1, 1] == [len(messages) for messages in got]
        assert all(m[0].endswith(b"Subject: lmtp\r\n\r\n>From far\r\n") for m in got)
        assert (spool / "alice").read_bytes().startswith(b"From s@x.org ")


class TestDeliverCommand:
    """``pobox deliver`` (the MDA an MTA runs) appends to the spool."""

    async def test_pobox_deliver_appends(self, tmp_path: Path) -> None:
        """Two runs append two messages, quoted, readable by the store in order."""
        spool = tmp_path / "spool"
        spool.mkdir()
        add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
        config = tmp_path / "pobox.toml"
        config.write_text(
            f'mail_location = "mbox:{spool}/%u"\npasswd_file = "{tmp_path / "passwd"}"\n'
            + ROOT_MAIL_SETTINGS
        )
        command = [sys.executable, "-m", "pobox", "deliver", "-u", "alice", "-f", "s@x.org"]
        results = [
            subprocess.run(
                [*command, "-c", str(config)],
                input=f"Subject: {number}\n\nFrom the MDA\n".encode(),
                capture_output=True,
                check=False,
                timeout=60,
            )
            for number in (1, 2)
        ]
        store = MboxStore(f"mbox:{spool}/%u")
        maildrop = await store.open(User("alice"))
        bodies = [
            b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            for info in maildrop.messages
        ]
        await maildrop.close()
        assert [(0, b"")] * 2 == [(r.returncode, r.stderr) for r in results]
        pattern = rb"Return-Path: <s@x\.org>\nDelivered-To: alice\nReceived: [^\n]+\n\t[^\n]+\n"
        assert [True, True] == [
            re.fullmatch(pattern + b"Subject: %d\n\n>From the MDA\n" % n, body) is not None
            for n, body in enumerate(bodies, start=1)
        ]


#: procmail processes appending at the same time, and messages each appends in turn.
_STREAMS = 3
_APPENDS = 15


def _procmail_appends(rcfile: Path, stream: int, errors: list[str]) -> None:
    """Deliver ``_APPENDS`` messages through procmail, one process after the other."""
    for number in range(_APPENDS):
        ident = f"<{stream}.{number}@mta>"
        message = f"Subject: mta {ident}\nMessage-ID: {ident}\n\nFrom body {number}\n"
        result = subprocess.run(
            ["procmail", "-m", "-f", "sender@example.org", str(rcfile)],
            input=message.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode:
            errors.append(f"procmail exit {result.returncode}: {result.stderr!r}")


def _all_streams(rcfile: Path, done: threading.Event, errors: list[str]) -> None:
    """Run ``_STREAMS`` procmail streams at once; set ``done`` when all have finished."""
    try:
        streams = [
            threading.Thread(target=_procmail_appends, args=(rcfile, stream, errors))
            for stream in range(_STREAMS)
        ]
        for thread in streams:
            thread.start()
        for thread in streams:
            thread.join()
    finally:
        done.set()


class TestConcurrentMta:
    """procmail appends (dotlock + kernel lock) while pobox sessions RETR, DELE and QUIT."""

    async def test_every_append_retrieved_once(self, tmp_path: Path) -> None:
        """Each appended message is retrieved exactly once; no deleted one comes back."""
        if shutil.which("procmail") is None:
            pytest.fail("procmail is not installed: apt install procmail (scripts/install-deps)")
        spool = tmp_path / "spool"
        spool.mkdir()
        rcfile = tmp_path / "procmailrc"
        # LOCKSLEEP: procmail's pause before it tries a held dotlock again (8 s by default).
        rcfile.write_text(f"LOCKSLEEP=1\nDEFAULT={spool}/alice\n:0:\n{spool}/alice\n")
        done = threading.Event()
        errors: list[str] = []
        seen: list[str] = []
        sessions = 0
        async with running_server(tmp_path, mail_location=f"mbox:{spool}/%u") as srv:
            mta = threading.Thread(target=_all_streams, args=(rcfile, done, errors))
            mta.start()
            try:
                while True:
                    finished = done.is_set()
                    got = await asyncio.to_thread(_retrieve_all_and_delete, srv)
                    sessions += 1
                    seen.extend(got)
                    if finished and not got:
                        break
            finally:
                mta.join()
        expected = sorted(
            f"<{stream}.{number}@mta>" for stream in range(_STREAMS) for number in range(_APPENDS)
        )
        assert ([], expected) == (errors, sorted(seen))
        assert sessions > 1


def _retrieve_all_and_delete(srv: RunningServer) -> list[str]:
    """One session: RETR every message and DELE it, then QUIT; return their Message-IDs."""
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    client.user("alice")
    client.pass_("secret")
    count, _ = client.stat()
    ids = []
    for number in range(1, count + 1):
        _, lines, _ = client.retr(number)
        found = [re.match(rb"Message-ID: (\S+)", line) for line in lines]
        ids.extend(match.group(1).decode() for match in found if match)
        client.dele(number)
    client.quit()
    return ids
