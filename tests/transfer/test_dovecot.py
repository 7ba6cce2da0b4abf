"""Import what a real Dovecot served, and export what a real Dovecot then serves, UIDLs intact.

Like ``tests/storage/test_dovecot_uidl.py``: a real Dovecot (``tests/helpers/dovecot.py``),
poplib's UIDL and LIST as the reference. As root (CI), the Maildir Dovecot served belongs to
``nobody``, so the import reads it in a child process running as ``nobody``. Without Dovecot
these tests fail; they do not skip.
"""

from __future__ import annotations

import asyncio
import os
import poplib
from pathlib import Path

import pytest

from pobox.cli import main
from pobox.storage.postgres import PostgresStore
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import User
from tests.storage.test_dovecot_uidl import dovecot_session, fill
from tests.transfer.test_transfer import do_import, served

pytestmark = pytest.mark.external


def config(folder: Path, dsn: str) -> Path:
    """A configuration with mail in PostgreSQL and alice in a passwd-file."""
    (folder / "passwd").write_text("alice:{PLAIN}secret\n")
    path = folder / "pobox.toml"
    path.write_text(
        f'mail_location = "postgresql"\npostgresql_dsn = "{dsn}"\n'
        f'passwd_file = "{folder / "passwd"}"\n'
    )
    return path


def files_of(root: Path) -> list[tuple[str, int]]:
    """Every path below ``root`` with its owner's uid."""
    out = []
    for parent, directories, names in os.walk(root):
        for name in (*directories, *names):
            path = Path(parent) / name
            out.append((str(path.relative_to(root)), path.lstat().st_uid))
    return out


class TestImportFromDovecot:
    """Importing a Maildir Dovecot served keeps Dovecot's UIDLs and sizes."""

    def test_dovecot_uidls_kept(self, pg_dsn: str) -> None:
        """PostgreSQL answers UIDL and LIST exactly as Dovecot did; the Maildir stays the user's."""
        with searchable_tmpdir() as tmp:
            maildir = tmp / "home" / "alice" / "Maildir"
            fill(maildir)
            session = dovecot_session(tmp, maildir)
            owner = maildir.stat().st_uid
            code = main(
                ["import", "--from", f"maildir:{maildir}", "--user", "alice",
                 "-c", str(config(tmp, pg_dsn))]
            )  # fmt: skip
            owners = {uid for _, uid in files_of(maildir)}

            async def listing() -> list[tuple[str, int]]:
                store = PostgresStore(pg_dsn)
                try:
                    return [(uidl, size) for uidl, size, _ in await served(store, User("alice"))]
                finally:
                    await store.aclose()

            found = asyncio.run(listing())
        assert (0, list(zip(session.uidls, session.sizes, strict=True)), {owner}) == (
            code,
            found,
            owners,
        )


def retrieve_all(port: int) -> tuple[list[str], list[int], list[list[bytes]]]:
    """Log in to Dovecot as alice; return UIDLs, LIST sizes and every message's lines."""
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user("alice")
        client.pass_("secret")
        _, uidl_lines, _ = client.uidl()
        _, list_lines, _ = client.list()
        bodies = [client.retr(n + 1)[1] for n in range(len(uidl_lines))]
        client.quit()
    finally:
        client.close()
    return (
        [line.split()[1].decode() for line in uidl_lines],
        [int(line.split()[1]) for line in list_lines],
        bodies,
    )


def lines_of(data: bytes) -> list[bytes]:
    """The lines Dovecot sends for ``data`` (CRLF or LF line ends; a last one is completed).

    An empty message is one empty line: Dovecot ends every message with a line end.
    """
    return data.replace(b"\r\n", b"\n").removesuffix(b"\n").split(b"\n")


class TestExportToDovecot:
    """A Maildir written by pobox export is served by Dovecot with the store's UIDLs."""

    async def test_dovecot_serves_the_same(self, pg_dsn: str) -> None:
        """Dovecot's UIDL, LIST and RETR match the PostgreSQL store for every message."""
        store = PostgresStore(pg_dsn)
        try:
            with searchable_tmpdir() as tmp:
                source = tmp / "source"
                fill(source)
                await do_import(source, store, "alice")
                await store.append(User("alice"), b"Subject: made here\r\n\r\nin PostgreSQL\r\n")
                truth = await served(store, User("alice"))
                target = tmp / "home" / "alice" / "Maildir"
                code = await asyncio.to_thread(
                    main,
                    ["export", "--user", "alice", "--to", f"maildir:{target}",
                     "-c", str(config(tmp, pg_dsn))],
                )  # fmt: skip
                with running_dovecot(tmp, users={"alice": "secret"}) as dovecot:
                    uidls, sizes, bodies = await asyncio.to_thread(retrieve_all, dovecot.port)
        finally:
            await store.aclose()
        assert (
            0,
            [uidl for uidl, _, _ in truth],
            [size for _, size, _ in truth],
            [lines_of(data) for _, _, data in truth if b"\r" not in data.replace(b"\r\n", b"")],
        ) == (
            code,
            uidls,
            sizes,
            [
                body
                for body, (_, _, data) in zip(bodies, truth, strict=True)
                if b"\r" not in data.replace(b"\r\n", b"")
            ],
        )
