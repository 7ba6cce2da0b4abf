"""pobox answers UIDL and LIST exactly as Dovecot does for the same Maildir.

A real Dovecot (``tests/helpers/dovecot.py``) serves a Maildir filled with every kind of
message file (size fields or not, LF or CRLF, in ``new/`` or in ``cur/`` with flags); poplib
records its UIDL and LIST; Dovecot stops; then :class:`MaildirStore` opens the same Maildir
(importing ``dovecot-uidlist``) and must report the same UIDL and size for every message
number. A pristine copy of the Maildir, taken before Dovecot touched it, checks pobox's own
size computation and UID numbering. Without Dovecot these tests fail; they do not skip.
"""

from __future__ import annotations

import poplib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pobox.storage.maildir import MaildirStore
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import User, deliver

pytestmark = pytest.mark.external

ALICE = User("alice")


@dataclass(frozen=True)
class Session:
    """What Dovecot answered, and the Maildirs to give pobox."""

    uidls: list[str]
    sizes: list[int]
    maildir: Path
    pristine: Path


def fill(maildir: Path) -> None:
    """Deliver one message of every kind a Maildir holds."""
    lf = b"Subject: lf\n\nbody\n"
    crlf = b"Subject: crlf\r\n\r\nbody\r\n"
    deliver(maildir, lf, fields="SW")
    deliver(maildir, lf, fields="S")
    deliver(maildir, crlf, fields="S")
    deliver(maildir, crlf, fields="SW")
    deliver(maildir, b"Subject: plain\n\nno size fields\n", fields="")
    deliver(maildir, b"Subject: end\n\nno final newline", fields="")
    deliver(maildir, b"", fields="")
    deliver(maildir, b"Subject: cr\r\n\r\nbare\rcarriage return\n", fields="")
    deliver(maildir, b"Subject: \xe9t\xe9\n\n\xff\xfe 8-bit\n.dot line\n", fields="S")
    deliver(maildir, lf, fields="")  # a second copy of the same content
    deliver(maildir, b"Subject: big\n\n" + b"0123456789" * 7 + b"\n" * 3000, fields="")
    deliver(maildir, b"Subject: seen\n\nread already\n", fields="SW", flags="S")
    deliver(maildir, b"Subject: replied\r\n\r\nanswered\r\n", fields="", flags="RS")
    deliver(maildir, b"Subject: flagged\n\nno sizes, in cur\n", fields="S", flags="")


def dovecot_session(tmp: Path, maildir: Path) -> Session:
    """Keep a pristine copy of ``maildir``, then let Dovecot serve it and record UIDL and LIST."""
    pristine = tmp / "pristine"
    shutil.copytree(maildir, pristine)
    with running_dovecot(tmp, users={"alice": "secret"}) as dovecot:
        client = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        _, uidl_lines, _ = client.uidl()
        _, list_lines, _ = client.list()
        client.quit()
        dovecot.wait_for_log("Logged out")
    numbers = [int(line.split()[0]) for line in uidl_lines]
    assert list(range(1, len(numbers) + 1)) == numbers
    return Session(
        uidls=[line.split()[1].decode() for line in uidl_lines],
        sizes=[int(line.split()[1]) for line in list_lines],
        maildir=maildir,
        pristine=pristine,
    )


@pytest.fixture(scope="module")
def fresh() -> Iterator[Session]:
    """Dovecot serving a Maildir it has never seen: it numbers the messages itself."""
    with searchable_tmpdir() as tmp:
        maildir = tmp / "home" / "alice" / "Maildir"
        fill(maildir)
        yield dovecot_session(tmp, maildir)


@pytest.fixture(scope="module")
def migrated() -> Iterator[Session]:
    """Dovecot serving a Maildir whose dovecot-uidlist carries POP3 UIDLs and order numbers."""
    with searchable_tmpdir() as tmp:
        maildir = tmp / "home" / "alice" / "Maildir"
        names = [
            deliver(maildir, f"Subject: {n}\n\nmessage {n}\n".encode(), fields="") for n in range(6)
        ]
        records = [
            f"3 Pfrom-old-server-3 O2 :{names[0]}",
            f"4 P :{names[1]}",
            f"5 :{names[2]}",
            f"7 O1 W999 :{names[3]}",
            f"8 Pfrom-old-server-8 :{names[4]}",
        ]
        uidlist = (
            "3 V1600000000 N20 G0123456789abcdef0123456789abcdef\n" + "\n".join(records) + "\n"
        )
        (maildir / "dovecot-uidlist").write_text(uidlist)
        yield dovecot_session(tmp, maildir)


async def listing(maildir: Path) -> tuple[list[str], list[int]]:
    """Return pobox's UIDLs and sizes for ``maildir``, by message number.

    The maildir belongs to the user Dovecot ran as (``nobody`` when the tests run as root):
    pobox reads it as that owner's.
    """
    store = MaildirStore(f"maildir:{maildir}", owner=maildir.stat().st_uid)
    maildrop = await store.open(ALICE)
    try:
        return [info.uidl for info in maildrop.messages], [info.size for info in maildrop.messages]
    finally:
        await maildrop.close()


class TestFreshMaildir:
    """A Maildir Dovecot numbered: pobox takes over its UIDLs and agrees on sizes."""

    async def test_same_uidls(self, fresh: Session) -> None:
        """pobox reports Dovecot's UIDL for every message number."""
        uidls, _ = await listing(fresh.maildir)
        assert fresh.uidls == uidls

    async def test_same_sizes(self, fresh: Session) -> None:
        """pobox reports Dovecot's LIST size for every message number."""
        _, sizes = await listing(fresh.maildir)
        assert fresh.sizes == sizes

    async def test_same_sizes_computed_independently(self, fresh: Session) -> None:
        """Without Dovecot's files, pobox computes the same sizes from the messages themselves."""
        _, sizes = await listing(fresh.pristine)
        assert fresh.sizes == sizes

    async def test_same_numbering_independently(self, fresh: Session) -> None:
        """Without Dovecot's files, pobox gives the messages the same UIDs in the same order."""
        uidls, _ = await listing(fresh.pristine)
        assert [uidl[:8] for uidl in fresh.uidls] == [uidl[:8] for uidl in uidls]


class TestMigratedMaildir:
    """A dovecot-uidlist with POP3 UIDLs (``P``), order numbers (``O``) and sizes (``W``)."""

    async def test_same_uidls_and_order(self, migrated: Session) -> None:
        """pobox lists the messages in Dovecot's order, with Dovecot's UIDLs."""
        uidls, _ = await listing(migrated.maildir)
        assert migrated.uidls == uidls

    async def test_same_sizes(self, migrated: Session) -> None:
        """pobox reports Dovecot's sizes, including one taken from a ``W`` field on trust."""
        _, sizes = await listing(migrated.maildir)
        assert migrated.sizes == sizes
