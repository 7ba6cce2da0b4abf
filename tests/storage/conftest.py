"""Fixtures of the storage tests: every backend behind one small harness.

A :class:`Backend` couples a store with a way to deliver mail into it the way that backend
receives mail in production: :meth:`MemoryStore.add` for memory, files written by an MTA
for Maildir. The Maildir variants differ only in how the files look (size fields in the name
or not, moved to ``cur/`` with flags or not) and whether the index is used; every one of them
must pass the whole contract suite, and so must the Maildir store reached through the storage
helper (``maildir-helper``: mode 3 of ``pobox serve``, run as root with a real other user).
For PostgreSQL, another store (another "node", on a thread and connections of its own)
appends rows to the test database of the throwaway cluster; ``postgresql-retention`` keeps
deleted mail (``pop3_delete_retention``) and runs the contract's classes that delete or count
(``DELETING``), besides the retention contract.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pobox.config import build_config
from pobox.storage.base import MaildropStore, MailUser
from pobox.storage.maildir import MaildirStore
from pobox.storage.mbox import MboxStore
from pobox.storage.memory import MemoryStore
from pobox.storage.postgres import PostgresStore
from pobox.storage.privsep import OwnerPolicy, StorageHelper
from tests.helpers.accounts import ALICE, chown_tree, system_user
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import User, deliver, incoming
from tests.helpers.mbox import append
from tests.helpers.postgres import StoreThread


@dataclass
class Backend:
    """A store under test and how to deliver mail into it."""

    name: str
    store: MaildropStore
    user: Callable[[str], MailUser]
    deliver: Callable[[str, bytes], object]
    closers: list[Callable[[], object]] = field(default_factory=list)
    #: Deliver (user, folder, data) into a folder; returns what ``move`` takes.
    deliver_folder: Callable[[str, str, bytes], Awaitable[object]] | None = None
    #: Move (user, what deliver_folder or move returned, folder) as an IMAP client's MOVE;
    #: returns what names the message now.
    move: Callable[[str, object, str], Awaitable[object]] | None = None


def _memory(tmp_path: Path) -> Backend:
    """Return the memory backend (``tmp_path`` is unused)."""
    store = MemoryStore()

    async def deliver_folder(name: str, folder: str, data: bytes) -> object:
        return await store.deliver_to_folder(User(name), incoming(data), folder)

    async def move(name: str, key: object, folder: str) -> object:
        store.move(name, str(key), folder)
        return key

    return Backend("memory", store, User, store.add, deliver_folder=deliver_folder, move=move)


def _maildir(
    tmp_path: Path,
    name: str,
    *,
    fields: str,
    flags: str | None,
    index: bool,
    inline_read_max: int = 128 * 1024,
    retention: int = 0,
) -> Backend:
    """Return a Maildir backend with homes under ``tmp_path`` and mail in ``~/Maildir``."""
    store = MaildirStore(
        "maildir:~/Maildir", index=index, inline_read_max=inline_read_max, retention=retention
    )

    def user(name: str) -> MailUser:
        """Return user ``name``, with a home of their own."""
        return User(name, home=str(tmp_path / "home" / name))

    def deliver_to(name: str, data: bytes) -> None:
        """Deliver as an MTA would, with this variant's file names."""
        deliver(store.maildir_path(user(name)), data, fields=fields, flags=flags)

    def folder_path(name: str, folder: str) -> Path:
        maildir = store.maildir_path(user(name))
        return maildir if folder == "INBOX" else maildir / f".{folder}"

    async def deliver_folder(name: str, folder: str, data: bytes) -> object:
        """Deliver into the Maildir++ folder as an MTA's Sieve ``fileinto`` would."""
        return folder, deliver(folder_path(name, folder), data, fields=fields, flags=flags)

    async def move(name: str, where: object, folder: str) -> object:
        """Move the file into the other folder's ``cur/``, name kept, as Dovecot's MOVE."""
        assert isinstance(where, tuple)
        old, base = where
        source = folder_path(name, old)
        (found,) = [path for sub in ("new", "cur") for path in (source / sub).glob(f"{base}*")]
        target = folder_path(name, folder)
        for sub in ("cur", "new", "tmp"):
            (target / sub).mkdir(parents=True, exist_ok=True)
        os.rename(found, target / "cur" / found.name)
        return folder, base

    return Backend(name, store, user, deliver_to, deliver_folder=deliver_folder, move=move)


