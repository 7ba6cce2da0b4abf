"""pobox import / export: UIDLs, sizes and bytes kept both ways, re-runs that double nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pobox.cli import main
from pobox.storage.base import ImportedMessage, MaildropStore, MailUser, StoragePermanentError
from pobox.storage.maildir import MaildirStore
from pobox.storage.postgres import PostgresStore
from pobox.transfer import (
    MaildirSource,
    TransferError,
    export_maildir,
    import_messages,
    known_uidls,
    purge_maildrop,
)
from tests.helpers.maildir import User, deliver, incoming
from tests.storage.test_dovecot_uidl import fill

#: What a maildrop serves: (UIDL, LIST size, stored bytes) by message number.
Served = list[tuple[str, int, bytes]]


async def served(store: MaildropStore, user: MailUser) -> Served:
    """Return what ``store`` serves for ``user``, in message-number order."""
    maildrop = await store.open(user, lock=False)
    try:
        out = []
        for info in maildrop.messages:
            data = b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            out.append((info.uidl, info.size, data))
        return out
    finally:
        await maildrop.close()


async def maildir_served(path: Path) -> Served:
    """Return what pobox's Maildir store serves for the Maildir at ``path``."""
    return await served(MaildirStore(f"maildir:{path}"), User("x"))


def migrated(maildir: Path) -> None:
    """A Maildir with every kind of file, and a dovecot-uidlist with UIDLs of an old server."""
    fill(maildir)
    names = sorted(p.name.partition(":")[0] for p in (maildir / "new").iterdir())
    (maildir / "dovecot-uidlist").write_text(
        "3 V1600000000 N40 G0123456789abcdef0123456789abcdef\n"
        f"3 Pfrom-old-server-3 O2 :{names[0]}\n"
        f"4 P :{names[1]}\n"
        f"7 O1 W999 :{names[2]}\n"
        f"8 Pfrom-old-server-8 :{names[3]}\n"
    )


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """The PostgreSQL store on the emptied test database."""
    store = PostgresStore(pg_dsn, pool_min=1, pool_max=4, timeout=10)
    yield store
    await store.aclose()


async def do_import(path: Path, store: PostgresStore, name: str) -> tuple[int, int]:
    """Import ``path`` into ``name``'s maildrop; return (copied, already there)."""
    user = User(name)
    known = await known_uidls(store, user)
    report = await import_messages(MaildirSource(path, name), store, user, known=known)
    return report.copied, report.present


