"""The mbox store: :class:`MboxStore` opens spools, :class:`MboxMaildrop` serves one.

Where the spool is (``mail_location``, Dovecot's syntax): ``mbox:/var/mail/%u`` names the
spool file itself; ``mbox:~/mail:INBOX=/var/mail/%u`` names a mail root (accepted and
ignored: POP3 serves INBOX only, never the folders there) and the spool after ``INBOX=``.
Other options (``INDEX=``, ``LAYOUT=``, ...) are Dovecot's own and ignored. A user's
``mail`` field (``userdb_mail``) overrides the location if it is an ``mbox:`` location too.

Files beside the spool ``D/N``, all in the spool's directory ``D`` (which needs to be writable
by the mail's owner, or its group: ``/var/mail`` is ``root:mail`` mode 2775 or 1777 on Debian,
so pobox runs with group ``mail`` there, as Dovecot does with ``mail_privileged_group``):

* ``N.lock``: the dotlock every mail program takes (:mod:`._locks`);
* ``.N.pobox-uidl``: the UIDL list (:mod:`._uidlist`), replaced atomically, and
  ``.N.pobox-uidl.lock``, whose ``flock`` serialises its updates;
* ``.N.pobox-session``: the session lock (``flock``);
* ``.N.pobox-new``: the new spool while a deletion rewrites it (a leftover of a crash is
  removed by the next rewrite).

Reading: at open, under an fcntl read lock (Dovecot's ``mbox_read_locks = fcntl``: no
dotlock, so an MTA's wait is as short as the read), the spool is parsed up to the
size ``fstat`` gives (:mod:`._format`), the UIDLs are matched, and the descriptor is kept for
the session: RETR reads from it by offset. Mail appended meanwhile lies past the snapshot's
end and is not seen until the next open. Before each read the spool's name must still lead to
the same inode, and the message's From_ line must still be where it was; if not (another
session, or an MUA, rewrote the spool), the spool is parsed again and the message looked for
by its UIDL (:class:`~pobox.storage.base.MessageGone` if it is not there).

Deleting (UPDATE): under the dotlock and an fcntl write lock, the spool is parsed again as it
is *now* (so mail an MTA appended under the same locks since the open is kept), every message
but the deleted ones is copied byte for byte into ``.N.pobox-new`` (created ``O_EXCL``, given
the spool's mode, group and owner), which is fsynced and renamed over the spool, and the
directory fsynced: a crash leaves the old spool or the new one, never a mix. An MTA that
opens the spool only after it holds the dotlock (procmail, Postfix's ``local``,
``dovecot-lda``) appends to the new file; one that takes no dotlock but only ``fcntl`` on a
descriptor opened before the rename could append to the replaced file, which is why Debian
requires the dotlock.

Delivering: under the dotlock and an fcntl write lock, the From_ line, the ``>From``-quoted
message and a separating line feed are appended with ``O_APPEND`` and fsynced before
:meth:`MboxStore.deliver` returns; a failed write is cut off again (``ftruncate``).

Security: the spool directory is the admin's (opened by its path); everything in it is
opened relative to it, one name, ``O_NOFOLLOW | O_NONBLOCK``, and must be a regular file of
the mail's owner (:mod:`pobox.storage._safefs`): a spool that is a link or a FIFO is refused,
sizes come from ``fstat``, and reads stop at the size the snapshot had.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

from pobox.storage._safefs import (
    Dir,
    OpenFile,
    flocked,
    storage_error,
    unlock_and_close,
    write_all,
)
from pobox.storage.base import (
    DeleteResult,
    IncomingMessage,
    MailUser,
    MessageGone,
    MessageInfo,
    Quota,
    QuotaExceeded,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
    Usage,
)
from pobox.storage.maildir import MaildirGates
from pobox.storage.maildir._location import LocationError, MailLocation
from pobox.storage.mbox._format import FromQuoter, ParsedMessage, from_line, parse_mbox
from pobox.storage.mbox._locks import dotlocked, fcntl_locked, session_lock
from pobox.storage.mbox._uidlist import UidList, assign_uidls

__all__ = ["INLINE_READ_MAX", "LOCK_TIMEOUT", "MboxMaildrop", "MboxStore", "parse_mbox_location"]

_T = TypeVar("_T")

#: How long an operation waits at most for the dotlock or an fcntl lock.
LOCK_TIMEOUT = 10.0
#: Messages up to this size are read in the event loop's thread (``read_now``).
INLINE_READ_MAX = 128 * 1024
#: The UIDL list is refused beyond this size (about a million messages).
_UIDLIST_MAX = 64 * 1024 * 1024
_CHUNK = 256 * 1024


def _split(text: str) -> list[str]:
    """Split a location on ``:``, where ``::`` stands for a literal colon (as Dovecot does)."""
    parts = [part.replace("\0", ":") for part in text.replace("::", "\0").split(":")]
    return [part for part in parts if part] if parts[-1:] == [""] else parts


def parse_mbox_location(location: str) -> tuple[MailLocation, MailLocation | None]:
    """Parse ``mbox:PATH[:INBOX=SPOOL][:...]``: return the spool's template and the root's.

    Raises:
        LocationError: it is not an mbox location, or it has no path.
    """
    if not location.startswith("mbox:"):
        msg = f"mail location {location!r} is not an mbox: location"
        raise LocationError(msg)
    path, *options = _split(location[len("mbox:") :])
    if not path:
        msg = f"mail location {location!r} has no path"
        raise LocationError(msg)
    inbox = [option[len("INBOX=") :] for option in options if option.startswith("INBOX=")]
    if inbox and not inbox[-1]:
        msg = f"mail location {location!r}: INBOX= needs a path"
        raise LocationError(msg)
    rest = tuple(option for option in options if not option.startswith("INBOX="))
    if inbox:
        return MailLocation(inbox[-1], rest), MailLocation(path, rest)
    return MailLocation(path, rest), None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """A parsed spool with its UIDLs."""

    messages: list[ParsedMessage]
    uidls: list[str]


class _ParseCache:
    """What the last parse of each spool found, so that an unchanged spool is not read again.

    Keyed by the spool's path, checked against the file's device, inode, size and mtime
    (``fstat`` under the read lock): the same file, same size and same mtime is taken as
    unchanged; the same file grown, with the last known message's From_ line still where it
    was, is taken as appended to, and only that last message and what follows is parsed
    (an MTA only appends); anything else is parsed whole. At most :data:`_CACHED_SPOOLS`
    spools are kept, the least recently used dropped first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[tuple[int, ...], list[ParsedMessage]]] = OrderedDict()

    def parse(self, key: str, fd: int, size: int) -> list[ParsedMessage]:
        """Return the messages of the first ``size`` octets of the spool open as ``fd``.

        Raises:
            OSError: a read failed.
            NotAnMbox: it is not an mbox.
        """

        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        if size == 0:
            return []
        st = os.fstat(fd)
        stamp = (st.st_dev, st.st_ino, size, st.st_mtime_ns)
        with self._lock:
            cached = self._entries.get(key)
        messages: list[ParsedMessage] | None = None
        if cached is not None and cached[0][:2] == stamp[:2]:
            old_stamp, old = cached
            if old_stamp == stamp:
                messages = old
            elif old and size > old_stamp[2]:
                last = old[-1]
                line = last.from_line + b"\n"
                if read(last.start, len(line)) == line:
                    messages = old[:-1] + parse_mbox(read, size, last.start)
        if messages is None:
            messages = parse_mbox(read, size)
        with self._lock:
            self._entries[key] = (stamp, messages)
            self._entries.move_to_end(key)
            while len(self._entries) > _CACHED_SPOOLS:
                self._entries.popitem(last=False)
        return messages