def _mbox(tmp_path: Path) -> Backend:
    """Return the mbox backend: spools ``<tmp_path>/spool/<user>``, written as an MTA would."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = MboxStore(f"mbox:~/mail:INBOX={spool}/%u")

    def user(name: str) -> MailUser:
        """Return user ``name``, with a home of their own."""
        return User(name, home=str(tmp_path / "home" / name))

    def deliver_to(name: str, data: bytes) -> None:
        """Append to the spool as an MTA does."""
        append(spool / name, data)

    return Backend("mbox", store, user, deliver_to)


_BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "mbox": _mbox,
    "memory": _memory,
    "maildir": lambda path: _maildir(path, "maildir", fields="SW", flags=None, index=True),
    "maildir-no-sizes": lambda path: _maildir(
        path, "maildir-no-sizes", fields="", flags=None, index=True
    ),
    "maildir-s-only-in-cur": lambda path: _maildir(
        path, "maildir-s-only-in-cur", fields="S", flags="S", index=True
    ),
    "maildir-no-index": lambda path: _maildir(
        path, "maildir-no-index", fields="", flags=None, index=False
    ),
    "maildir-threaded-reads": lambda path: _maildir(
        path, "maildir-threaded-reads", fields="SW", flags=None, index=True, inline_read_max=0
    ),
    # Deleted mail kept a week (pop3_delete_retention = "7d"): the whole contract holds too.
    "maildir-retention": lambda path: _maildir(
        path, "maildir-retention", fields="SW", flags=None, index=True, retention=RETENTION
    ),
    "maildir-no-index-retention": lambda path: _maildir(
        path, "maildir-no-index-retention", fields="", flags=None, index=False, retention=RETENTION
    ),
}

#: The retention of the ``*-retention`` backends: 7 days, in seconds.
RETENTION = 7 * 86400
#: The backends that keep deleted mail (:class:`~pobox.storage.base.DeletedMailRetention`).
#: Memory does not (``pop3_delete_retention`` is a key of the Maildir and PostgreSQL stores).
RETAINING = ("maildir-retention", "maildir-no-index-retention", "postgresql-retention")


@contextlib.asynccontextmanager
async def _maildir_through_helper() -> AsyncIterator[Backend]:
    """Return the Maildir backend reached through the storage helper, as ``pobox serve`` as
    root in mode 3 reaches it: every user's mail owned by an unprivileged system user."""
    owner = system_user(ALICE)
    with searchable_tmpdir() as folder:
        config = build_config(
            {"mail_location": "maildir:~/Maildir", "passwd_file": str(folder / "passwd")}
        )
        helper = await StorageHelper.start(
            config, OwnerPolicy.from_config(config, fallback=None), on_lost=print
        )

        def user(name: str) -> MailUser:
            """Return user ``name``, with a home of their own, owned by ``owner``."""
            home = folder / "home" / name
            if not home.exists():
                home.mkdir(parents=True)
                os.chown(home, owner.uid, owner.gid)
            return User(name, home=str(home), uid=owner.uid, gid=owner.gid)

        def deliver_to(name: str, data: bytes) -> None:
            """Deliver as an MTA running as the owner would."""
            maildir = Path(user(name).home or "") / "Maildir"
            deliver(maildir, data, fields="SW", flags=None)
            chown_tree(maildir, owner)

        def folder_path(name: str, folder: str) -> Path:
            maildir = Path(user(name).home or "") / "Maildir"
            return maildir if folder == "INBOX" else maildir / f".{folder}"

        async def deliver_folder(name: str, folder: str, data: bytes) -> object:
            """Deliver into the Maildir++ folder as an MTA running as the owner would."""
            base = deliver(folder_path(name, folder), data, fields="SW", flags=None)
            chown_tree(folder_path(name, "INBOX"), owner)
            return folder, base

        async def move(name: str, where: object, folder: str) -> object:
            """Move the file into the other folder's ``cur/`` as the owner's IMAP server."""
            assert isinstance(where, tuple)
            old, base = where
            source = folder_path(name, old)
            (found,) = [p for sub in ("new", "cur") for p in (source / sub).glob(f"{base}*")]
            target = folder_path(name, folder)
            for sub in ("cur", "new", "tmp"):
                (target / sub).mkdir(parents=True, exist_ok=True)
            os.rename(found, target / "cur" / found.name)
            chown_tree(folder_path(name, "INBOX"), owner)
            return folder, base

        try:
            yield Backend(
                "maildir-helper",
                helper.store,
                user,
                deliver_to,
                deliver_folder=deliver_folder,
                move=move,
            )
        finally:
            await helper.aclose()


