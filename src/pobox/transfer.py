"""Moving maildrops in and out: ``pobox import`` from a Maildir, ``pobox export`` to one.

**Import** (:func:`import_messages`) reads a Maildir with pobox's own Maildir store
(:class:`~pobox.storage.maildir.MaildirStore`), so each message gets exactly the UIDL and size
pobox would answer for that Maildir, which are Dovecot's when Dovecot served it (its
``dovecot-uidlist`` is imported with the ``P`` and ``W`` fields), and stores them with
:meth:`~pobox.storage.base.MaildropImporter.import_messages`, which keeps both. Batches of
messages commit one at a time; a message whose UIDL the maildrop already has is skipped, so a
run that was interrupted (even by ``kill -9``) is simply run again: nothing is doubled, nothing
lost. The Maildir is read with the rights of its owner (:class:`ForkedMaildirSource`): run as
root, the reading happens in a child process that switched to the owner of the Maildir, so a
user's Maildir never gets files only root can read, and root never follows a link the user
planted.

**Export** (:func:`export_maildir`) writes each message of the configured store to
``cur/`` (through ``tmp/``, synced before it is renamed into place), named
``<time>.M<n>P<pid>.pobox-export-<id>,S=<octets>,W=<wire size>:2,`` where ``<id>`` is derived
from the UIDL, then writes ``dovecot-uidlist`` with every message's UID, ``W`` (the wire size)
and ``P`` (the UIDL); a PostgreSQL maildrop's other folders (``pop3_folders``) go to Maildir++
folders ``.<folder>`` of the target, the same way. Dovecot answers UIDL from ``P`` and LIST
from ``W``; pobox imports the same file. A run that was interrupted is run again: the
messages already written are recognised by name and kept, the rest are written, and the UID
list is written last, always whole. UIDs already in the target's UID list (an earlier
export, or mail Dovecot or pobox already served there) are kept. Run as root, what is
written belongs to the user's ``uid``/``gid`` (or the owner of the nearest existing
directory above the target).

May import: anything in pobox but the shell (:mod:`pobox.server`, :mod:`pobox.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from pobox.errors import PoboxError
from pobox.records import User
from pobox.storage.base import (
    INBOX,
    DeletedMailRetention,
    ImportedMessage,
    Maildrop,
    MaildropFolders,
    MaildropImporter,
    MaildropStore,
    MailUser,
    MessageGone,
    MessageInfo,
)
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._index import (
    DOVECOT_UIDLIST_NAME,
    INDEX_MAX,
    INDEX_NAME,
    IndexEntry,
    UidList,
    format_pobox_uidlist,
    parse_dovecot_uidlist,
    parse_pobox_uidlist,
)
from pobox.storage.maildir._names import base_name

__all__ = [
    "BATCH_MESSAGES",
    "BATCH_OCTETS",
    "ForkedMaildirSource",
    "MaildirSource",
    "Progress",
    "TransferError",
    "TransferReport",
    "export_maildir",
    "import_messages",
    "maildir_owner",
    "purge_maildrop",
]

#: Messages per import transaction, and octets: a batch commits (and is skipped on a re-run)
#: as a whole.
BATCH_MESSAGES = 200
BATCH_OCTETS = 16 * 1024 * 1024
#: What marks a file written by ``pobox export``, and the UIDL digest after it.
_EXPORTED = re.compile(r"\.pobox-export-([0-9a-f]{32})(?:,|$)")
#: Message files an export writes (and syncs) at the same time.
WRITERS = 8
#: Mode of the directories and files written (a maildir is private to its user).
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class TransferError(PoboxError):
    """An import or export cannot go on (the reason is in the message)."""


@dataclass
class TransferReport:
    """What an import or export did.

    Attributes:
        total: messages in the source.
        copied: messages copied by this run.
        present: messages already in the target (an earlier run, or the same UIDL).
        gone: messages that vanished from the source while being copied.
        octets: octets copied by this run.
        seconds: how long the run took.
    """

    total: int = 0
    copied: int = 0
    present: int = 0
    gone: int = 0
    octets: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self, verb: str) -> str:
        """Return one line for the terminal: counts, octets and speed."""
        rate = self.copied / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"{verb} {self.copied} of {self.total} messages ({self.octets} octets) in "
            f"{self.seconds:.1f} s ({rate:.0f} messages/s); {self.present} already there"
        )
        if self.gone:
            line += f"; {self.gone} vanished from the source meanwhile"
        return line


class Progress(Protocol):
    """Where progress goes (a rich progress bar on a terminal, nothing otherwise)."""

    def start(self, total: int) -> None:
        """Say how many messages there are to copy."""

    def advance(self, messages: int) -> None:
        """Say that ``messages`` more were copied."""


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, messages: int) -> None:
        pass


async def purge_maildrop(store: MaildropStore, user: MailUser, *, rounds: int = 5) -> int:
    """Remove every message of ``user``'s maildrop, under its session lock; return how many.

    As an UPDATE does (one :meth:`~pobox.storage.base.Maildrop.delete`), again while mail
    delivered meanwhile shows up, at most ``rounds`` times. A store that keeps deleted mail
    (``pop3_delete_retention``) then drops all it kept for ``user`` too, this purge's included:
    nothing is left to restore (nor to hold disk) for a user who is gone.

    Raises:
        MaildropLocked: a POP3 session holds the maildrop.
        StorageError: the store failed.
    """
    removed = 0
    for _ in range(rounds):
        maildrop = await store.open(user, lock=True)
        try:
            keys = [message.key for message in maildrop.messages]
            if not keys:
                break
            result = await maildrop.delete(keys)
            removed += len(result.removed)
        finally:
            await maildrop.close()
    if isinstance(store, DeletedMailRetention):
        await store.purge_deleted(user, now=_PAST_EVERY_RETENTION)
    return removed


#: A clock reading (Unix seconds, about the year 36800) past any retention: with it,
#: :meth:`~pobox.storage.base.DeletedMailRetention.purge_deleted` drops everything kept.
_PAST_EVERY_RETENTION = 2**40


# --------------------------------------------------------------------------- import


def _location(path: Path) -> str:
    """Return a mail location naming exactly ``path`` (``%`` doubled, absolute)."""
    return "maildir:" + str(path.resolve()).replace("%", "%%")


class MaildirSource:
    """The messages of a Maildir as pobox serves them, read in this process."""

    def __init__(self, path: Path, name: str, *, reuse_xuidl: bool = False) -> None:
        """Read the Maildir at ``path`` for user ``name``.

        Args:
            reuse_xuidl: keep ``X-UIDL:`` headers as UIDLs (``pop3_reuse_xuidl``), when
                pobox has not indexed the Maildir yet.
        """
        self._store = MaildirStore(_location(path), reuse_xuidl=reuse_xuidl)
        self._user = User(name=name)
        self._path = path

    async def read(
        self, known: frozenset[str]
    ) -> AsyncIterator[ImportedMessage | tuple[int, int] | str]:
        """Yield ``(messages, messages whose UIDL is not in known)``, then the latter.

        A message that vanished while being read is yielded as its UIDL (a ``str``).

        Raises:
            StorageError: the Maildir cannot be opened (locked by a pobox session, unreadable).
        """
        if not self._path.is_dir():
            msg = f"{self._path} is not a directory"
            raise TransferError(msg)
        maildrop = await self._store.open(self._user, lock=True)
        try:
            todo = [info for info in maildrop.messages if info.uidl not in known]
            yield len(maildrop.messages), len(todo)
            for info in todo:
                try:
                    data = b"".join([chunk async for chunk in maildrop.read_message(info.key)])
                except MessageGone:
                    yield info.uidl
                    continue
                yield ImportedMessage(uidl=info.uidl, size=info.size, data=data)
        finally:
            await maildrop.close()


def maildir_owner(path: Path) -> tuple[int, int] | None:
    """Return the uid and gid to read ``path`` with: its owner's, if we are root and it is not.

    ``None``: read it as we are.
    """
    if os.geteuid() != 0:
        return None
    info = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        msg = f"{path} is not a directory"
        raise TransferError(msg)
    if info.st_uid == 0:
        return None
    return info.st_uid, info.st_gid


class ForkedMaildirSource:
    """The messages of a Maildir, read by a child process with the rights of its owner.

    :meth:`start` forks; call it before any thread or event loop exists (``pobox import``
    does, first thing). The child switches to ``owner`` (groups, gid, uid), reads the Maildir
    with :class:`MaildirSource`, and writes records to a pipe:

    - ``N <count> <new>\\n``: messages in the Maildir, and those to come;
    - ``M <uidl> <size> <length>\\n`` and ``<length>`` octets: a message;
    - ``G <uidl>\\n``: a message that vanished; ``E <text>\\n``: an error; ``D\\n``: done.
    """

    def __init__(
        self, path: Path, name: str, owner: tuple[int, int], *, reuse_xuidl: bool = False
    ) -> None:
        self._path = path
        self._name = name
        self._owner = owner
        self._reuse_xuidl = reuse_xuidl
        self._pid = 0
        self._pipe: BinaryIO | None = None

    def start(self, known: frozenset[str]) -> None:
        """Fork the reader for the messages whose UIDL is not in ``known``."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage ends in os._exit
            os.close(read_end)
            code = 0
            with os.fdopen(write_end, "wb") as out:
                try:
                    os.setgroups([])
                    os.setgid(self._owner[1])
                    os.setuid(self._owner[0])
                    asyncio.run(self._pump(out, known))
                except BaseException as exc:
                    code = 1
                    with contextlib.suppress(OSError):
                        out.write(b"E " + _one_line(str(exc) or type(exc).__name__) + b"\n")
            os._exit(code)
        os.close(write_end)
        self._pid = pid
        self._pipe = os.fdopen(read_end, "rb")

    async def _pump(self, out: BinaryIO, known: frozenset[str]) -> None:  # pragma: no cover
        source = MaildirSource(self._path, self._name, reuse_xuidl=self._reuse_xuidl)
        async for item in source.read(known):
            if isinstance(item, tuple):
                out.write(b"N %d %d\n" % item)
            elif isinstance(item, str):
                out.write(b"G " + item.encode() + b"\n")
            else:
                out.write(b"M %s %d %d\n" % (item.uidl.encode(), item.size, len(item.data)))
                out.write(item.data)
        out.write(b"D\n")

    async def read(
        self, known: frozenset[str]
    ) -> AsyncIterator[ImportedMessage | tuple[int, int] | str]:
        """Yield what the child read (as :meth:`MaildirSource.read` does).

        Raises:
            TransferError: the child failed, or its output is not what it writes.
        """
        del known  # the child was told at start()
        pipe = self._pipe
        if pipe is None:
            msg = "the Maildir reader was not started"
            raise TransferError(msg)
        try:
            while True:
                line = await asyncio.to_thread(pipe.readline)
                kind, _, rest = line.rstrip(b"\n").partition(b" ")
                if kind == b"N":
                    total, new = rest.split(b" ")
                    yield int(total), int(new)
                elif kind == b"G":
                    yield rest.decode()
                elif kind == b"M":
                    uidl, size, length = rest.split(b" ")
                    data = await asyncio.to_thread(pipe.read, int(length))
                    if len(data) != int(length):
                        msg = "the Maildir reader stopped in the middle of a message"
                        raise TransferError(msg)
                    yield ImportedMessage(uidl=uidl.decode(), size=int(size), data=data)
                elif kind == b"D":
                    return
                elif kind == b"E":
                    raise TransferError(rest.decode(errors="replace"))
                else:
                    msg = "the Maildir reader ended unexpectedly"
                    raise TransferError(msg)
        finally:
            self.close()

    def close(self) -> None:
        """Close the pipe and reap the child (ending it if it still runs)."""
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._pid:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(self._pid, os.WNOHANG)
                if not done:
                    os.kill(self._pid, 9)
                    os.waitpid(self._pid, 0)
            self._pid = 0


