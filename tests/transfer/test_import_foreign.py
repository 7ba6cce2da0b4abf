"""``pobox import`` keeps the UIDLs of Courier, of the admin's map and of X-UIDL headers.

A Maildir that pobox never indexed, with a ``courierpop3dsizelist`` in Courier's format (see
``tests/storage/test_maildir_uidl_import.py``), is imported into the throwaway PostgreSQL;
the PostgreSQL maildrop then answers Courier's UIDLs.
"""

from __future__ import annotations

from pathlib import Path

from pobox.storage.postgres import PostgresStore
from pobox.transfer import MaildirSource, import_messages, known_uidls
from tests.helpers.maildir import User, deliver
from tests.storage.test_maildir_uidl_import import UIDV, courier_list
from tests.transfer.test_transfer import pg, served

__all__ = ["pg"]  # the fixture, used by name


async def imported_uidls(path: Path, store: PostgresStore, *, reuse_xuidl: bool) -> list[str]:
    """Import ``path`` into alice's maildrop; return the UIDLs it then answers."""
    user = User("alice")
    known = await known_uidls(store, user)
    source = MaildirSource(path, "alice", reuse_xuidl=reuse_xuidl)
    await import_messages(source, store, user, known=known)
    return [uidl for uidl, _, _ in await served(store, user)]


class TestImportKeepsForeignUidls:
    """The sources of ``_foreign`` reach the PostgreSQL store through ``pobox import``."""

    async def test_courier_map_and_xuidl(self, pg: PostgresStore, tmp_path: Path) -> None:
        """Courier's, the map's and (with the key) X-UIDL's UIDLs are the imported ones."""
        source = tmp_path / "Maildir"
        names = [deliver(source, f"Subject: {n}\n\nbody\n".encode()) for n in range(2)]
        mapped = deliver(source, b"Subject: mapped\n\nbody\n")
        deliver(source, b"X-UIDL: qpopper-77\nSubject: xuidl\n\nbody\n")
        (source / "courierpop3dsizelist").write_text(courier_list(names))
        (source / "pobox-uidl-map").write_text(f"{mapped} from-the-map\n")
        got = await imported_uidls(source, pg, reuse_xuidl=True)
        assert [f"UID1-{UIDV}", f"UID2-{UIDV}", "from-the-map", "qpopper-77"] == got
