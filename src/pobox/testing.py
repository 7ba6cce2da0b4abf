"""Helpers for testing against a real pobox: a server on loopback with real files.

``async with running_server(tmp_path, users={"alice": "secret"}) as srv:`` starts a real
:class:`~pobox.server.Pop3Server` on ``127.0.0.1`` with an ephemeral port, a real
passwd-file and real Maildirs under ``tmp_path``, accessed with the process's own uid (so
``first_valid_uid`` and ``first_valid_gid`` are 0 there: a test suite may run as root);
``srv.deliver("alice", b"...")`` delivers a message into a Maildir with pobox's own
delivery.  Used by pobox's own tests, and by developers who need a real POP3 endpoint in
theirs.

With ``mail_location="postgresql", postgresql_dsn=...`` the server keeps mail in that
database instead; ``srv.deliver`` then stores the message through a store of its own (its
own connections, as another node would) and ``srv.count`` asks the database.

May import: anything in pobox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pobox.auth.passwdfile import add_user
from pobox.cli import build_context, build_store
from pobox.config import Config, Listen, build_config
from pobox.records import User
from pobox.server import Pop3Server
from pobox.storage.base import IncomingMessage, MaildropStore
from pobox.storage.maildir import deliver_message
from pobox.storage.spool import Spool

__all__ = ["RunningServer", "deliver_to_maildir", "running_server"]


def deliver_to_maildir(
    maildir: Path, data: bytes, *, sizes: bool = True, owner: int | None = None
) -> Path:
    """Deliver ``data`` into ``maildir/new`` with pobox's own delivery; return the file's path.

    The message is stored as delivery stores it (LF line endings), through
    :func:`~pobox.storage.maildir.deliver_message`, the one Maildir writer.

    Args:
        sizes: put Dovecot's ``,S=`` and ``,W=`` sizes in the file name (``False`` imitates an
            MTA that does not, so that the server computes the sizes by reading the file).
        owner: the uid the maildir belongs to (default: this process's); as root, the new
            file is given to it.
    """
    with Spool.from_bytes(data) as body:
        name = deliver_message(maildir, IncomingMessage(b"", body), owner=owner, size_fields=sizes)
    return maildir / "new" / name


@dataclass
class RunningServer:
    """A started server and the folder it serves."""

    root: Path
    config: Config
    server: Pop3Server

    @property
    def host(self) -> str:
        """The loopback address the server listens on."""
        return self.server.addresses[0][0]

    @property
    def port(self) -> int:
        """The ephemeral port the server listens on."""
        return self.server.addresses[0][1]

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user``."""
        return self.root / "mail" / user

    @property
    def in_database(self) -> bool:
        """Whether mail is kept in PostgreSQL (else in Maildirs)."""
        return self.config.mail_location == "postgresql"

    def deliver(self, user: str, data: bytes, *, sizes: bool = True) -> Path | None:
        """Deliver ``data`` to ``user``; return the message file's path (``None`` in PostgreSQL).

        Args:
            sizes: Maildir only: put the sizes in the file name (else pobox reads the file).
        """
        if self.in_database:
            self._on_other_node(_append, user, data)
            return None
        return deliver_to_maildir(self.maildir(user), data, sizes=sizes)

    def deliver_to_folder(self, user: str, folder: str, data: bytes) -> None:
        """Deliver ``data`` into ``folder`` of ``user``'s maildrop (Maildir++ ``.<folder>``)."""
        if self.in_database:
            self._on_other_node(functools.partial(_deliver_folder, folder), user, data)
        else:
            deliver_to_maildir(self.maildir(user) / f".{folder}", data)

    def count_folder(self, user: str, folder: str) -> int:
        """Return how many messages ``folder`` of ``user``'s maildrop holds."""
        if self.in_database:
            found = self._on_other_node(functools.partial(_count_folder, folder), user, b"")
            assert isinstance(found, int)
            return found
        path = self.maildir(user) / f".{folder}"
        return sum(
            1 for sub in ("new", "cur") if (path / sub).is_dir() for _ in (path / sub).iterdir()
        )

    def count(self, user: str) -> int:
        """Return how many messages ``user``'s maildrop holds."""
        if self.in_database:
            found = self._on_other_node(_count, user, b"")
            assert isinstance(found, int)
            return found
        folder = self.maildir(user)
        return sum(1 for sub in ("new", "cur") for _ in (folder / sub).iterdir())

    def _on_other_node(self, work: Any, user: str, data: bytes) -> object:  # noqa: ANN401
        """Run ``work(store, user, data)`` with a store of its own, on a thread of its own.

        Tests call this from inside their event loop, which must not block on the server's
        own connections: this store has its own, as a delivery node would.
        """

        async def run() -> object:
            store = build_store(self.config)
            try:
                return await work(store, User(name=user), data)
            finally:
                await store.aclose()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result(60)


async def _append(store: Any, user: User, data: bytes) -> str:  # noqa: ANN401
    key: str = await store.append(user, data)
    return key


async def _deliver_folder(folder: str, store: Any, user: User, data: bytes) -> str:  # noqa: ANN401
    key: str = await store.deliver_to_folder(
        user, IncomingMessage(b"", Spool.from_bytes(data)), folder
    )
    return key


async def _count_folder(folder: str, store: Any, user: User, _data: bytes) -> int:  # noqa: ANN401
    maildrop = await store.open_folders(user, [folder], lock=False)
    try:
        return len(maildrop.messages)
    finally:
        await maildrop.close()


async def _count(store: Any, user: User, _data: bytes) -> int:  # noqa: ANN401
    usage = await store.usage(user)
    return int(usage.messages)


@asynccontextmanager
async def running_server(
    root: Path,
    users: Mapping[str, str] | None = None,
    *,
    scheme: str = "PLAIN",
    store: MaildropStore | None = None,
    **settings: Any,  # noqa: ANN401 - any config key
) -> AsyncIterator[RunningServer]:
    """Run a pobox server on ``127.0.0.1:0`` serving files under ``root``.

    Args:
        users: login name → password (default ``{"alice": "secret"}``).
        scheme: password scheme of the passwd-file entries (PLAIN keeps tests fast).
        store: the store to serve (default: the one the configuration names).
        settings: config keys to override (``idle_timeout=1``, ``trace=True``, ...).
    """
    root.mkdir(parents=True, exist_ok=True)
    passwd = root / "passwd"
    for name, password in (users if users is not None else {"alice": "secret"}).items():
        add_user(passwd, name, password.encode(), scheme=scheme)
        (root / "mail" / name).mkdir(parents=True, exist_ok=True)
    base = Config(
        listen=(Listen("127.0.0.1", 0),),
        mail_location=f"maildir:{root}/mail/%u",
        passwd_file=str(passwd),
        auth_failure_delay=0.0,
        # The server runs in this process and accesses mail as it: as root in CI, which only
        # an explicit first_valid_uid/gid of 0 allows (never do that in production).
        first_valid_uid=0,
        first_valid_gid=0,
    )
    config = build_config(settings, base=base)
    config = dataclasses.replace(config, warnings=())
    server = Pop3Server(build_context(config, store=store))
    await server.start()
    try:
        yield RunningServer(root, config, server)
    finally:
        await server.aclose()