def _one_line(text: str) -> bytes:
    return text.replace("\r", " ").replace("\n", " ").encode(errors="replace")


class _Source(Protocol):
    def read(
        self, known: frozenset[str]
    ) -> AsyncIterator[ImportedMessage | tuple[int, int] | str]: ...


async def known_uidls(store: MaildropStore, user: MailUser) -> frozenset[str]:
    """Return the UIDLs ``user``'s maildrop already has (read without the session lock)."""
    maildrop = await store.open(user, lock=False)
    try:
        return frozenset(info.uidl for info in maildrop.messages)
    finally:
        await maildrop.close()


async def import_messages(
    source: _Source,
    store: MaildropStore,
    user: MailUser,
    *,
    known: frozenset[str],
    progress: Progress | None = None,
    batch_messages: int = BATCH_MESSAGES,
    batch_octets: int = BATCH_OCTETS,
) -> TransferReport:
    """Copy the messages of ``source`` into ``user``'s maildrop, keeping UIDLs and sizes.

    Args:
        source: a :class:`MaildirSource` or a started :class:`ForkedMaildirSource`.
        store: the configured store; it must be a
            :class:`~pobox.storage.base.MaildropImporter`.
        known: the UIDLs the maildrop has (:func:`known_uidls`), skipped without reading.

    Raises:
        TransferError: the store cannot keep UIDLs, or the source failed.
        StorageError: the store failed (what was committed stays; run again).
    """
    if not isinstance(store, MaildropImporter):
        msg = (
            "pobox import needs a store that keeps the UIDLs it is given "
            '(mail_location = "postgresql"); a Maildir is moved by copying it with its '
            "dovecot-uidlist or pobox-uidlist"
        )
        raise TransferError(msg)
    progress = progress or _NoProgress()
    report = TransferReport()
    began = time.monotonic()
    batch: list[ImportedMessage] = []

    async def flush() -> None:
        if not batch:
            return
        stored = await store.import_messages(user, batch)
        report.copied += stored
        report.present += len(batch) - stored
        report.octets += sum(len(message.data) for message in batch)
        progress.advance(len(batch))
        batch.clear()

    async for item in source.read(known):
        if isinstance(item, tuple):
            report.total, new = item
            report.present = report.total - new
            progress.start(new)
        elif isinstance(item, str):
            report.gone += 1
            progress.advance(1)
        else:
            batch.append(item)
            if len(batch) >= batch_messages or sum(len(m.data) for m in batch) >= batch_octets:
                await flush()
    await flush()
    report.seconds = time.monotonic() - began
    return report


