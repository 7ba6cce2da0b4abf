"""The Maildir backend: :class:`MaildirStore` opens maildrops, :class:`MaildirMaildrop` serves one.

Both are the asyncio face of the synchronous core (:mod:`._access`, which explains how a
maildir is read, indexed and locked, and :mod:`._deliver`): blocking filesystem work runs in
worker threads (``asyncio.to_thread``), with the serving process's own credentials; the
maildir's owner is this process's effective uid unless the store is told another.

Two cheap cases skip the worker thread when ``inline_read_max`` is not 0: reading a message of
at most that many bytes (by the snapshot, and again by ``fstat`` once it is open), and an open
that the snapshot cache answers (the session lock file is free, the index lock is free and
nothing changed). On a local disk those cost a few system calls, less than the hop to a worker
thread and back (most of a mail session's CPU in the benchmark), so they run in the event
loop's own thread; anything else, or any doubt, goes to a worker thread. A message whose file
turns out larger than its snapshot said (a name lying about its size, a file changed since)
is read in a worker thread too, in chunks, never whole. After its first chunk, a large
message is read in the event loop's thread as far as the page cache holds it
(``RWF_NOWAIT``: never a wait for the disk), a worker thread reading only what is not cached;
with ``inline_read_max`` 0, all of it in a worker thread.

No worker thread ever waits for a lock: the index lock is tried once in the thread
(``lock_timeout=0`` of the core), and while another process holds it the store waits in the
event loop (a few milliseconds, doubling up to 50) and tries again, for at most
``lock_timeout`` seconds, then fails with :class:`~pobox.storage.base.StorageTemporaryError`.
And one user cannot tie up the worker threads with work on their maildir: each maildir gets at
most one worker thread at a time for an open, a delete or a usage count (work that reads what
its user controls); others for the same maildir wait their turn in the event loop, as long.
A delivery writes its ``tmp/`` file and syncs ``new/`` outside any turn, so deliveries to one
user overlap on the disk; only its commit (quota check, link, index line) takes the turn, and
only when its first try found the lock busy. Sessions and
deliveries of other users are not held up by a user who holds their own index lock forever.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from pobox.storage._safefs import (
    CHUNK_SIZE,
    FolderPath,
    LockBusy,
    read_upto,
    storage_error,
)
from pobox.storage.base import (
    INBOX,
    DeletedMessage,
    DeleteResult,
    IncomingMessage,
    MailUser,
    MessageInfo,
    OpenedMessage,
    Quota,
    StorageError,
    StorageTemporaryError,
    Usage,
    check_folder,
)
from pobox.storage.maildir._access import LOCK_TIMEOUT, MaildirAccess, MaildirHandle
from pobox.storage.maildir._deliver import PendingDelivery, deliver_message
from pobox.storage.maildir._folders import (
    FolderMaildrop,
    add_folder_uidls,
    keep_merged_uidls,
    open_folder,
    remember_uidls,
)
from pobox.storage.maildir._fs import SessionLock
from pobox.storage.maildir._retain import Kept

__all__ = ["CHUNK_SIZE", "INLINE_READ_MAX", "MaildirGates", "MaildirMaildrop", "MaildirStore"]

#: Messages up to this wire size are read in the event loop's thread (see the module doc).
INLINE_READ_MAX = 128 * 1024

#: ``preadv`` flag: return only what the page cache holds (0 where the platform lacks it:
#: then every read after the first chunk goes to a worker thread).
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

_T = TypeVar("_T")

logger = logging.getLogger(__name__)


class MaildirGates:
    """At most one worker thread per maildir at a time, with a bounded wait for the turn.

    Keyed by the maildir's path; an entry lives while someone holds or waits for it.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str, timeout: float) -> AsyncIterator[None]:
        """Wait (at most ``timeout`` seconds) until no other operation on ``key`` runs.

        Raises:
            StorageTemporaryError: the turn did not come within ``timeout`` seconds.
        """
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                msg = f"maildir {key} is busy: waited {timeout:g} s for another operation on it"
                raise StorageTemporaryError(msg) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]


