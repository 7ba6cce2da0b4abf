"""The Maildir backend: :class:`MaildirStore` opens maildrops, :class:`MaildirMaildrop` serves one.

Theory of operation
-------------------

*Finding the maildir.* The user's ``mail`` field (Dovecot's ``userdb_mail``) or else the
store's location template gives the path (:mod:`._location`). A maildir that does not exist
is created (``cur``, ``new``, ``tmp``, mode 0700) and opened empty. Opening tries the existing
maildir first and creates directories only when that fails with ``ENOENT``: a login to an
existing maildir makes no ``mkdir`` call (``tmp/`` alone, which reading never needs, is
created again if missing when the store first sees the maildir).

*Opening.* With ``lock=True`` the session first takes ``<maildir>/dovecot-pop3-session.lock``,
the dotlock of Dovecot's ``pop3_lock_session``, so pobox and Dovecot exclude each other too (see
:mod:`._fs`): created with ``O_EXCL``, naming ``<pid>:<hostname>``, kept fresh by one thread per
process, and holding no file descriptor while the session lasts. A second session gets
:class:`~pobox.storage.base.MaildropLocked`; a stale lock (its process dead, or untouched for five
minutes) is broken under the index lock below. Then, holding the short ``pobox-uidlist.lock``
that serializes index updates (sessions opened with ``lock=False`` update the index too), it
reads the index (:mod:`._index`), lists ``new/`` then ``cur/`` (never ``tmp/``, where MTAs
write files not yet delivered), and reconciles:

* a file already in the index keeps its UID and cached size: nothing is read;
* a new file gets the next UID (new files are numbered in delivery order, as Dovecot numbers
  them) and its wire size from the ``,W=`` field of its name or, lacking one, by reading it
  once (``,S=`` is the file size, which is the wire size only for CRLF files); the size is
  cached in the index;
* an index entry whose file is gone is dropped, after a second listing confirms it is gone (a
  file renamed by another program while we list may be missing from one listing);
* the index is rewritten, atomically, only if something changed.

UIDs only grow (``N`` never goes back), so a UIDL is never reused, and two copies of one
message are two files with two UIDs. Deleting ``pobox-uidlist`` starts a new UIDVALIDITY: the
current time, as in Dovecot, but always above the last one handed out, which
``pobox-uidvalidity`` remembers (Dovecot's ``dovecot-uidvalidity`` does the same). Every
message then gets a new UIDL and clients download everything once more, but no old UIDL is
ever given to another message. A maildir last served by Dovecot
keeps Dovecot's UIDLs (its ``dovecot-uidlist`` is imported once).

*The snapshot.* Messages are listed in UID order, which is arrival order as pobox saw it,
except that messages with a POP3 order number imported from Dovecot (``O`` field) come first,
by that number, as in Dovecot. A message's key is its base name (the file name without the
``:2,<flags>`` part), so a message whose flags change or that moves from ``new/`` to ``cur/``
after the snapshot is found again by listing the directories once more.

*The snapshot cache.* Parsing a large index at every login costs more than anything else
in it, so the store keeps, per maildir, the reconciled index and the snapshot of its last open
(in memory, for the most recently used maildirs). The index is parsed again only if its file
changed: another ``(st_ino, st_mtime_ns, st_size)`` (pobox replaces the file, so it gets a
new inode; a delivery appends to it, so it grows), and then only the appended lines if the
file is the cached one, byte for byte (BLAKE2b), with lines added. The directories are listed
again unless the ``mtime`` of ``new/`` and of ``cur/`` are those of the cached snapshot *and*
were more than a second older than the start of that listing: any delivery, rename (``new/``
to ``cur/``, a flag change) or unlink since then changed one of them, while a change made
within the same tick of the filesystem clock as an earlier one would not show, so recent
``mtime`` values are not trusted (Dovecot does the same for its ``cur/``). Everything is
checked under the index lock.

*Without an index* (``index=False``), nothing is written but the directories and the lock:
each open computes sizes afresh (reading files that lack ``,W=``), orders messages by delivery
time, and uses the SHA-256 of the base name as UIDL. These UIDLs are stable and never reused
(base names are unique) but differ from those of index mode and from Dovecot's.

Blocking filesystem work runs in worker threads (``asyncio.to_thread``), except two cheap
cases when ``inline_read_max`` is not 0: reading a message of at most that many bytes, and an
open that the snapshot cache answers (the session lock file is free, the index lock is free
and nothing changed). On a local disk those cost a few system calls, less than the hop to a
worker thread and back (most of a mail session's CPU in the benchmark), so they run in the
event loop's own thread; anything else, or any doubt, goes to a worker thread.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from pobox.errors import ConfigError
from pobox.storage._wire import WireSizeCounter
from pobox.storage.base import (
    DeleteResult,
    IncomingMessage,
    MailUser,
    MessageGone,
    MessageInfo,
    Quota,
    StorageError,
    StoragePermanentError,
    Usage,
)
from pobox.storage.maildir._deliver import deliver_message, maildir_usage
from pobox.storage.maildir._fs import (
    SessionLock,
    fsync_directory,
    held_lock,
    os_errors,
    replace_file,
    storage_error,
)
from pobox.storage.maildir._index import (
    DOVECOT_UIDLIST_NAME,
    INDEX_NAME,
    IndexEntry,
    UidList,
    format_pobox_uidlist,
    parse_dovecot_uidlist,
    parse_pobox_uidlist,
)
from pobox.storage.maildir._location import LocationError, MailLocation, parse_location
from pobox.storage.maildir._names import (
    base_name,
    delivery_sort_key,
    is_acceptable_name,
    size_field,
)

__all__ = ["MaildirMaildrop", "MaildirStore"]

#: Chunks :meth:`MaildirMaildrop.read_message` yields; a smaller message is read in one go.
CHUNK_SIZE = 256 * 1024
#: Messages up to this wire size are read in the event loop's thread (see the module doc).
INLINE_READ_MAX = 128 * 1024
#: Chunks read to compute the wire size of a message whose name lacks ``,W=``.
_SIZE_CHUNK = 1024 * 1024
#: The session lock, inside the maildir: Dovecot's ``POP3_LOCK_FNAME`` (see :mod:`._fs`).
LOCK_NAME = "dovecot-pop3-session.lock"
#: The lock serializing updates of the index, inside the maildir.
INDEX_LOCK_NAME = "pobox-uidlist.lock"
#: The last UIDVALIDITY handed out, inside the maildir.
UIDVALIDITY_NAME = "pobox-uidvalidity"
#: Where delivered messages live, in listing order: new/ first, so that a message moving from
#: new/ to cur/ while we list is seen in at least one of them.
_MESSAGE_DIRS = ("new", "cur")
_ALL_DIRS = ("cur", "new", "tmp")
#: How many maildirs the snapshot cache of a store remembers.
_CACHE_CAPACITY = 256
#: A directory mtime is trusted only if it was this much older than the cached listing.
_MTIME_SLACK_NS = 1_000_000_000
#: The user location templates are checked with when a store is built.
_PROBE_USER = ("user@example.org", "/home/user")

#: Where a message file was seen: (subdirectory, file name).
_Location = tuple[str, str]
#: What tells whether the index file changed: (st_ino, st_mtime_ns, st_size).
_FileKey = tuple[int, int, int]
_T = TypeVar("_T")


@dataclass(slots=True, frozen=True)
class _Cached:
    """A maildir's reconciled index and snapshot, as the last open left them.

    Nothing here is mutated once cached: users copy ``uidlist.entries`` and ``files``.
    """

    #: The index file the uidlist was read from or written to.
    index_key: _FileKey
    #: The BLAKE2b digest of that file's bytes (to recognize an append to it).
    index_digest: bytes
    #: The reconciled index; every entry has its size.
    uidlist: UidList
    #: ``st_mtime_ns`` of ``new/`` and ``cur/``, taken before the listing.
    dir_mtimes: tuple[int, int]
    #: ``time.time_ns()`` just before the directories were looked at.
    scanned_ns: int
    messages: tuple[MessageInfo, ...]
    files: dict[str, _Location]


class _SnapshotCache:
    """The last :class:`_Cached` of each of the most recently opened maildirs (thread-safe)."""

    def __init__(self, capacity: int = _CACHE_CAPACITY) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[Path, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, root: Path) -> _Cached | None:
        """Return what is cached for ``root``, if anything."""
        with self._lock:
            cached = self._entries.get(root)
            if cached is not None:
                self._entries.move_to_end(root)
            return cached

    def put(self, root: Path, cached: _Cached) -> None:
        """Remember ``cached`` for ``root``, forgetting the least recently used if full."""
        with self._lock:
            self._entries[root] = cached
            self._entries.move_to_end(root)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


@dataclass(slots=True)
class _Opened:
    """What opening a maildrop produced, handed from the worker thread to the event loop."""

    root: Path
    messages: tuple[MessageInfo, ...]
    files: dict[str, _Location]
    lock: SessionLock | None
    indexed: bool


class MaildirStore:
    """Opens Maildir maildrops; satisfies :class:`pobox.storage.base.MaildropStore`."""

    def __init__(
        self,
        location: str = "maildir:~/Maildir",
        *,
        index: bool = True,
        inline_read_max: int = INLINE_READ_MAX,
    ) -> None:
        """Create a store serving the maildirs that ``location`` names.

        Args:
            location: a Dovecot-style mail location template (see :mod:`._location`); a user's
                ``mail`` field overrides it.
            index: keep UIDs and sizes in ``pobox-uidlist`` (the default); without it, see the
                module documentation.
            inline_read_max: messages of at most this many octets are read without a worker
                thread (0: every read goes to a worker thread, for slow network storage).

        Raises:
            ConfigError: the location is malformed.
        """
        try:
            self._location = parse_location(location)
            self._location.expand(*_PROBE_USER)
        except LocationError as exc:
            msg = f"storage location: {exc}"
            raise ConfigError(msg) from exc
        self._index = index
        self._inline_read_max = inline_read_max
        self._cache = _SnapshotCache()

    def maildir_path(self, user: MailUser) -> Path:
        """Return the path of ``user``'s maildir.

        Raises:
            StoragePermanentError: the user's location cannot be expanded (no home directory
                for ``~``, an unsafe user name, a malformed ``mail`` field).
        """
        try:
            location: MailLocation = self._location
            if user.mail:
                location = parse_location(user.mail)
            return Path(location.expand(user.name, user.home))
        except LocationError as exc:
            msg = f"mail location of user {user.name!r}: {exc}"
            raise StoragePermanentError(msg) from exc

    async def open(self, user: MailUser, *, lock: bool = True) -> MaildirMaildrop:
        """Open ``user``'s maildrop, taking the session lock if ``lock``.

        Raises:
            MaildropLocked: another session holds the lock.
            StorageTemporaryError: a failure that may pass (I/O error, disk full, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        root = self.maildir_path(user)
        taken: SessionLock | None = None
        if self._index and self._inline_read_max:
            opened, taken = _open_cached(root, lock, self._cache)
            if opened is not None:
                return MaildirMaildrop(opened, self._inline_read_max)
        try:
            opened = await _owned_in_thread(
                functools.partial(_open_maildrop, root, lock, self._index, self._cache, taken),
                _release_opened,
            )
        except Exception:
            # The thread failed (and released ``taken``) or never ran.  Not on cancellation:
            # the thread may still be using the lock, and _owned_in_thread releases it then.
            if taken is not None:
                taken.release()
            raise
        return MaildirMaildrop(opened, self._inline_read_max)

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Store ``message`` in ``user``'s maildir (see :mod:`._deliver`); return its name.

        Raises:
            QuotaExceeded: the message does not fit in ``quota``.
            StorageTemporaryError: a failure that may pass (disk full, I/O error, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        root = self.maildir_path(user)
        return await asyncio.to_thread(deliver_message, root, message, quota=quota)

    async def usage(self, user: MailUser) -> Usage:
        """Return the octets and number of messages in ``user``'s maildir.

        Raises:
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator.
        """
        root = self.maildir_path(user)
        return await asyncio.to_thread(maildir_usage, root)

    async def aclose(self) -> None:
        """Do nothing: the store keeps no resources between sessions (only memory)."""


class MaildirMaildrop:
    """One open Maildir maildrop; satisfies :class:`pobox.storage.base.Maildrop`."""

    def __init__(self, opened: _Opened, inline_read_max: int = INLINE_READ_MAX) -> None:
        self._root = opened.root
        self._messages = opened.messages
        self._files = opened.files
        self._lock = opened.lock
        self._indexed = opened.indexed
        self._closed = False
        self._inline_read_max = inline_read_max
        #: Wire size by key, built at the first read.
        self._sizes: dict[str, int] | None = None

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in message-number order."""
        return self._messages

    @property
    def path(self) -> Path:
        """The maildir's directory."""
        return self._root

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes of message ``key`` in chunks of up to 256 KiB.

        Raises:
            MessageGone: the message was removed since the snapshot, or is not in it.
            StorageTemporaryError: an I/O error that may pass.
            StoragePermanentError: the file cannot be read (permissions).
        """
        data = self.read_now(key)
        if data is not None:
            yield data
            return
        handle, chunk, path = await _owned_in_thread(
            functools.partial(self._open_message, key), _close_opened_message
        )
        try:
            if chunk:
                yield chunk
            while handle is not None:
                chunk = await asyncio.to_thread(_read_chunk, handle, path)
                if not chunk:
                    break
                yield chunk
        finally:
            if handle is not None:
                handle.close()

    def read_now(self, key: str) -> bytes | None:
        """Return message ``key`` read in this thread if it is at most ``inline_read_max``.

        ``None`` for a larger message (or with ``inline_read_max`` 0): use
        :meth:`read_message`, which reads in a worker thread.

        Raises:
            MessageGone: the message was removed since the snapshot, or is not in it.
            StorageTemporaryError: an I/O error that may pass.
            StoragePermanentError: the file cannot be read, or is not a regular file.
        """
        self._check_open()
        if self._sizes is None:
            self._sizes = {info.key: info.size for info in self._messages}
        if self._sizes.get(key, self._inline_read_max + 1) > self._inline_read_max:
            return None
        data, _ = self._locate(key, _read_whole_or_none)
        return data

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Unlink the files of messages of the snapshot (UPDATE state, RFC 1939 §6).

        A file already gone counts as removed; one that cannot be unlinked (e.g. ``EACCES``)
        and a key that is not in the snapshot are reported in ``failed``. The directories are
        fsynced, then the index forgets the removed messages (their UIDs are not reused).

        Raises:
            StorageTemporaryError: the directories could not be synced.
        """
        self._check_open()
        return await asyncio.to_thread(self._delete, tuple(keys))

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Do nothing: a lock file held by this process is lost only with the process."""

    async def close(self) -> None:
        """Release the session lock; safe to call more than once."""
        self._closed = True
        if self._lock is not None:
            # Reading and unlinking a small lock file does not wait on the disk.
            self._lock.release()
            self._lock = None

    def _check_open(self) -> None:
        """Refuse to work on a closed maildrop: its lock may belong to another session now."""
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)

    def _locate(self, key: str, attempt: Callable[[Path], _T | None]) -> tuple[_T, Path]:
        """Apply ``attempt`` to the file of message ``key``, following a rename.

        ``attempt`` returns ``None`` when the file does not exist.

        Raises:
            MessageGone: the message is not in the snapshot, or its file is gone.
        """
        location = self._files.get(key)
        if location is None:
            msg = f"message {key!r} is not in the maildrop snapshot of {self._root}"
            raise MessageGone(msg)
        path = self._root.joinpath(*location)
        result = attempt(path)
        if result is None:
            # Renamed (flags changed, moved to cur/) by another program since the snapshot?
            found = _find_message(self._root, key)
            if found is not None:
                self._files[key] = found
                path = self._root.joinpath(*found)
                result = attempt(path)
            if result is None:
                msg = f"message {key!r} was removed from {self._root}"
                raise MessageGone(msg)
        return result, path

    def _open_message(self, key: str) -> tuple[BinaryIO | None, bytes, Path]:
        """Open a message file and read its first chunk (in a worker thread).

        Returns:
            The open file (``None`` when the whole message fitted in the first chunk and the
            file is closed already), the first chunk, and the path.
        """
        handle, path = self._locate(key, _open_or_none)
        try:
            chunk = _read_chunk(handle, path)
        except BaseException:
            handle.close()
            raise
        if len(chunk) < CHUNK_SIZE:
            handle.close()
            return None, chunk, path
        return handle, chunk, path

    def _delete(self, keys: tuple[str, ...]) -> DeleteResult:
        """Unlink message files, sync the directories, update the index (in a worker thread)."""
        removed: list[str] = []
        failed: list[str] = []
        touched: set[str] = set()
        for key in keys:
            location = self._files.get(key)
            if location is None:
                failed.append(key)
            elif _unlink_message(self._root, key, location, touched):
                removed.append(key)
            else:
                failed.append(key)
        for directory in sorted(touched):
            fsync_directory(self._root / directory)
        if self._indexed and removed:
            _forget(self._root, removed)
        return DeleteResult(removed=tuple(removed), failed=tuple(failed))


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


def _release_opened(opened: _Opened) -> None:
    """Release the lock of a maildrop opened for nobody."""
    if opened.lock is not None:
        opened.lock.release()


def _close_opened_message(opened: tuple[BinaryIO | None, bytes, Path]) -> None:
    """Close a message file opened for nobody."""
    handle = opened[0]
    if handle is not None:
        handle.close()


def _open_cached(
    root: Path, lock: bool, cache: _SnapshotCache
) -> tuple[_Opened | None, SessionLock | None]:
    """Open from the snapshot cache in the event loop's thread when that is cheap.

    It is when the cache holds the maildir, the session lock file does not exist, the index
    lock is free and nothing changed: a dozen system calls (create the lock file, flock the
    index lock, stat the index and the two directories), no listing and no parsing.

    Returns:
        The opened maildrop, or ``None`` and the session lock if it was taken (the worker
        thread then goes on with it).
    """
    cached = cache.get(root)
    if cached is None:
        return None, None
    session_lock = None
    try:
        if lock:
            session_lock = SessionLock.take_if_free(root / LOCK_NAME)
            if session_lock is None:
                return None, None
        with held_lock(root / INDEX_LOCK_NAME, wait=False) as held:
            cached = cache.get(root)
            if (
                held
                and cached is not None
                and _file_key(root / INDEX_NAME) == cached.index_key
                and _listing_current(cached, _dir_mtimes(root))
            ):
                opened = _Opened(root, cached.messages, dict(cached.files), session_lock, True)
                return opened, None
    except StorageError:
        if session_lock is not None:
            session_lock.release()
        return None, None  # the worker thread's path reports it, or creates the maildir
    return None, session_lock


def _listing_current(cached: _Cached, dir_mtimes: tuple[int, int]) -> bool:
    """Whether the cached listing still holds: the directory mtimes it saw, and trusted ones.

    See the module documentation; the caller has checked that the index file is unchanged.
    """
    return dir_mtimes == cached.dir_mtimes and max(dir_mtimes) < cached.scanned_ns - _MTIME_SLACK_NS


def _open_maildrop(
    root: Path,
    lock: bool,
    indexed: bool,
    cache: _SnapshotCache,
    taken: SessionLock | None = None,
) -> _Opened:
    """Lock the maildir, take the snapshot, creating the maildir if needed (in a worker thread).

    ``taken`` is the session lock when the caller has taken it already.
    """
    try:
        return _open_existing(root, lock, indexed, cache, taken)
    except StorageError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
    _ensure_maildir(root)
    return _open_existing(root, lock, indexed, cache)  # the failed attempt released ``taken``


def _open_existing(
    root: Path,
    lock: bool,
    indexed: bool,
    cache: _SnapshotCache,
    taken: SessionLock | None = None,
) -> _Opened:
    """Lock the maildir and take the snapshot; ``ENOENT`` if a directory is missing."""
    session_lock = taken
    if session_lock is None and lock:
        session_lock = SessionLock(root / LOCK_NAME, root / INDEX_LOCK_NAME)
    try:
        if indexed:
            messages, files = _indexed_snapshot(root, cache)
        else:
            if cache.get(root) is None:
                _ensure_tmp(root)
            messages, files = _unindexed_snapshot(root)
    except BaseException:
        if session_lock is not None:
            session_lock.release()
        raise
    return _Opened(root=root, messages=messages, files=files, lock=session_lock, indexed=indexed)


def _ensure_maildir(root: Path) -> None:
    """Create ``root`` and its ``cur``, ``new`` and ``tmp`` if missing, mode 0700."""
    for directory in (root, *(root / name for name in _ALL_DIRS)):
        with os_errors("create maildir directory", directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)


def _ensure_tmp(root: Path) -> None:
    """Create ``tmp/`` if missing (mode 0700), where deliveries write."""
    path = root / "tmp"
    with os_errors("create maildir directory", path), contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)


def _indexed_snapshot(
    root: Path, cache: _SnapshotCache
) -> tuple[tuple[MessageInfo, ...], dict[str, _Location]]:
    """Reconcile the index with the directories; return the snapshot and file locations.

    Uses and updates the store's cache (see the module documentation).
    """
    with held_lock(root / INDEX_LOCK_NAME):
        cached = cache.get(root)
        index_key = _file_key(root / INDEX_NAME)
        scanned_ns = time.time_ns()
        dir_mtimes = _dir_mtimes(root)
        if cached is not None and index_key == cached.index_key:
            if _listing_current(cached, dir_mtimes):
                return cached.messages, dict(cached.files)
            old = cached.uidlist
            uidlist = UidList(old.uidvalidity, old.next_uid, dict(old.entries))
            dirty = False
            digest = cached.index_digest
        else:
            if cached is None:
                _ensure_tmp(root)
            uidlist, dirty, index_key, digest = _load_index(root, cached)
        files = _list_messages(root)
        missing = [base for base in uidlist.entries if base not in files]
        if missing:
            for base, location in _list_messages(root).items():
                files.setdefault(base, location)
            for base in missing:
                if base not in files:
                    del uidlist.entries[base]
                    dirty = True
        arrived = (base for base in files if base not in uidlist.entries)
        for base in sorted(arrived, key=delivery_sort_key):
            uidlist.entries[base] = IndexEntry(uid=uidlist.next_uid, size=None)
            uidlist.next_uid += 1
            dirty = True
        for base, entry in list(uidlist.entries.items()):
            if entry.size is None:
                entry.size = _message_size(root, base, files)
                if entry.size is None:  # removed meanwhile; its UID stays used
                    del uidlist.entries[base]
                    files.pop(base, None)
                dirty = True
        if dirty:
            text = format_pobox_uidlist(uidlist)
            raw = text.encode("utf-8", "surrogateescape")
            replace_file(root / INDEX_NAME, raw)
            index_key = _file_key(root / INDEX_NAME)
            digest = _digest(raw)
        messages = _snapshot_messages(uidlist, cached)
        if index_key is not None:
            cache.put(
                root,
                _Cached(
                    index_key=index_key,
                    index_digest=digest,
                    uidlist=uidlist,
                    dir_mtimes=dir_mtimes,
                    scanned_ns=scanned_ns,
                    messages=messages,
                    files=dict(files),
                ),
            )
    return messages, files


def _file_key(path: Path) -> _FileKey | None:
    """Return what identifies this version of a file, ``None`` if it does not exist."""
    with os_errors("stat", path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _dir_mtimes(root: Path) -> tuple[int, int]:
    """Return ``st_mtime_ns`` of ``new/`` and ``cur/`` (``ENOENT`` if one is missing)."""
    new, cur = (root / directory for directory in _MESSAGE_DIRS)
    with os_errors("stat", new):
        new_mtime = os.stat(new).st_mtime_ns
    with os_errors("stat", cur):
        cur_mtime = os.stat(cur).st_mtime_ns
    return new_mtime, cur_mtime


def _snapshot_messages(uidlist: UidList, cached: _Cached | None) -> tuple[MessageInfo, ...]:
    """Return the messages of ``uidlist`` in listing order.

    The cached snapshot is reused when it can be: the messages whose index entries are the
    cached ones (the very objects) keep their place, and messages added since, if they all have
    UIDs above the cached ones and no POP3 order number, follow in UID order.
    """
    if cached is not None and cached.uidlist.uidvalidity == uidlist.uidvalidity:
        old = cached.uidlist
        entries = uidlist.entries
        kept = [info for info in cached.messages if entries.get(info.key) is old.entries[info.key]]
        added = [item for item in entries.items() if old.entries.get(item[0]) is not item[1]]
        if all(entry.order is None and entry.uid >= old.next_uid for _, entry in added):
            added.sort(key=lambda item: item[1].uid)
            return (*kept, *_infos(uidlist, added))
    return _infos(
        uidlist, sorted(uidlist.entries.items(), key=lambda item: _listing_order(item[1]))
    )


def _infos(uidlist: UidList, items: Sequence[tuple[str, IndexEntry]]) -> tuple[MessageInfo, ...]:
    """Return the :class:`MessageInfo` of index entries, in the order given."""
    return tuple(
        MessageInfo(key=base, size=_known(entry.size), uidl=uidlist.uidl(entry))
        for base, entry in items
    )


def _listing_order(entry: IndexEntry) -> tuple[bool, int, int]:
    """Order messages as Dovecot does: by POP3 order number if any (those first), then UID."""
    return entry.order is None, entry.order or 0, entry.uid


def _known(size: int | None) -> int:
    """Return a size the reconciliation has filled in."""
    assert size is not None
    return size


def _load_index(root: Path, cached: _Cached | None) -> tuple[UidList, bool, _FileKey | None, bytes]:
    """Return the index, whether it must be written back, the key and digest of the file read.

    When the file is the cached one with lines appended (by a delivery), only those are parsed.

    Falls back to importing ``dovecot-uidlist`` when pobox has no index yet, and to a fresh
    index (new UIDVALIDITY) when neither exists or pobox's own is unusable. A stale
    ``dovecot-uidlist`` is never imported over an unusable pobox index: pobox may have handed
    out UIDs above its ``N`` since.
    """
    read = _read_index(root / INDEX_NAME)
    if read is not None:
        raw, key = read
        digest = _digest(raw)
        if cached is not None:
            appended = _with_appended(cached, raw, key)
            if appended is not None:
                return appended, False, key, digest
        parsed = parse_pobox_uidlist(raw.decode("utf-8", "surrogateescape"))
        if parsed is None:
            return _fresh_index(root), True, None, b""
        uidlist, clean = parsed
        return uidlist, not clean, key, digest
    dovecot = _read_text(root / DOVECOT_UIDLIST_NAME)
    if dovecot is not None:
        imported = parse_dovecot_uidlist(dovecot)
        if imported is not None:
            return imported, True, None, b""
    return _fresh_index(root), True, None, b""


def _with_appended(cached: _Cached, raw: bytes, key: _FileKey) -> UidList | None:
    """Return the cached index plus the lines appended to its file since, if that is all.

    Returns ``None`` (parse the whole file) unless the file is the cached one (same inode, same
    bytes up to the cached size, which ended a line) with clean lines appended, each for a
    message the index does not know, with a UID not handed out yet.
    """
    old_size = cached.index_key[2]
    if (
        key[0] != cached.index_key[0]
        or len(raw) <= old_size
        or raw[old_size - 1 : old_size] != b"\n"
    ):
        return None
    if _digest(raw[:old_size]) != cached.index_digest:
        return None
    old = cached.uidlist
    header = f"pobox-uidlist 1 V{old.uidvalidity} N{old.next_uid}\n"
    parsed = parse_pobox_uidlist(header + raw[old_size:].decode("utf-8", "surrogateescape"))
    if parsed is None or not parsed[1]:
        return None
    tail = parsed[0].entries
    if any(entry.uid < old.next_uid or base in old.entries for base, entry in tail.items()):
        return None
    entries = dict(old.entries)
    entries.update(tail)
    return UidList(old.uidvalidity, parsed[0].next_uid, entries)


def _digest(raw: bytes) -> bytes:
    """Return the digest that recognizes a version of the index file."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def _read_index(path: Path) -> tuple[bytes, _FileKey] | None:
    """Return the index's bytes and the key of the file read, ``None`` if it does not exist."""
    with os_errors("read", path):
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None
        with handle:
            st = os.fstat(handle.fileno())
            data = handle.read()
    return data, (st.st_ino, st.st_mtime_ns, st.st_size)


def _fresh_index(root: Path) -> UidList:
    """Return an empty index with a new UIDVALIDITY, and remember that one.

    The UIDVALIDITY is the current time, like Dovecot's, but always above the last one handed
    out: an index lost twice within a second still gets two different ones.
    """
    path = root / UIDVALIDITY_NAME
    last = (_read_text(path) or "").strip()
    uidvalidity = max(int(time.time()), int(last) + 1 if last.isascii() and last.isdigit() else 1)
    replace_file(path, f"{uidvalidity}\n".encode())
    return UidList(uidvalidity=uidvalidity, next_uid=1)


def _read_text(path: Path) -> str | None:
    """Return a file's text (surrogate-escaped UTF-8), or ``None`` if it does not exist."""
    with os_errors("read", path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
    return data.decode("utf-8", "surrogateescape")


def _unindexed_snapshot(root: Path) -> tuple[tuple[MessageInfo, ...], dict[str, _Location]]:
    """Return the snapshot of a maildir used without an index."""
    files = _list_messages(root)
    messages: list[MessageInfo] = []
    for base in sorted(files, key=delivery_sort_key):
        size = _message_size(root, base, files)
        if size is None:
            files.pop(base, None)
            continue
        uidl = hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()
        messages.append(MessageInfo(key=base, size=size, uidl=uidl))
    return tuple(messages), files


def _list_messages(root: Path) -> dict[str, _Location]:
    """Map the base name of every message file in ``new/`` and ``cur/`` to where it is.

    A base name found in both (a move caught half-way, or a broken copy) is taken from cur/.
    """
    files: dict[str, _Location] = {}
    for directory in _MESSAGE_DIRS:
        path = root / directory
        with os_errors("list", path), os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if not is_acceptable_name(name):
                    continue
                try:
                    if not entry.is_file():  # d_type: no stat(2) on most filesystems
                        continue
                except OSError:
                    continue  # vanished while listing
                files[base_name(name)] = (directory, name)
    return files


def _find_message(root: Path, base: str) -> _Location | None:
    """Look for the current file of the message with base name ``base``."""
    found: _Location | None = None
    prefix = f"{base}:"
    for directory in _MESSAGE_DIRS:
        path = root / directory
        with os_errors("list", path), os.scandir(path) as entries:
            for entry in entries:
                if entry.name == base or entry.name.startswith(prefix):
                    found = (directory, entry.name)
    return found


def _message_size(root: Path, base: str, files: dict[str, _Location]) -> int | None:
    """Return a message's wire size: from ``,W=`` in its name, else by reading the file.

    Returns ``None`` if the file is gone (even after looking for it under a new name).
    """
    size = size_field(base, "W")
    if size is not None:
        return size
    size = _file_wire_size(root.joinpath(*files[base]))
    if size is None:
        found = _find_message(root, base)
        if found is None:
            return None
        files[base] = found
        size = _file_wire_size(root.joinpath(*found))
    return size


def _file_wire_size(path: Path) -> int | None:
    """Read a file once and return its wire size (bare LF counted as CRLF), ``None`` if gone."""
    handle = _open_or_none(path)
    if handle is None:
        return None
    counter = WireSizeCounter()
    with handle, os_errors("read message", path):
        while chunk := handle.read(_SIZE_CHUNK):
            counter.feed(chunk)
    return counter.size


def _open_or_none(path: Path) -> BinaryIO | None:
    """Open a message file for reading; ``None`` if it does not exist."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, "open message", path) from exc


def _read_whole_or_none(path: Path) -> bytes | None:
    """Read a whole message file in the event loop's thread; ``None`` if it does not exist.

    Four system calls (open, fstat, read, close). The file is opened without blocking and
    must be a regular file: a FIFO put in place of a message would otherwise block every
    session of the process.

    Raises:
        StoragePermanentError: the file is not a regular file, or cannot be read.
        StorageTemporaryError: an I/O error that may pass.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, "open message", path) from exc
    try:
        with os_errors("read message", path):
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                msg = f"cannot read message {path}: not a regular file"
                raise StoragePermanentError(msg)
            # One more byte than the size: a short read is the end of the file.
            data = os.read(fd, info.st_size + 1)
            if len(data) > info.st_size:  # grew since fstat (Maildir files should not)
                rest = [data]
                while more := os.read(fd, CHUNK_SIZE):
                    rest.append(more)
                data = b"".join(rest)
            return data
    finally:
        os.close(fd)


def _read_chunk(handle: BinaryIO, path: Path) -> bytes:
    """Read the next chunk of an open message file."""
    with os_errors("read message", path):
        return handle.read(CHUNK_SIZE)


def _unlink_message(root: Path, key: str, location: _Location, touched: set[str]) -> bool:
    """Unlink a message file, following a rename; tell whether the message is gone."""
    path = root.joinpath(*location)
    try:
        path.unlink()
    except FileNotFoundError:
        found = _find_message(root, key)
        if found is None:
            return True  # already gone: that is what was asked
        try:
            root.joinpath(*found).unlink()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        touched.add(found[0])
        return True
    except OSError:
        return False
    touched.add(location[0])
    return True


def _forget(root: Path, bases: list[str]) -> None:
    """Drop removed messages from the index.

    Best effort: if this fails, the next open drops the entries of files that are gone, so a
    failure here must not hide the result of the deletion from the session.
    """
    try:
        with held_lock(root / INDEX_LOCK_NAME):
            text = _read_text(root / INDEX_NAME)
            parsed = parse_pobox_uidlist(text) if text is not None else None
            if parsed is None:
                return  # no usable index: the next open builds one
            uidlist, _ = parsed
            dropped = [base for base in bases if uidlist.entries.pop(base, None) is not None]
            if dropped:
                text = format_pobox_uidlist(uidlist)
                replace_file(root / INDEX_NAME, text.encode("utf-8", "surrogateescape"))
    except StorageError:
        return