#: How many spools' parses :class:`_ParseCache` keeps.
_CACHED_SPOOLS = 256


class _Spool:
    """One user's spool: its directory, its name and the store's settings."""

    def __init__(
        self,
        path: PurePosixPath,
        owner: int,
        lock_timeout: float,
        reuse: bool,
        shared: tuple[_ParseCache, MaildirGates],
    ) -> None:
        self.cache, self._gates = shared
        self.path = path
        self.name = path.name
        self.owner = owner
        self.lock_timeout = lock_timeout
        self.reuse_xuidl = reuse

    async def run(self, work: Callable[..., _T], *args: object) -> _T:
        """Run blocking ``work`` in a worker thread, one at a time per spool.

        Work on a spool may wait (up to ``lock_timeout``) for locks its user can hold: one
        worker thread per spool at most, so that a user holding their own dotlock ties up
        one thread, not all of them; others wait their turn in the event loop, as long.

        Raises:
            StorageTemporaryError: the turn did not come within ``lock_timeout`` seconds.
        """
        async with self._gates.turn(str(self.path), self.lock_timeout):
            return await asyncio.to_thread(work, *args)

    def open_dir(self) -> Dir:
        """Open the spool's directory (the admin's: by its path)."""
        text = str(self.path.parent)
        try:
            fd = os.open(text, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise storage_error(exc, "open the spool directory", text) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, "stat", text) from exc
        return Dir(fd, text, self.owner, st.st_gid)

    @property
    def uidlist_name(self) -> str:
        """The UIDL list's file name."""
        return f".{self.name}.pobox-uidl"

    def snapshot(self, directory: Dir, fd: int, size: int, *, update: bool) -> _Snapshot:
        """Parse the spool (``fd``, ``size`` octets) and match its UIDLs.

        With ``update``, the UIDL list is written back if it changed, under its lock.
        """
        with _os_errors("read", self.path):
            messages = self.cache.parse(str(self.path), fd, size)
        if not update:
            uidls, _, _ = assign_uidls(self.read_uidlist(directory), messages, reuse_xuidl=False)
            return _Snapshot(messages, uidls)
        with self.uidlist_locked(directory):
            current = self.read_uidlist(directory)
            uidls, updated, changed = assign_uidls(current, messages, reuse_xuidl=self.reuse_xuidl)
            if changed:
                directory.replace(self.uidlist_name, updated.render())
        return _Snapshot(messages, uidls)

    def read_uidlist(self, directory: Dir) -> UidList | None:
        """Return the UIDL list, ``None`` if there is none (or it is damaged)."""
        stored = directory.read_file(self.uidlist_name, _UIDLIST_MAX)
        return None if stored is None else UidList.parse(stored)

    def uidlist_locked(self, directory: Dir) -> contextlib.AbstractContextManager[None]:
        """Hold the UIDL list's ``flock`` (``.N.pobox-uidl.lock``): its updates are serial."""
        return flocked(directory, f"{self.uidlist_name}.lock", timeout=self.lock_timeout)

    def reparse(self) -> tuple[_Snapshot, OpenFile] | None:
        """Parse the spool as it is now, without changing anything; ``None`` if it is missing."""
        with self.open_dir() as directory:
            snapshot, handle = self.read_locked(directory, update=False)
            return None if handle is None else (snapshot, handle)

    def read_locked(self, directory: Dir, *, update: bool) -> tuple[_Snapshot, OpenFile | None]:
        """Open the spool, take the fcntl read lock, and parse it (no spool: empty).

        The name must still lead to the file locked (a rewrite may have replaced it while
        we waited for the lock; then it is opened again), and the size is taken under the
        lock, so that no half-appended message is read.

        Raises:
            StorageTemporaryError: the lock stayed busy, or the spool kept being replaced.
        """
        for _ in range(_REOPEN_TRIES):
            handle = directory.open_file(self.name)
            if handle is None:
                return self.snapshot(directory, -1, 0, update=update), None
            snapshot = None
            try:
                with fcntl_locked(
                    handle.fd, str(self.path), write=False, timeout=self.lock_timeout
                ):
                    if _same_file(directory, self.name, handle.stat):
                        with _os_errors("stat", self.path):
                            handle.size = os.fstat(handle.fd).st_size
                        snapshot = self.snapshot(directory, handle.fd, handle.size, update=update)
            except BaseException:
                handle.close()
                raise
            if snapshot is not None:
                return snapshot, handle
            handle.close()
        raise _replaced(self.path)

    @contextlib.contextmanager
    def write_locked(self, directory: Dir, *, append: bool) -> Iterator[int | None]:
        """Open the spool for writing (created if ``append``) under the fcntl write lock.

        Yields the descriptor (``None`` if there is no spool and ``append`` is false). Hold
        the dotlock around it. The name must still lead to the file locked, as above.

        Raises:
            StorageTemporaryError: the lock stayed busy, or the spool kept being replaced.
        """
        for _ in range(_REOPEN_TRIES):
            fd = directory.open_writable(self.name, append=append, create=append)
            if fd is None:
                yield None
                return
            try:
                with fcntl_locked(fd, str(self.path), write=True, timeout=self.lock_timeout):
                    with _os_errors("stat", self.path):
                        st = os.fstat(fd)
                    if _same_file(directory, self.name, st):
                        yield fd
                        return
            finally:
                os.close(fd)
        raise _replaced(self.path)