def _postgresql(dsn: str, name: str = "postgresql", *, retention: int = 0) -> Backend:
    """Return the PostgreSQL backend on the emptied test database ``dsn``."""
    store = PostgresStore(dsn, pool_min=1, pool_max=4, timeout=10, retention=retention)
    mta = StoreThread(dsn)

    async def deliver_folder(name: str, folder: str, data: bytes) -> object:
        return await store.deliver_to_folder(User(name), incoming(data), folder)

    async def move(name: str, key: object, folder: str) -> object:
        assert 1 == await store.move_to_folder(User(name), [str(key)], folder)
        return key

    return Backend(
        name,
        store,
        User,
        mta.append,
        closers=[mta.close],
        deliver_folder=deliver_folder,
        move=move,
    )


#: The PostgreSQL backends: the second keeps deleted mail for ``RETENTION`` seconds.
_POSTGRESQL = {"postgresql": 0, "postgresql-retention": RETENTION}
#: The backends of the ``backend`` fixture.
BACKENDS = [*sorted(_BACKENDS), "maildir-helper", "postgresql"]
#: Those and PostgreSQL keeping deleted mail (its UPDATE differs: reading is the same), for
#: ``@pytest.mark.parametrize("backend", DELETING, indirect=True)`` on the classes that delete.
DELETING = [*BACKENDS, "postgresql-retention"]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each storage backend in turn (``maildir-helper`` through the storage helper, as root)."""
    if request.param == "maildir-helper":
        async with _maildir_through_helper() as through_helper:
            yield through_helper
        return
    if request.param in _POSTGRESQL:
        dsn = request.getfixturevalue("pg_dsn")
        made = _postgresql(dsn, request.param, retention=_POSTGRESQL[request.param])
    else:
        factory: Callable[[Path], Backend] = _BACKENDS[request.param]
        made = factory(tmp_path)
    yield made
    await made.store.aclose()
    for close in made.closers:
        close()


@pytest.fixture(params=RETAINING)
async def retaining(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend that keeps deleted mail for ``RETENTION`` seconds."""
    if request.param == "postgresql-retention":
        made = _postgresql(request.getfixturevalue("pg_dsn"), request.param, retention=RETENTION)
    else:
        made = _BACKENDS[request.param](tmp_path)
    yield made
    await made.store.aclose()
    for close in made.closers:
        close()


#: The backends with folders (:class:`~pobox.storage.base.MaildropFolders`); through the
#: storage helper, delivery into a folder is refused (tested apart).
FOLDERED = (
    "memory",
    "maildir",
    "maildir-no-index",
    "maildir-s-only-in-cur",
    "maildir-helper",
    "postgresql",
)


@pytest.fixture(params=FOLDERED)
async def foldered(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend whose maildrops have folders besides the INBOX."""
    if request.param == "maildir-helper":
        async with _maildir_through_helper() as through_helper:
            yield through_helper
        return
    if request.param == "postgresql":
        made = _postgresql(request.getfixturevalue("pg_dsn"))
    else:
        made = _BACKENDS[request.param](tmp_path)
    yield made
    await made.store.aclose()
    for close in made.closers:
        close()


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    """A Maildir store keeping each user's maildir in ``<tmp_path>/<local part>``."""
    return MaildirStore(f"maildir:{tmp_path}/%n")


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    """Alice's maildir in the ``store`` fixture."""
    return tmp_path / "alice"