# --------------------------------------------------------------------------- export


def _export_id(uidl: str) -> str:
    return hashlib.sha256(uidl.encode()).hexdigest()[:32]


def _owner_for(target: Path, user: MailUser) -> tuple[int, int] | None:
    """Return who should own what export writes: ``None`` unless we are root."""
    if os.geteuid() != 0:
        return None
    if user.uid is not None and user.gid is not None:
        return user.uid, user.gid
    for directory in (target, *target.parents):
        with contextlib.suppress(FileNotFoundError):
            info = directory.stat()
            return info.st_uid, info.st_gid
    return None  # pragma: no cover - "/" exists


class _MaildirWriter:
    """A Maildir opened for writing, every name relative to a directory opened without links."""

    def __init__(self, target: Path, owner: tuple[int, int] | None) -> None:
        self._owner = owner
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._root = self._directory(parent, target.name)
        finally:
            os.close(parent)
        self._dirs = {name: self._directory(self._root, name) for name in ("cur", "new", "tmp")}

    def _directory(self, parent: int, name: str) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, _DIR_MODE, dir_fd=parent)
            if self._owner is not None:
                os.chown(name, *self._owner, dir_fd=parent, follow_symlinks=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            msg = f"cannot open the directory {name!r} of the target: {exc.strerror}"
            raise TransferError(msg) from exc
        return fd

    def exported(self) -> dict[str, str]:
        """Return export id → file name of the messages a previous run wrote.

        What an interrupted run left half-written in ``tmp/`` is removed.
        """
        for name in os.listdir(self._dirs["tmp"]):
            if _EXPORTED.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._dirs["tmp"])
        found: dict[str, str] = {}
        for sub in ("new", "cur"):
            for name in os.listdir(self._dirs[sub]):
                match = _EXPORTED.search(base_name(name))
                if match:
                    found.setdefault(match[1], name)
        return found

    def _create(self, directory: int, name: str, data: bytes) -> None:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            _FILE_MODE,
            dir_fd=directory,
        )
        try:
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_message(self, name: str, data: bytes) -> None:
        """Write ``cur/<name>`` through ``tmp/``, synced before the rename."""
        self._create(self._dirs["tmp"], name, data)
        os.rename(name, name, src_dir_fd=self._dirs["tmp"], dst_dir_fd=self._dirs["cur"])

    def read_index(self, name: str) -> str | None:
        """Return the text of an index file in the Maildir, if there is one.

        The target may be a user's Maildir, and this process root: a FIFO must not hang it,
        a huge file not fill its memory, and a hard link to a file of root's or of another
        user's must not be read (its entries would be written back, the user's).
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=self._root)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(file.fileno())
            owner = None if self._owner is None else self._owner[0]
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_nlink != 1
                or (owner is not None and st.st_uid != owner)
                or st.st_size > INDEX_MAX
            ):
                msg = (
                    f"{name} in the target is not a regular file of its owner with one name "
                    f"and at most {INDEX_MAX} octets"
                )
                raise TransferError(msg)
            return file.read(INDEX_MAX).decode("utf-8", "surrogateescape")

    def replace(self, name: str, text: str) -> None:
        """Replace an index file atomically (temporary file, fsync, rename, fsync dir)."""
        temporary = f".{name}.pobox-export-{secrets.token_hex(4)}"
        self._create(self._root, temporary, text.encode("utf-8", "surrogateescape"))
        os.rename(temporary, name, src_dir_fd=self._root, dst_dir_fd=self._root)
        for fd in (*self._dirs.values(), self._root):
            os.fsync(fd)

    def close(self) -> None:
        for fd in (*self._dirs.values(), self._root):
            with contextlib.suppress(OSError):
                os.close(fd)


def _dovecot_uidlist(uidlist: UidList, names: dict[str, str]) -> str:
    """Return ``dovecot-uidlist`` (version 3) for ``uidlist``; ``names``: base → file name."""
    lines = [f"3 V{uidlist.uidvalidity} N{uidlist.next_uid} G{secrets.token_hex(16)}\n"]
    for base, entry in sorted(uidlist.entries.items(), key=lambda item: item[1].uid):
        fields = [str(entry.uid)]
        if entry.size is not None:
            fields.append(f"W{entry.size}")
        if entry.uidl is not None:
            fields.append(f"P{entry.uidl}")
        if entry.order is not None:
            fields.append(f"O{entry.order}")
        lines.append(" ".join(fields) + f" :{names.get(base, base)}\n")
    return "".join(lines)


async def export_maildir(
    store: MaildropStore,
    user: MailUser,
    target: Path,
    *,
    progress: Progress | None = None,
) -> TransferReport:
    """Write ``user``'s maildrop to the Maildir ``target`` with its UIDLs (see the module doc).

    A store that lists a maildrop's folders (:class:`FolderNames`: PostgreSQL) has each folder
    other than the INBOX written to the Maildir++ folder ``target/.<folder>``, the same way.

    Raises:
        TransferError: the target cannot be written as needed.
        StorageError: the store failed (run again: what was written is kept).
    """
    progress = progress or _NoProgress()
    report = TransferReport()
    began = time.monotonic()
    await _export_one(await store.open(user, lock=False), user, target, report, progress)
    if isinstance(store, FolderNames) and isinstance(store, MaildropFolders):
        for folder in await store.folder_names(user):
            if folder != INBOX:
                maildrop = await store.open_folders(user, [folder], lock=False)
                await _export_one(maildrop, user, target / f".{folder}", report, progress)
    report.seconds = time.monotonic() - began
    return report


@runtime_checkable
class FolderNames(Protocol):
    """A store that tells which folders a maildrop has messages in (PostgreSQL)."""

    async def folder_names(self, user: MailUser) -> tuple[str, ...]:
        """Return the folders of ``user``'s maildrop that hold messages."""