class MaildirStore:
    """Opens Maildir maildrops; satisfies :class:`pobox.storage.base.MaildropStore`."""

    def __init__(
        self,
        location: str = "maildir:~/Maildir",
        *,
        index: bool = True,
        inline_read_max: int = INLINE_READ_MAX,
        owner: int | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
        reuse_xuidl: bool = False,
        retention: int = 0,
        header_ends: bool = False,
    ) -> None:
        """Create a store serving the maildirs that ``location`` names.

        Args:
            location: a Dovecot-style mail location template (see :mod:`._location`); a user's
                ``mail`` field overrides it.
            index: keep UIDs and sizes in ``pobox-uidlist`` (the default); without it, see
                :mod:`._access`.
            inline_read_max: messages of at most this many octets are read without a worker
                thread (0: every read goes to a worker thread, for slow network storage).
            owner: the uid every maildir and its files must have (default: the process's
                effective uid at each call).
            lock_timeout: how long an operation waits at most for a busy index lock, and for
                its turn on a maildir busy with another operation.
            reuse_xuidl: at a maildir's first open, keep the UIDLs of ``X-UIDL:`` headers
                (``pop3_reuse_xuidl``).
            retention: keep deleted messages this many seconds in ``.pobox-deleted/``
                (``pop3_delete_retention``; see :mod:`._retain`); 0: unlink them.
            header_ends: cache in the index whether each message has a header end, for
                ``MessageInfo.header_end`` (``oe-ns-eoh``; see :class:`MaildirAccess`).

        Raises:
            ConfigError: the location is malformed.
        """
        self._access = MaildirAccess(
            location,
            index=index,
            lock_timeout=lock_timeout,
            reuse_xuidl=reuse_xuidl,
            retention=retention,
            header_ends=header_ends,
        )
        self._inline_read_max = inline_read_max
        self._owner = owner
        self._gates = MaildirGates()

    @property
    def access(self) -> MaildirAccess:
        """The synchronous core this store runs."""
        return self._access

    def maildir_path(self, user: MailUser) -> Path:
        """Return the path of ``user``'s maildir.

        Raises:
            StoragePermanentError: the user's location cannot be expanded (no home directory
                for ``~``, an unsafe user name, a malformed ``mail`` field).
        """
        return self._access.maildir_path(user)

    def owner(self) -> int:
        """Return the uid the maildirs' files must have now."""
        return os.geteuid() if self._owner is None else self._owner

    async def open(self, user: MailUser, *, lock: bool = True) -> MaildirMaildrop:
        """Open ``user``'s maildrop, taking the session lock if ``lock``.

        Raises:
            MaildropLocked: another session holds the lock.
            StorageTemporaryError: a failure that may pass (I/O error, disk full, the index
                lock busy for ``lock_timeout`` seconds, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        taken: SessionLock | None = None
        if access.index and self._inline_read_max:
            handle, taken = access.open_if_cached(root, owner=owner, lock=lock)
            if handle is not None:
                return MaildirMaildrop(handle, self._inline_read_max, self._gates, access)
        first = [taken]

        def attempt() -> MaildirHandle:
            """Open once, not waiting for the index lock (``taken`` goes to the first try)."""
            given, first[0] = first[0], None
            return access.open_path(root, owner=owner, lock=lock, taken=given, lock_timeout=0)

        try:
            handle = await _retrying(
                self._gates, root, access.lock_timeout, attempt, MaildirHandle.close
            )
        except Exception:
            # The thread failed (and released ``taken``) or never ran.  Not on cancellation:
            # the thread may still be using the lock, and _owned_in_thread releases it then.
            if taken is not None:
                taken.release()
            raise
        return MaildirMaildrop(handle, self._inline_read_max, self._gates, access)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Store ``message`` in ``user``'s maildir (see :mod:`._deliver`); return its name.

        Raises:
            QuotaExceeded: the message does not fit in ``quota``.
            StorageTemporaryError: a failure that may pass (disk full, I/O error, the index
                lock busy for ``lock_timeout`` seconds, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        pending: list[PendingDelivery] = []

        def first() -> str | None:
            """Write the message, then commit and finish it if the lock is free."""
            pending.append(access.pending_delivery(user, message, owner=owner))
            return commit_and_finish()

        def commit_and_finish() -> str | None:
            """Commit the written message if the lock is free, and finish it; else ``None``."""
            try:
                pending[0].commit(quota=quota, lock_timeout=0)
            except LockBusy:
                return None
            return pending[0].finish()

        steps = _Steps(lambda: pending[0].close() if pending else None)
        try:
            name = await steps.run(first)
            if name is None:
                # Busy: from now on in the maildir's turn, so that this process's deliveries
                # take the lock one after the other instead of colliding and sleeping.
                name = await _retrying(
                    self._gates, root, access.lock_timeout, commit_and_finish, runner=steps.run
                )
            return name
        finally:
            steps.close()

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> FolderMaildrop:
        """Open ``user``'s maildir with Maildir++ folders merged in (see :mod:`._folders`).

        The INBOX is opened first (with the session lock if ``lock``), whether it is among
        ``folders`` or not; then each other folder, without creating it.

        Raises:
            FolderNameError: a folder name is not acceptable.
            MaildropLocked, StorageTemporaryError, StoragePermanentError: as :meth:`open`.
        """
        names = list(dict.fromkeys(check_folder(name) for name in folders))
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        inbox = await self.open(user, lock=lock)
        parts: dict[str, MaildirMaildrop] = {INBOX: inbox}
        try:
            for name in names:
                if name != INBOX:
                    part = await self._open_folder(root, name, owner)
                    if part is not None:
                        parts[name] = part
            listed = [(name, parts[name].messages) for name in names if name in parts]
            merged = await _retrying(
                self._gates,
                root,
                access.lock_timeout,
                functools.partial(remember_uidls, root, owner, listed),
            )
            keep_merged_uidls({name: part.handle for name, part in parts.items()}, merged)
        except BaseException:
            for part in reversed(parts.values()):
                await part.close()
            raise
        return FolderMaildrop(parts, merged)

    async def _open_folder(self, root: str, name: str, owner: int) -> MaildirMaildrop | None:
        """Open the folder ``.<name>`` of the maildir ``root``, unlocked; ``None`` if missing.

        A folder that is not a directory of the owner (a link, a FIFO, another user's) is
        left out with a warning: the user's own doing, which must not stop their session.
        """
        access = self._access

        def attempt() -> tuple[MaildirHandle | None]:
            """Open the folder if it exists (``(None,)`` if not), not waiting for its lock."""
            return (open_folder(access, root, name, owner=owner, lock_timeout=0),)

        (handle,) = await _retrying(
            self._gates, f"{root}/.{name}", access.lock_timeout, attempt, _close_if_handle
        )
        if handle is None:
            return None
        return MaildirMaildrop(handle, self._inline_read_max, self._gates, access)

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Store ``message`` in the Maildir++ folder ``.<folder>`` (made if missing).

        The quota is checked against that folder's messages.

        Raises:
            FolderNameError: the folder name is not acceptable.
            QuotaExceeded, StorageTemporaryError, StoragePermanentError: as :meth:`deliver`.
        """
        folder = check_folder(folder)
        if folder == INBOX:
            return await self.deliver(user, message, quota=quota)
        access = self._access
        path = FolderPath(access.maildir_root(user), f".{folder}")
        owner = self.owner()
        return await asyncio.to_thread(
            deliver_message,
            path,
            message,
            owner=owner,
            quota=quota,
            lock_timeout=access.lock_timeout,
        )

    async def usage(self, user: MailUser) -> Usage:
        """Return the octets and number of messages in ``user``'s maildir.

        Raises:
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator.
        """
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        return await _retrying(
            self._gates, root, access.lock_timeout, lambda: access.usage(user, owner=owner)
        )

    async def deleted_messages(self, user: MailUser) -> tuple[DeletedMessage, ...]:
        """Return the messages ``.pobox-deleted/`` keeps for ``user``, oldest first."""
        owner = self.owner()
        kept = await asyncio.to_thread(self._access.kept, user, owner=owner)
        return tuple(_deleted(k) for k in kept)

    async def restore_deleted(
        self,
        user: MailUser,
        *,
        since: int | None = None,
        uidls: Sequence[str] = (),
        folders: Sequence[str] | None = None,
    ) -> tuple[DeletedMessage, ...]:
        """Move kept messages back into ``cur/`` with their UIDL and size (:mod:`._retain`).

        A message kept from a folder goes back into that folder (the INBOX if ``folders``
        does not list it, or it is gone), its UIDL kept by ``pobox-folder-uidls``.

        Raises:
            StorageTemporaryError: the index lock stayed busy for ``lock_timeout`` seconds.
            StorageError: the index or the list could not be written.
        """
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        wanted = frozenset(uidls)

        def select(kept: Kept) -> bool:
            return (since is None or kept.deleted >= since) and (not wanted or kept.uidl in wanted)

        restored = await _retrying(
            self._gates,
            root,
            access.lock_timeout,
            lambda: access.restore(
                user,
                select,
                owner=owner,
                lock_timeout=0,
                folders=folders,
                remember=add_folder_uidls,
            ),
        )
        return tuple(_deleted(k) for k in restored)

    async def purge_deleted(self, user: MailUser, *, now: int | None = None) -> int:
        """Unlink kept messages older than the retention; return how many."""
        access = self._access
        root = access.maildir_root(user)
        owner = self.owner()
        return await _retrying(
            self._gates,
            root,
            access.lock_timeout,
            lambda: access.purge(user, owner=owner, lock_timeout=0, now=now),
        )

    async def aclose(self) -> None:
        """Do nothing: the store keeps no resources between sessions (only memory)."""


class MaildirMaildrop:
    """One open Maildir maildrop; satisfies :class:`pobox.storage.base.Maildrop`."""

    def __init__(
        self,
        handle: MaildirHandle,
        inline_read_max: int = INLINE_READ_MAX,
        gates: MaildirGates | None = None,
        access: MaildirAccess | None = None,
    ) -> None:
        self._handle = handle
        self._messages = handle.messages
        self._inline_read_max = inline_read_max
        self._gates = gates or MaildirGates()
        self._lock_timeout = access.lock_timeout if access is not None else LOCK_TIMEOUT
        self._closed = False
        #: Wire size by key, built at the first read.
        self._sizes: dict[str, int] | None = None

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in message-number order."""
        return self._messages

    @property
    def path(self) -> Path:
        """The maildir's directory."""
        return Path(self._handle.root)

    @property
    def handle(self) -> MaildirHandle:
        """The open maildir this maildrop reads (:class:`MaildirHandle`)."""
        return self._handle

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of message ``key`` in chunks of up to 256 KiB.

        At most the size the file had when it was opened is read.

        Raises:
            MessageGone: the message was removed since the snapshot, or is not in it.
            StorageTemporaryError: an I/O error that may pass.
            StoragePermanentError: the file cannot be read (permissions), or is not a regular
                file of the owner (a link, a FIFO).
        """
        data = self.read_now(key)
        if data is not None:
            yield data
            return
        self._check_open()
        fd, left, chunk = await _owned_in_thread(
            functools.partial(_open_and_read, self._handle, key), _close_opened
        )
        try:
            if chunk:
                yield chunk
            if fd >= 0:
                async for more in self._chunks(fd, len(chunk), left - len(chunk), key):
                    yield more
        finally:
            if fd >= 0:
                os.close(fd)

    async def _chunks(self, fd: int, offset: int, left: int, key: str) -> AsyncIterator[bytes]:
        """Yield up to ``left`` octets of ``fd`` from ``offset``, in chunks (see the module)."""
        in_loop = self._inline_read_max > 0  # 0: no reads in the event loop at all
        while left > 0:
            want = min(CHUNK_SIZE, left)
            cached = _read_cached(fd, want, offset, key) if in_loop else None
            if cached is None:
                cached = await asyncio.to_thread(_pread, fd, want, offset, key)
            else:
                # Other sessions get their turn between two chunks, as they do while a
                # worker thread reads: a huge message (a sparse file of the user's) and a
                # fast client must not keep the event loop to themselves.
                await asyncio.sleep(0)
            chunk = cached
            if not chunk:
                break
            left -= len(chunk)
            offset += len(chunk)
            yield chunk

    async def open_file(self, key: str) -> OpenedMessage:
        """Open message ``key`` in a worker thread, as :meth:`read_message` does (same checks).

        Raises:
            MessageGone: the message was removed since the snapshot, or is not in it.
            StorageError: as :meth:`read_message`.
        """
        self._check_open()
        return await _owned_in_thread(functools.partial(_open_file, self._handle, key), _close_file)

    async def read_file(self, opened: OpenedMessage, key: str) -> AsyncIterator[bytes]:
        """Yield ``opened``'s octets up to its size at open, in chunks (it stays open)."""
        self._check_open()
        async for chunk in self._chunks(opened.fd, 0, opened.size, key):
            yield chunk

    def identity(self, opened: OpenedMessage) -> tuple[int, int, int, int, int]:
        """Return ``opened``'s identity now (``fstat``): it changes with any write to it.

        Raises:
            StorageError: ``fstat`` failed.
        """
        try:
            return _identity(os.fstat(opened.fd))
        except OSError as exc:
            raise storage_error(exc, "stat message", "") from exc

    def read_now(self, key: str) -> bytes | None:
        """Return message ``key`` read in this thread if it is at most ``inline_read_max``.

        ``None`` for a larger message (by the snapshot, or by the file's size once open), or
        with ``inline_read_max`` 0: use :meth:`read_message`, which reads in a worker thread.

        Raises:
            MessageGone: the message was removed since the snapshot, or is not in it.
            StorageTemporaryError: an I/O error that may pass.
            StoragePermanentError: the file cannot be read, or is not a regular file of the
                owner.
        """
        self._check_open()
        if self._sizes is None:
            self._sizes = {info.key: info.size for info in self._messages}
        limit = self._inline_read_max
        if self._sizes.get(key, limit + 1) > limit:
            return None
        fd, size = self._handle.open_message(key)
        try:
            if size > limit:
                return None  # the file is larger than its snapshot said: not here
            return _read(fd, size, key)
        finally:
            os.close(fd)

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Unlink the files of messages of the snapshot (UPDATE state, RFC 1939 §6).

        A file already gone counts as removed; one that cannot be unlinked (e.g. ``EACCES``)
        and a key that is not in the snapshot are reported in ``failed``. The directories are
        fsynced, then the index forgets the removed messages (their UIDs are not reused).

        Raises:
            StorageTemporaryError: the directories could not be synced.
        """
        self._check_open()
        handle = self._handle
        result = await _retrying(
            self._gates,
            handle.root,
            self._lock_timeout,
            functools.partial(handle.unlink_messages, tuple(keys)),
        )
        if result.removed:
            # Best effort: the next open drops index entries whose files are gone.
            with contextlib.suppress(StorageError):
                forget = functools.partial(_forget, handle, result.removed)
                await _retrying(self._gates, handle.root, self._lock_timeout, forget)
        return result

    async def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Add the ``S`` flag to the files of messages (:meth:`MaildirHandle.mark_seen`).

        Runs in a worker thread, in the maildir's turn, unless every message is seen already
        (by the names last seen); it takes no index lock (the index, keyed by base name,
        does not change).

        Returns:
            The keys that could not be marked.

        Raises:
            StorageError: the maildir could not be opened.
        """
        self._check_open()
        handle = self._handle
        todo = handle.unseen(keys)
        if not todo:
            return ()  # all seen already: no worker thread, no system call
        return await _retrying(
            self._gates,
            handle.root,
            self._lock_timeout,
            functools.partial(handle.mark_seen, todo),
        )

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals in ``pobox-retrieved`` (:meth:`MaildirHandle.note_retrieved`).

        Runs in a worker thread, in the maildir's turn, under the index lock.

        Raises:
            StorageError: the times could not be recorded.
        """
        self._check_open()
        handle = self._handle
        await _retrying(
            self._gates,
            handle.root,
            self._lock_timeout,
            functools.partial(_note_retrieved, handle, dict(times)),
        )

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the snapshot's keys first retrieved at or before ``when``.

        Raises:
            StorageError: ``pobox-retrieved`` cannot be read.
        """
        self._check_open()
        return await asyncio.to_thread(self._handle.retrieved_before, when)

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Do nothing: a lock file held by this process is lost only with the process."""

    async def close(self) -> None:
        """Release the session lock; safe to call more than once."""
        self._closed = True
        # Reading and unlinking a small lock file does not wait on the disk.
        self._handle.close()

    def _check_open(self) -> None:
        """Refuse to work on a closed maildrop: its lock may belong to another session now."""
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_file(handle: MaildirHandle, key: str) -> OpenedMessage:
    """Open a message and ``fstat`` it (in a worker thread)."""
    fd, size = handle.open_message(key)
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise storage_error(exc, "stat message", key) from exc
    return OpenedMessage(fd, min(size, st.st_size), _identity(st))


def _close_file(opened: OpenedMessage) -> None:
    """Close a message file opened for nobody."""
    os.close(opened.fd)


def _open_and_read(handle: MaildirHandle, key: str) -> tuple[int, int, bytes]:
    """Open a message and read its first chunk (in a worker thread).

    Returns:
        The descriptor (-1 when the whole message fitted in the first chunk and it is closed
        already), the octets to read in all, and the first chunk.
    """
    fd, size = handle.open_message(key)
    try:
        chunk = _read(fd, min(CHUNK_SIZE, size), key)
    except BaseException:
        os.close(fd)
        raise
    if len(chunk) >= size or not chunk:
        os.close(fd)
        return -1, size, chunk
    return fd, size, chunk


def _read(fd: int, size: int, key: str) -> bytes:
    """Read up to ``size`` octets of message ``key`` (fewer only at the end of the file).

    Raises:
        StorageError: the read failed.
    """
    try:
        return read_upto(fd, size)
    except OSError as exc:
        raise storage_error(exc, "read message", key) from exc


def _read_cached(fd: int, size: int, offset: int, key: str) -> bytes | None:
    """Read what the page cache holds of ``size`` octets at ``offset``, in this thread.

    ``RWF_NOWAIT`` (Linux 4.14) makes the read return what is cached and never wait for the
    disk: a large message read again, or just delivered, costs no hop to a worker thread
    and back per chunk (a fifth of a bulk RETR's CPU time).  ``None`` when nothing of it is
    cached or the filesystem cannot say: read it in a worker thread.  ``b""`` at the end of
    the file (it shrank since it was opened).

    Raises:
        StorageError: the read failed.
    """
    if not _NOWAIT:
        return None
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, _NOWAIT)
    except BlockingIOError:  # nothing of it in the cache
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without RWF_NOWAIT
            return None
        raise storage_error(exc, "read message", key) from exc
    del buffer[got:]
    return bytes(buffer)


def _pread(fd: int, size: int, offset: int, key: str) -> bytes:
    """Read up to ``size`` octets at ``offset`` of message ``key`` (in a worker thread).

    Raises:
        StorageError: the read failed.
    """
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise storage_error(exc, "read message", key) from exc


def _close_opened(opened: tuple[int, int, bytes]) -> None:
    """Close a message file opened for nobody."""
    if opened[0] >= 0:
        os.close(opened[0])


#: The first pause before trying a busy index lock again; it doubles up to the second.
_RETRY_FIRST = 0.002
_RETRY_MAX = 0.05


async def _retrying(
    gates: MaildirGates,
    key: str,
    timeout: float,
    attempt: Callable[[], _T | None],
    release: Callable[[_T], None] | None = None,
    *,
    runner: Callable[[Callable[[], _T | None]], Awaitable[_T | None]] | None = None,
) -> _T:
    """Run ``attempt`` in a worker thread, in the maildir's turn, until the index lock lets it.

    ``attempt`` tries the index lock once: it raises :class:`LockBusy` (or returns ``None``)
    if another process holds it; between tries the event loop waits, never a thread. What
    ``attempt`` returns is released by ``release`` if the caller is cancelled meanwhile;
    ``runner`` runs it in a thread (default: :func:`_owned_in_thread`).

    Raises:
        StorageTemporaryError: the lock stayed busy, or the maildir's turn did not come, for
            ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = _RETRY_FIRST
    while True:
        left = deadline - loop.time()
        async with gates.turn(key, max(left, 0.0)):
            try:
                if runner is not None:
                    result = await runner(attempt)
                else:
                    result = await _owned_in_thread(
                        attempt, functools.partial(_release_if_any, release)
                    )
            except LockBusy:
                result = None
            if result is not None:
                return result
        left = deadline - loop.time()
        if left <= 0:
            raise _busy(key, timeout)
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _RETRY_MAX)


def _close_if_handle(opened: tuple[MaildirHandle | None]) -> None:
    """Close a folder's handle opened for nobody."""
    if opened[0] is not None:
        opened[0].close()


def _deleted(kept: Kept) -> DeletedMessage:
    return DeletedMessage(uidl=kept.uidl, size=kept.size, deleted=kept.deleted, folder=kept.folder)


def _busy(key: str, timeout: float) -> StorageTemporaryError:
    """Return the error for a maildir whose index lock stayed busy for ``timeout`` seconds."""
    msg = f"maildir {key}: its index lock is held by another process for over {timeout:g} s"
    return StorageTemporaryError(msg)


def _forget(handle: MaildirHandle, keys: tuple[str, ...]) -> bool:
    """Drop ``keys`` from the index if its lock is free (:class:`LockBusy` if not); ``True``."""
    handle.forget(keys, lock_timeout=0)
    return True


def _note_retrieved(handle: MaildirHandle, times: dict[str, float]) -> bool:
    """Record ``times`` if the index lock is free (:class:`LockBusy` if not); ``True``."""
    handle.note_retrieved(times, lock_timeout=0)
    return True


def _release_if_any(release: Callable[[_T], None] | None, result: _T | None) -> None:
    """Release ``result`` with ``release``, if there are both."""
    if release is not None and result is not None:
        release(result)


class _Steps:
    """Runs the steps of a delivery in worker threads, one at a time, and closes it at the end.

    If the caller is cancelled while a step runs, ``close`` runs once that step is done
    (closing under a running step would close descriptors the step uses).
    """

    def __init__(self, close: Callable[[], object]) -> None:
        self._close = close
        self._running: asyncio.Future[object] | None = None

    async def run(self, step: Callable[[], _T]) -> _T:
        """Run ``step`` in a worker thread and return its result."""
        future = asyncio.ensure_future(asyncio.to_thread(step))
        self._running = future  # type: ignore[assignment]
        result = await asyncio.shield(future)
        self._running = None
        return result

    def close(self) -> None:
        """Close now, or when the step still running is done."""
        running = self._running
        if running is not None and not running.done():
            running.add_done_callback(lambda _: self._close())
        else:
            self._close()


async def _owned_in_thread(work: Callable[[], _T], release: Callable[[_T], None]) -> _T:
    """Run ``work`` in a worker thread and return what it acquired (a lock, an open file).

    A worker thread cannot be stopped: if the caller is cancelled meanwhile (a session timing
    out), ``release`` is applied to the result once the thread is done, so nothing leaks.
    """
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(functools.partial(_release_orphan, release))
        raise


def _release_orphan(release: Callable[[_T], None], future: asyncio.Future[_T]) -> None:
    """Release what a thread acquired for a caller that was cancelled."""
    if not future.cancelled() and future.exception() is None:
        release(future.result())