class TestRoundTrip:
    """Maildir → PostgreSQL → Maildir → PostgreSQL keeps every UIDL, size and byte."""

    async def test_round_trip(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Every hop serves exactly what the original Maildir served."""
        source = tmp_path / "source"
        migrated(source)
        truth = await maildir_served(source)
        imported = await do_import(source, pg, "alice")
        in_pg = await served(pg, User("alice"))
        report = await export_maildir(pg, User("alice"), tmp_path / "out")
        out = await maildir_served(tmp_path / "out")
        again = await do_import(tmp_path / "out", pg, "bob")
        assert (
            (len(truth), 0),
            truth,
            len(truth),
            truth,
            (len(truth), 0),
            truth,
        ) == (imported, in_pg, report.copied, out, again, await served(pg, User("bob")))

    async def test_uidls_of_the_old_server_kept(self, pg: PostgresStore, tmp_path: Path) -> None:
        """UIDLs from dovecot-uidlist's P fields and Dovecot's order come through the import."""
        source = tmp_path / "source"
        migrated(source)
        await do_import(source, pg, "alice")
        uidls = [uidl for uidl, _, _ in await served(pg, User("alice"))]
        listing = await served(pg, User("alice"))
        # O1 (and W999, taken on trust) first, then O2 with its P, then by UID.
        assert (999, "from-old-server-3", ["from-old-server-3", "from-old-server-8"]) == (
            listing[0][1],
            listing[1][0],
            [u for u in uidls if u.startswith("from-old")],
        )

    async def test_import_again_doubles_nothing(self, pg: PostgresStore, tmp_path: Path) -> None:
        """A second import copies nothing; a message added since is the only one copied."""
        source = tmp_path / "source"
        fill(source)
        first = await do_import(source, pg, "alice")
        second = await do_import(source, pg, "alice")
        deliver(source, b"Subject: late\n\nnew\n")
        third = await do_import(source, pg, "alice")
        assert ((14, 0), (0, 14), (1, 14), 15) == (
            first,
            second,
            third,
            len(await served(pg, User("alice"))),
        )

    async def test_figures_count_the_source(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Mail already in the maildrop from elsewhere is not counted as the source's."""
        await pg.append(User("alice"), b"Subject: delivered before\n\nx\n")
        source = tmp_path / "source"
        fill(source)
        user = User("alice")
        report = await import_messages(
            MaildirSource(source, "alice"), pg, user, known=await known_uidls(pg, user)
        )
        assert (14, 14, 0) == (report.total, report.copied, report.present)

    async def test_counters_kept(self, pg: PostgresStore, pg_dsn: str, tmp_path: Path) -> None:
        """The maildrop's counters (usage, next UID) account for imported mail."""
        source = tmp_path / "source"
        fill(source)
        await do_import(source, pg, "alice")
        octets = sum(len(data) for _, _, data in await served(pg, User("alice")))
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute(
                "SELECT messages, octets, next_uid FROM pobox.mailbox WHERE mailbox = 'alice'"
            ).fetchone()
        usage = await pg.usage(User("alice"))
        assert ((14, octets, 15), (octets, 14)) == (row, (usage.octets, usage.messages))

    async def test_delivery_after_import(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Mail delivered after an import comes after it, with a UIDL of its own."""
        source = tmp_path / "source"
        fill(source)
        await do_import(source, pg, "alice")
        await pg.append(User("alice"), b"Subject: new\n\nafter\n")
        listing = await served(pg, User("alice"))
        assert (15, b"Subject: new\n\nafter\n", 15) == (
            len(listing),
            listing[-1][2],
            len({uidl for uidl, _, _ in listing}),
        )

    async def test_export_again_keeps_uids(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Exporting twice writes no file twice and keeps the UID list; new mail is added."""
        for n in range(3):
            await pg.append(User("alice"), f"Subject: {n}\n\nx\n".encode())
        await export_maildir(pg, User("alice"), tmp_path / "out")
        uidlist = (tmp_path / "out" / "dovecot-uidlist").read_text().splitlines()[1:]
        await pg.append(User("alice"), b"Subject: 3\n\nx\n")
        second = await export_maildir(pg, User("alice"), tmp_path / "out")
        lines = (tmp_path / "out" / "dovecot-uidlist").read_text().splitlines()[1:]
        assert ((1, 3), uidlist, 4, await served(pg, User("alice"))) == (
            (second.copied, second.present),
            lines[:3],
            len(os.listdir(tmp_path / "out" / "cur")),
            await maildir_served(tmp_path / "out"),
        )

    async def test_export_into_a_served_maildir(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Exporting next to mail pobox already serves keeps that mail's UIDLs too."""
        out = tmp_path / "out"
        deliver(out, b"Subject: here before\n\nx\n")
        before = await maildir_served(out)  # writes pobox-uidlist
        await pg.append(User("alice"), b"Subject: exported\n\ny\n")
        await export_maildir(pg, User("alice"), out)
        assert before + await served(pg, User("alice")) == await maildir_served(out)

    async def test_leftover_tmp_removed(self, pg: PostgresStore, tmp_path: Path) -> None:
        """A half-written file an interrupted export left in tmp/ is removed by the next run."""
        await pg.append(User("alice"), b"Subject: a\n\nb\n")
        (tmp_path / "out" / "tmp").mkdir(parents=True)
        stale = tmp_path / "out" / "tmp" / f"1.M1P1.pobox-export-{'0' * 32},S=3,W=4:2,"
        stale.write_bytes(b"par")
        await export_maildir(pg, User("alice"), tmp_path / "out")
        assert [] == os.listdir(tmp_path / "out" / "tmp")

    async def test_symlinked_target_refused(self, pg: PostgresStore, tmp_path: Path) -> None:
        """A target whose cur/ is a symlink is refused: nothing is written through it."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "cur").symlink_to(elsewhere)
        await pg.append(User("alice"), b"Subject: a\n\nb\n")
        with pytest.raises(TransferError):
            await export_maildir(pg, User("alice"), tmp_path / "out")
        assert [] == os.listdir(elsewhere)


class TestFolders:
    """A PostgreSQL maildrop with Junk (``pop3_folders``) exports Junk to ``.Junk``."""

    async def test_junk_exported_to_a_maildirplusplus_folder(
        self, pg: PostgresStore, tmp_path: Path
    ) -> None:
        """INBOX to the target, Junk to ``target/.Junk``, each with its UIDL and size."""
        alice = User("alice")
        await pg.deliver(alice, incoming(b"Subject: ham\n\nok\n"))
        await pg.deliver_to_folder(alice, incoming(b"Subject: spam\n\nbuy\n"), "Junk")
        maildrop = await pg.open_folders(alice, ["INBOX", "Junk"], lock=False)
        inbox = [(i.uidl, i.size) for i in maildrop.messages if i.folder == "INBOX"]
        junk = [(i.uidl, i.size) for i in maildrop.messages if i.folder == "Junk"]
        await maildrop.close()
        report = await export_maildir(pg, alice, tmp_path / "out")
        assert (2, 2) == (report.total, report.copied)
        out = await maildir_served(tmp_path / "out")
        out_junk = await maildir_served(tmp_path / "out" / ".Junk")
        assert inbox == [(uidl, size) for uidl, size, _ in out]
        assert junk == [(uidl, size) for uidl, size, _ in out_junk]
        assert [b"Subject: spam\n\nbuy\n"] == [data for *_, data in out_junk]


class TestHostileTarget:
    """Export (run as root) into a Maildir its user controls reads nothing of anyone else's."""

    async def test_hard_linked_index_not_read(self, pg: PostgresStore, tmp_path: Path) -> None:
        """dovecot-uidlist hard-linked to a root-only file: refused, its entries not copied."""
        secret = tmp_path / "secret-uidlist"
        secret.write_text("3 V1 N9\n5 Psecret-uidl :1.M1P1.secret\n")
        secret.chmod(0o600)
        (tmp_path / "out").mkdir()
        os.link(secret, tmp_path / "out" / "dovecot-uidlist")
        await pg.append(User("alice"), b"Subject: a\n\nb\n")
        with pytest.raises(TransferError, match="one name"):
            await export_maildir(pg, User("alice"), tmp_path / "out")
        # Nothing written: the name is still the link, not a new file holding its entries.
        assert os.path.samefile(secret, tmp_path / "out" / "dovecot-uidlist")

    async def test_fifo_index_does_not_hang(self, pg: PostgresStore, tmp_path: Path) -> None:
        """dovecot-uidlist as a FIFO: the export fails at once instead of waiting for a writer."""
        (tmp_path / "out").mkdir()
        fifo = tmp_path / "out" / "dovecot-uidlist"
        os.mkfifo(fifo)
        await pg.append(User("alice"), b"Subject: a\n\nb\n")
        try:
            with pytest.raises(TransferError, match="not a regular file"):
                # A guard only: unfixed, the export waits for a writer that never comes.
                await asyncio.wait_for(export_maildir(pg, User("alice"), tmp_path / "out"), 60)
        finally:
            with contextlib.suppress(OSError):  # free a reader stuck in open()
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


class TestStoreImport:
    """PostgresStore.import_messages is idempotent by UIDL on its own."""

    async def test_same_batch_twice(self, pg: PostgresStore) -> None:
        """A batch given again stores nothing; a UIDL twice in one batch is stored once."""
        batch = [
            ImportedMessage("u1", 9, b"Subject: 1\n\nx\n"),
            ImportedMessage("u2", 9, b"Subject: 2\n\nx\n"),
            ImportedMessage("u1", 9, b"Subject: 1 again\n\nx\n"),
        ]
        first = await pg.import_messages(User("a"), batch)
        second = await pg.import_messages(User("a"), batch)
        assert (2, 0, [("u1", 9, b"Subject: 1\n\nx\n"), ("u2", 9, b"Subject: 2\n\nx\n")]) == (
            first,
            second,
            await served(pg, User("a")),
        )

    @pytest.mark.parametrize("uidl", ["", "has space", "x" * 71, "caf\xe9"])
    async def test_bad_uidl(self, pg: PostgresStore, uidl: str) -> None:
        """A UIDL that is not an RFC 1939 unique-id is refused before anything is stored."""
        with pytest.raises(StoragePermanentError):
            await pg.import_messages(User("a"), [ImportedMessage(uidl, 1, b"x")])
        assert [] == await served(pg, User("a"))


class TestRefusals:
    """What cannot be imported says so."""

    async def test_maildir_store_cannot_keep_uidls(self, tmp_path: Path) -> None:
        """Importing into a Maildir store is refused with a message saying what to do."""
        store = MaildirStore(f"maildir:{tmp_path}/%u")
        source = tmp_path / "source"
        fill(source)
        with pytest.raises(TransferError, match="postgresql"):
            await import_messages(MaildirSource(source, "a"), store, User("a"), known=frozenset())

    async def test_missing_source(self, pg: PostgresStore, tmp_path: Path) -> None:
        """A source that is not a directory is an error, not an empty import."""
        with pytest.raises(TransferError, match="not a directory"):
            await do_import(tmp_path / "nothing", pg, "alice")


class TestPurge:
    """purge_maildrop removes everything, as an UPDATE does."""

    async def test_purge(self, pg: PostgresStore) -> None:
        """Every message goes; the count is returned."""
        for _ in range(3):
            await pg.append(User("a"), b"x\n")
        assert (3, []) == (await purge_maildrop(pg, User("a")), await served(pg, User("a")))


class TestCommands:
    """pobox import and pobox export as commands."""

    def config(self, tmp_path: Path, dsn: str, **more: str) -> Path:
        """A configuration with mail in PostgreSQL."""
        path = tmp_path / "pobox.toml"
        lines = [
            'mail_location = "postgresql"',
            f'postgresql_dsn = "{dsn}"',
            f'passwd_file = "{tmp_path / "passwd"}"',
        ]
        lines += [f"{key} = {value}" for key, value in more.items()]
        path.write_text("\n".join(lines) + "\n")
        (tmp_path / "passwd").write_text("alice:{PLAIN}x\n")
        return path

    def test_import_export(
        self, pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """import then export through the command line; no progress bar without a terminal."""
        config = self.config(tmp_path, pg_dsn)
        source = tmp_path / "source"
        migrated(source)
        codes = (
            main(["import", "--from", f"maildir:{source}", "--user", "alice", "-c", str(config)]),
            main(["export", "--user", "alice", "--to", f"maildir:{tmp_path}/out",
                  "-c", str(config)]),
        )  # fmt: skip
        out, err = capsys.readouterr()
        truth = asyncio.run(maildir_served(source))
        assert ((0, 0), truth, "imported into alice: 14 of 14 messages", "") == (
            codes,
            asyncio.run(maildir_served(tmp_path / "out")),
            out.splitlines()[0].split(" (")[0],
            err,
        )

    def test_bad_arguments(self, pg_dsn: str, tmp_path: Path) -> None:
        """--from that is not maildir:PATH, and a Maildir store, are refused with exit 65."""
        config = self.config(tmp_path, pg_dsn)
        maildir_config = tmp_path / "maildir.toml"
        maildir_config.write_text(f'mail_location = "maildir:{tmp_path}/%u"\n')
        assert (65, 65) == (
            main(["import", "--from", "mbox:/x", "--user", "alice", "-c", str(config)]),
            main(["import", "--from", f"maildir:{tmp_path}", "--user", "a",
                  "-c", str(maildir_config)]),
        )  # fmt: skip

    def test_database_down(self, tmp_path: Path) -> None:
        """The database unreachable: exit 75, try again."""
        config = self.config(
            tmp_path, "host=127.0.0.1 port=1 dbname=x user=x", postgresql_timeout="1"
        )
        (tmp_path / "source").mkdir()
        assert (75, 75) == (
            main(["import", "--from", f"maildir:{tmp_path}/source", "--user", "alice",
                  "-c", str(config)]),
            main(["export", "--user", "alice", "--to", f"maildir:{tmp_path}/o", "-c",
                  str(config)]),
        )  # fmt: skip