async def _export_one(
    maildrop: Maildrop,
    user: MailUser,
    target: Path,
    report: TransferReport,
    progress: Progress,
) -> None:
    """Write the messages of one open ``maildrop`` to the Maildir ``target``; close it."""
    try:
        writer = await asyncio.to_thread(_MaildirWriter, target, _owner_for(target, user))
        try:
            messages = list(maildrop.messages)
            report.total += len(messages)
            done = await asyncio.to_thread(writer.exported)
            todo = [info for info in messages if _export_id(info.uidl) not in done]
            report.present += len(messages) - len(todo)
            progress.start(len(todo))
            stamp, pid = int(time.time()), os.getpid()
            # Files are written (and synced) a few at a time: the file system commits their
            # syncs together, which is what makes an export fast.
            slots = asyncio.Semaphore(WRITERS)

            async def write(name: str, data: bytes, ident: str) -> None:
                try:
                    await asyncio.to_thread(writer.write_message, name, data)
                finally:
                    slots.release()
                done[ident] = name
                report.copied += 1
                report.octets += len(data)
                progress.advance(1)

            try:
                await _write_all(
                    maildrop,
                    todo,
                    write=write,
                    slots=slots,
                    report=report,
                    progress=progress,
                    stamp=stamp,
                    pid=pid,
                )
            except ExceptionGroup as group:  # the first failure of a writer, as it is
                raise group.exceptions[0] from None
            await asyncio.to_thread(_write_uidlists, writer, messages, done)
        finally:
            writer.close()
    finally:
        await maildrop.close()