#: How often an open is tried again when the spool was replaced while it waited for a lock.
_REOPEN_TRIES = 5


def _same_file(directory: Dir, name: str, st: os.stat_result) -> bool:
    """Tell whether ``name`` still is the file ``st`` describes."""
    now = directory.stat(name)
    return now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _replaced(path: object) -> StorageTemporaryError:
    """The error for a spool replaced again and again while we waited for its lock."""
    return StorageTemporaryError(f"{path} keeps being replaced by another program")


@contextlib.contextmanager
def _os_errors(action: str, path: object) -> Iterator[None]:
    """Turn an :class:`OSError` into a storage error."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, action, path) from exc


class MboxMaildrop:
    """One open mbox spool; satisfies :class:`pobox.storage.base.Maildrop`."""

    def __init__(
        self,
        spool: _Spool,
        handle: OpenFile | None,
        snapshot: _Snapshot,
        session_fd: int | None,
        inline_read_max: int,
    ) -> None:
        self._spool = spool
        self._handle = handle
        self._session_fd = session_fd
        self._inline_read_max = inline_read_max
        self._closed = False
        self._by_key: dict[str, ParsedMessage] = {}
        infos = []
        for message, uidl in zip(snapshot.messages, snapshot.uidls, strict=True):
            self._by_key[uidl] = message
            infos.append(MessageInfo(key=uidl, size=message.wire, uidl=uidl))
        self._messages = tuple(infos)

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in message-number order."""
        return self._messages

    def _fresh(self, message: ParsedMessage) -> bool:
        """Tell whether the snapshot's offsets still hold for ``message``."""
        handle = self._handle
        if handle is None:
            return False
        try:
            now = os.stat(self._spool.path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (handle.stat.st_dev, handle.stat.st_ino):
                return False
            line = message.from_line + b"\n"
            return os.pread(handle.fd, len(line), message.start) == line
        except OSError:
            return False

    def _locate(self, key: str) -> tuple[ParsedMessage, int, OpenFile | None]:
        """Return where message ``key`` is now: (message, descriptor, handle to close)."""
        message = self._by_key.get(key)
        if message is None:
            msg = f"message {key} is not in this session's snapshot"
            raise MessageGone(msg)
        if self._fresh(message):
            assert self._handle is not None
            return message, self._handle.fd, None
        found = self._spool.reparse()
        if found is not None:
            snapshot, handle = found
            for now, uidl in zip(snapshot.messages, snapshot.uidls, strict=True):
                if uidl == key:
                    return now, handle.fd, handle
            handle.close()
        msg = f"message {key} was removed from {self._spool.path}"
        raise MessageGone(msg)

    def _read_all(self, key: str) -> bytes:
        """Return the whole message (blocking)."""
        return b"".join(self._read_chunks(key))

    def _read_chunks(self, key: str) -> list[bytes]:
        """Return the message in chunks (blocking); used for small messages."""
        message, fd, extra = self._locate(key)
        try:
            chunks = []
            with _os_errors("read", self._spool.path):
                for offset, length in message.segments:
                    chunks.append(read_at(fd, offset, length))
            return chunks
        finally:
            if extra is not None:
                extra.close()

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of one message in chunks.

        Raises:
            MessageGone: the message is no longer in the spool.
            StorageTemporaryError: an I/O error that may pass.
        """
        message, fd, extra = await self._spool.run(self._locate, key)
        if extra is None:
            # A descriptor of its own: the session may close its own while a read is queued.
            with _os_errors("read", self._spool.path):
                fd = os.dup(fd)
        try:
            for offset, length in message.segments:
                done = 0
                while done < length:
                    size = min(_CHUNK, length - done)
                    chunk = await asyncio.to_thread(_pread, fd, size, offset + done, self._spool)
                    if not chunk:
                        return
                    done += len(chunk)
                    yield chunk
        finally:
            if extra is not None:
                extra.close()
            else:
                os.close(fd)

    def read_now(self, key: str) -> bytes | None:
        """Return a small message whole, else ``None`` (use :meth:`read_message`).

        Raises:
            MessageGone: the key is not in the snapshot.
        """
        message = self._by_key.get(key)
        if message is None:
            msg = f"message {key} is not in this session's snapshot"
            raise MessageGone(msg)
        if message.stored > self._inline_read_max or not self._fresh(message):
            return None
        return self._read_all(key)

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages by rewriting the spool crash-safely (see the module documentation).

        Raises:
            RuntimeError: the maildrop was closed.
            StorageTemporaryError: a lock stayed busy, or an I/O error.
        """
        if self._closed:
            msg = "delete on a closed mbox maildrop"
            raise RuntimeError(msg)
        wanted = [key for key in keys if key in self._by_key]
        failed = tuple(key for key in keys if key not in self._by_key)
        if wanted:
            await self._spool.run(_rewrite_without, self._spool, set(wanted))
        return DeleteResult(removed=tuple(wanted), failed=failed)

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Never calls ``callback``: a file lock held by this process cannot be lost."""

    async def close(self) -> None:
        """Release the session lock and the spool; safe to call more than once."""
        self._closed = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._session_fd is not None:
            fd, self._session_fd = self._session_fd, None
            unlock_and_close(fd)


def read_at(fd: int, offset: int, length: int) -> bytes:
    """Read ``length`` octets at ``offset`` (fewer at the end of the file)."""
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, _CHUNK), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _pread(fd: int, size: int, offset: int, spool: _Spool) -> bytes:
    """``os.pread`` with storage errors."""
    with _os_errors("read", spool.path):
        return os.pread(fd, size, offset)


def _rewrite_without(spool: _Spool, doomed: set[str]) -> None:
    """Rewrite the spool without the messages whose UIDLs are ``doomed`` (blocking)."""
    with (
        spool.open_dir() as directory,
        dotlocked(directory, spool.name, timeout=spool.lock_timeout),
        spool.write_locked(directory, append=False) as fd,
    ):
        if fd is None:
            return  # no spool: everything is gone already
        with _os_errors("stat", spool.path):
            st = os.fstat(fd)
        snapshot = spool.snapshot(directory, fd, st.st_size, update=True)
        keep = [
            message
            for message, uidl in zip(snapshot.messages, snapshot.uidls, strict=True)
            if uidl not in doomed
        ]
        if len(keep) == len(snapshot.messages):
            return  # all already gone
        _write_new_spool(spool, directory, fd, st, keep)
        with spool.uidlist_locked(directory):
            current = spool.read_uidlist(directory)
            if current is not None:
                current.entries = [e for e in current.entries if e[1] not in doomed]
                directory.replace(spool.uidlist_name, current.render())


def _write_new_spool(
    spool: _Spool, directory: Dir, old: int, st: os.stat_result, keep: list[ParsedMessage]
) -> None:
    """Write ``keep`` (byte for byte) to ``.N.pobox-new``, sync, and rename it over the spool."""
    temporary = f".{spool.name}.pobox-new"
    directory.unlink(temporary)
    fd = directory.create(temporary, st.st_mode & 0o7777)
    if fd is None:
        msg = f"cannot create {directory.path}/{temporary}: it keeps reappearing"
        raise StoragePermanentError(msg)
    path = f"{directory.path}/{temporary}"
    try:
        with _os_errors("write", path):
            for message in keep:
                offset, left = message.start, message.end - message.start
                while left > 0:
                    chunk = os.pread(old, min(_CHUNK, left), offset)
                    if not chunk:
                        msg = f"{spool.path} shrank while it was rewritten"
                        raise StoragePermanentError(msg)
                    write_all(fd, chunk)
                    offset += len(chunk)
                    left -= len(chunk)
            os.fchmod(fd, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, st.st_gid)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(StorageError):
            directory.unlink(temporary)
        raise
    os.close(fd)
    directory.rename(temporary, directory, spool.name)
    directory.fsync()


class MboxStore:
    """Opens mbox spools; satisfies :class:`pobox.storage.base.MaildropStore`."""

    def __init__(
        self,
        location: str = "mbox:/var/mail/%u",
        *,
        owner: int | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
        reuse_xuidl: bool = False,
        inline_read_max: int = INLINE_READ_MAX,
    ) -> None:
        """Create a store serving the spools ``location`` names.

        Args:
            location: ``mbox:PATH[:INBOX=SPOOL]`` (see the module documentation).
            owner: the uid spools must have (default: the process's effective uid).
            lock_timeout: how long to wait at most for a busy dotlock or fcntl lock.
            reuse_xuidl: at the first look at a spool, keep ``X-UIDL:`` headers' UIDLs.
            inline_read_max: messages of at most this many octets may be read without a
                worker thread.

        Raises:
            ConfigError: the location is malformed.
        """
        try:
            self._spool_template, _ = parse_mbox_location(location)
        except LocationError as exc:
            from pobox.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(str(exc)) from exc
        self._owner = owner
        self._lock_timeout = lock_timeout
        self._reuse_xuidl = reuse_xuidl
        self._inline_read_max = inline_read_max
        self._shared = (_ParseCache(), MaildirGates())

    def spool_path(self, user: MailUser) -> PurePosixPath:
        """Return the path of ``user``'s spool.

        Raises:
            StoragePermanentError: the location cannot be expanded for the user.
        """
        template = self._spool_template
        try:
            if user.mail:
                template, _ = parse_mbox_location(user.mail)
            return template.expand(user.name, user.home)
        except LocationError as exc:
            raise StoragePermanentError(str(exc)) from exc

    def _spool(self, user: MailUser) -> _Spool:
        owner = os.geteuid() if self._owner is None else self._owner
        return _Spool(
            self.spool_path(user), owner, self._lock_timeout, self._reuse_xuidl, self._shared
        )

    async def open(self, user: MailUser, *, lock: bool = True) -> MboxMaildrop:
        """Open ``user``'s spool, taking the session lock if ``lock``.

        Raises:
            MaildropLocked: another session holds the lock.
            StorageTemporaryError: a lock stayed busy, or an I/O error.
            StoragePermanentError: the spool is unsafe or not an mbox.
        """
        spool = self._spool(user)
        return await spool.run(self._open, spool, lock)

    def _open(self, spool: _Spool, lock: bool) -> MboxMaildrop:
        with spool.open_dir() as directory:
            session = session_lock(directory, spool.name) if lock else None
            try:
                snapshot, handle = spool.read_locked(directory, update=True)
            except BaseException:
                if session is not None:
                    unlock_and_close(session)
                raise
            return MboxMaildrop(spool, handle, snapshot, session, self._inline_read_max)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Append ``message`` to ``user``'s spool and fsync it; return its offset as the key.

        Raises:
            QuotaExceeded: the message does not fit.
            StorageTemporaryError: a lock stayed busy, or an I/O error (disk full, ...).
            StoragePermanentError: the spool is unsafe.
        """
        spool = self._spool(user)
        return await spool.run(_append, spool, message, quota)

    async def usage(self, user: MailUser) -> Usage:
        """Return what ``user``'s spool holds (served octets, LF line ends, and messages)."""
        spool = self._spool(user)

        def count() -> Usage:
            found = spool.reparse()
            if found is None:
                return Usage(octets=0, messages=0)
            snapshot, handle = found
            handle.close()
            return _usage(snapshot.messages)

        return await spool.run(count)

    async def aclose(self) -> None:
        """Nothing to release."""


def _usage(messages: Sequence[ParsedMessage]) -> Usage:
    """Return the usage of ``messages``."""
    return Usage(octets=sum(m.stored for m in messages), messages=len(messages))


_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[ \t]*<([^>\s]*)>")


def _append(spool: _Spool, message: IncomingMessage, quota: Quota | None) -> str:
    """Append ``message`` under the dotlock and an fcntl write lock (blocking)."""
    found = _RETURN_PATH.search(message.header)
    sender = found.group(1).decode("ascii", "replace") if found else None
    with (
        spool.open_dir() as directory,
        dotlocked(directory, spool.name, timeout=spool.lock_timeout),
        spool.write_locked(directory, append=True) as fd,
    ):
        assert fd is not None
        with _os_errors("stat", spool.path):
            size = os.fstat(fd).st_size
        if quota is not None and not quota.unlimited:
            with _os_errors("read", spool.path):
                held = _usage(spool.cache.parse(str(spool.path), fd, size))
            _check_quota(quota, held, message.size)
        _write_message(spool, fd, size, sender, message)
    return str(size)


def _check_quota(quota: Quota, held: Usage, size: int) -> None:
    """Raise :class:`QuotaExceeded` if one more message of ``size`` octets does not fit."""
    if quota.max_messages and held.messages + 1 > quota.max_messages:
        msg = f"the mailbox is full: {held.messages} messages, at most {quota.max_messages}"
        raise QuotaExceeded(msg)
    if quota.max_bytes and held.octets + size > quota.max_bytes:
        msg = f"the mailbox is full: {held.octets} + {size} octets, at most {quota.max_bytes}"
        raise QuotaExceeded(msg)


def _write_message(
    spool: _Spool, fd: int, size: int, sender: str | None, message: IncomingMessage
) -> None:
    """Write the From_ line, the quoted message and the separator; fsync; undo on failure."""
    try:
        with _os_errors("write", spool.path):
            prefix = b""
            if size and os.pread(fd, 1, size - 1) != b"\n":
                prefix = b"\n"
            quoter = FromQuoter()
            write_all(fd, prefix + from_line(sender) + quoter.feed(message.header))
            for chunk in message.body.chunks():
                write_all(fd, quoter.feed(chunk))
            write_all(fd, quoter.finish() + b"\n")
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