async def _write_all(
    maildrop: Maildrop,
    todo: Sequence[MessageInfo],
    *,
    write: Callable[[str, bytes, str], Coroutine[object, object, None]],
    slots: asyncio.Semaphore,
    report: TransferReport,
    progress: Progress,
    stamp: int,
    pid: int,
) -> None:
    """Read each message of ``todo`` and have ``write`` store it, a few writes at a time."""
    async with asyncio.TaskGroup() as group:
        for number, info in enumerate(todo, 1):
            try:
                data = b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            except MessageGone:
                report.gone += 1
                progress.advance(1)
                continue
            ident = _export_id(info.uidl)
            base = f"{stamp}.M{number}P{pid}.pobox-export-{ident},S={len(data)},W={info.size}"
            await slots.acquire()
            group.create_task(write(base + ":2,", data, ident))


def _write_uidlists(
    writer: _MaildirWriter, messages: Sequence[MessageInfo], done: dict[str, str]
) -> None:
    """Merge the exported messages into the target's UID list and write it (both formats).

    UIDs (and every other entry) already in the list are kept; messages new to it get the
    next UIDs in the store's order. ``pobox-uidlist`` is written too if the target has one
    (pobox serves from it and would not look at ``dovecot-uidlist`` again).
    """
    pobox_text = writer.read_index(INDEX_NAME)
    found = parse_pobox_uidlist(pobox_text) if pobox_text is not None else None
    parsed = found[0] if found is not None else None
    if parsed is None:
        text = writer.read_index(DOVECOT_UIDLIST_NAME)
        parsed = parse_dovecot_uidlist(text) if text is not None else None
    uidlist = parsed or UidList(uidvalidity=int(time.time()), next_uid=1)
    names: dict[str, str] = {}
    for info in messages:
        uidl, size = info.uidl, info.size
        name = done.get(_export_id(uidl))
        if name is None:
            continue  # vanished before it was written
        base = base_name(name)
        names[base] = name
        entry = uidlist.entries.get(base)
        if entry is None:
            uidlist.entries[base] = IndexEntry(uid=uidlist.next_uid, size=size, uidl=uidl)
            uidlist.next_uid += 1
        else:
            entry.uidl, entry.size = uidl, size
    writer.replace(DOVECOT_UIDLIST_NAME, _dovecot_uidlist(uidlist, names))
    if pobox_text is not None:
        writer.replace(INDEX_NAME, format_pobox_uidlist(uidlist))
