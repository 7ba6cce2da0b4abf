"""The synchronous core of the Maildir backend: :class:`MaildirAccess` and :class:`MaildirHandle`.

Every method here blocks, takes and returns plain data (and file descriptors), and never
touches asyncio, so it can run in a worker thread of the serving process (what
:class:`~pobox.storage.maildir.MaildirStore` does) or in a helper process under another user's
credentials. Each call names the *owner*: the uid every file and directory of the maildir must
have (:mod:`pobox.storage._safefs`); the caller runs it with that owner's rights or, as root,
stands in for them.

Theory of operation
-------------------

*Finding the maildir.* The user's ``mail`` field (Dovecot's ``userdb_mail``) or else the
location template gives the path (:mod:`._location`). The root is opened by that path (links
above it and at it are the admin's and followed) and must be a directory of the owner. A
maildir that does not exist is created (``cur``, ``new``, ``tmp``, mode 0700) and opened empty.
Opening tries the existing maildir first and creates directories only when that fails with
``ENOENT``: a login to an existing maildir makes no ``mkdir`` call (``tmp/`` alone, which reading
never needs, is created again if missing when the core first sees the maildir). Below the root,
nothing is ever reached through a link (:class:`~pobox.storage._safefs.Dir`).

*Opening.* With ``lock=True`` the session first takes ``<maildir>/dovecot-pop3-session.lock``,
the dotlock of Dovecot's ``pop3_lock_session``, so pobox and Dovecot exclude each other too (see
:mod:`._fs`). A second session gets :class:`~pobox.storage.base.MaildropLocked`; a stale lock
(its process dead, or untouched for five minutes) is broken under the index lock below. Then,
holding the short ``pobox-uidlist.lock`` (a ``flock``, waited for at most ``lock_timeout``
seconds, then :class:`~pobox.storage.base.StorageTemporaryError`) that serializes index updates
and deliveries, it reads the index (:mod:`._index`), lists ``new/`` then ``cur/`` (never
``tmp/``, where MTAs write files not yet delivered), and reconciles:

* only regular files are listed (the directory entry's type; links, FIFOs and devices are not
  messages);
* a file already in the index keeps its UID and cached size: nothing is read;
* a new file is checked (``lstat``: a regular file of the owner, else it is skipped), then gets
  the next UID (new files are numbered in delivery order, as Dovecot numbers them) and its wire
  size: the ``,W=`` field of its name if that is possible for the file's real size
  (``size <= W <= 2 * size``: each LF may become CRLF), else by reading the file once, up to
  its ``fstat`` size (``,S=`` is the file size, which is the wire size only for CRLF files);
  the size is cached in the index. A name that lies about the size therefore never gets past
  the first look, and a read never trusts a name (see :meth:`MaildirHandle.open_message`);
* an index entry whose file is gone is dropped, after a second listing confirms it is gone (a
  file renamed by another program while we list may be missing from one listing);
* the index is rewritten, atomically, only if something changed.

UIDs only grow (``N`` never goes back), so a UIDL is never reused, and two copies of one
message are two files with two UIDs. Deleting ``pobox-uidlist`` starts a new UIDVALIDITY: the
current time, as in Dovecot, but always above the last one handed out, which
``pobox-uidvalidity`` remembers (Dovecot's ``dovecot-uidvalidity`` does the same). Every
message then gets a new UIDL and clients download everything once more, but no old UIDL is
ever given to another message. A maildir last served by Dovecot keeps Dovecot's UIDLs (its
``dovecot-uidlist`` is imported once), and so does one last served by Courier, one with an
``X-UIDL:`` header per message, or one the admin wrote a UIDL map for (:mod:`._foreign`).
pobox's own files (the index, its lock, the session
lock) must be regular files of the owner: one replaced by a link or a FIFO is never followed;
the open fails (``SYS/PERM``) until the user removes it.

*The snapshot.* Messages are listed in UID order, which is arrival order as pobox saw it,
except that messages with a POP3 order number imported from Dovecot (``O`` field) come first,
by that number, as in Dovecot. A message's key is its base name (the file name without the
``:2,<flags>`` part), so a message whose flags change or that moves from ``new/`` to ``cur/``
after the snapshot is found again by listing the directories once more.

*Seen flags.* :meth:`MaildirHandle.mark_seen` gives messages the ``S`` flag as an IMAP
server would (a rename within the maildir, into ``cur/``), for RETR as Dovecot's POP3 does;
the base name, and with it the key, the UIDL and the index entry, does not change.

*The snapshot cache.* Parsing a large index at every login costs more than anything else
in it, so the core keeps, per maildir, the reconciled index and the snapshot of its last open
(in memory, for the most recently used maildirs). The index is parsed again only if its file
changed: another ``(st_ino, st_mtime_ns, st_size)`` (pobox replaces the file, so it gets a
new inode; a delivery appends to it, so it grows), and then only the appended lines if the
file is the cached one, byte for byte (BLAKE2b), with lines added. The directories are listed
again unless the ``mtime`` of ``new/`` and of ``cur/`` are those of the cached snapshot *and*
were more than a second older than the start of that listing: any delivery, rename (``new/``
to ``cur/``, a flag change) or unlink since then changed one of them, while a change made
within the same tick of the filesystem clock as an earlier one would not show, so recent
``mtime`` values are not trusted (Dovecot does the same for its ``cur/``). Everything is
checked under the index lock. :meth:`MaildirAccess.open_if_cached` answers from this cache
without waiting for anything (a dozen system calls), for callers that must not block.

*Without an index* (``index=False``), nothing is written but the directories and the lock:
each open computes sizes afresh, orders messages by delivery time, and uses the SHA-256 of the
base name as UIDL. These UIDLs are stable and never reused (base names are unique) but differ
from those of index mode and from Dovecot's.

*tmp/.* Files left in ``tmp/`` for over 36 hours (Dovecot's rule: a crashed delivery's) are
removed, at most once an hour per maildir and process, when a delivery or an uncached open
comes by (:mod:`._deliver`).

May import: the standard library, :mod:`pobox.errors`, :mod:`pobox.storage` and the
stdlib-only protocol core (:class:`pobox.protocol.HeaderEnd`, so that the header end is
found exactly as the ``oe-ns-eoh`` encoder finds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pobox.errors import ConfigError
from pobox.protocol import HeaderEnd
from pobox.storage._safefs import (
    Dir,
    FolderPath,
    LockBusy,
    UnsafeFile,
    flocked,
    flocked_if_free,
    open_by_real_path,
    read_upto,
)
from pobox.storage._wire import WireSizeCounter
from pobox.storage.base import (
    INBOX,
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
from pobox.storage.maildir._deliver import (
    INDEX_LOCK_NAME,
    LOCK_TIMEOUT,
    MESSAGE_DIRS,
    PendingDelivery,
    TmpCleaner,
    deliver_message,
    maildir_usage,
    open_maildir,
)
from pobox.storage.maildir._foreign import (
    COURIER_NAME,
    FOREIGN_MAX,
    MAP_NAME,
    XUIDL_HEADER_MAX,
    checked_uidls,
    parse_courier_sizelist,
    parse_uidl_map,
    xuidl_header,
)
from pobox.storage.maildir._fs import SessionLock
from pobox.storage.maildir._index import (
    DOVECOT_UIDLIST_NAME,
    INDEX_MAX,
    INDEX_MAX_LINES,
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
    seen_name,
    size_field,
)
from pobox.storage.maildir._retain import (
    Kept,
    keep_messages,
    kept_messages,
    purge_kept,
    restore_kept,
)
from pobox.storage.maildir._retrieved import read_retrieved, update_retrieved

__all__ = ["LOCK_NAME", "LOCK_TIMEOUT", "MaildirAccess", "MaildirHandle"]

logger = logging.getLogger(__name__)
#: Refused imported UIDLs logged one by one per maildir; the rest are counted.
_COMPLAINTS_LOGGED = 20

#: The session lock, inside the maildir: Dovecot's ``POP3_LOCK_FNAME`` (see :mod:`._fs`).
LOCK_NAME = "dovecot-pop3-session.lock"
#: The last UIDVALIDITY handed out, inside the maildir.
UIDVALIDITY_NAME = "pobox-uidvalidity"
#: ``pobox-uidvalidity`` holds one number.
_UIDVALIDITY_MAX = 64
#: Chunks read to compute the wire size of a message whose name lacks a usable ``,W=``.
_SIZE_CHUNK = 1024 * 1024
#: Read size when looking for the end of a header: most headers fit in one.
_HEADER_CHUNK = 16 * 1024
#: How many maildirs the snapshot cache remembers.
_CACHE_CAPACITY = 256
#: A directory mtime is trusted only if it was this much older than the cached listing.
_MTIME_SLACK_NS = 1_000_000_000
#: The user location templates are checked with when a store is built.
_PROBE_USER = ("user@example.org", "/home/user")
#: How many users' maildir paths :meth:`MaildirAccess.maildir_root` remembers (then it
#: starts afresh).
_ROOTS_CAPACITY = 4096

#: Where a message file was seen: (subdirectory, file name).
Location = tuple[str, str]
#: What tells whether the index file changed: (st_ino, st_mtime_ns, st_size).
_FileKey = tuple[int, int, int]


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
    files: dict[str, Location]


class SnapshotCache:
    """The last :class:`_Cached` of each of the most recently opened maildirs (thread-safe)."""

    def __init__(self, capacity: int = _CACHE_CAPACITY) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, root: str) -> _Cached | None:
        """Return what is cached for ``root``, if anything."""
        with self._lock:
            cached = self._entries.get(root)
            if cached is not None:
                self._entries.move_to_end(root)
            return cached

    def put(self, root: str, cached: _Cached) -> None:
        """Remember ``cached`` for ``root``, forgetting the least recently used if full."""
        with self._lock:
            self._entries[root] = cached
            self._entries.move_to_end(root)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


class MaildirHandle:
    """One open maildrop: the snapshot, and the session lock while it is open.

    Holds no file descriptor: each operation opens the maildir root again (by its path, checked
    to be the owner's) and works from there. Not thread-safe: one session uses it at a time.
    """

    __slots__ = (
        "_closed",
        "_files",
        "_indexed",
        "_lock",
        "_lock_timeout",
        "_real_path",
        "kept_in",
        "kept_uidls",
        "messages",
        "owner",
        "retention",
        "root",
    )

    def __init__(
        self,
        root: str,
        owner: int,
        messages: tuple[MessageInfo, ...],
        files: dict[str, Location],
        lock: SessionLock | None,
        *,
        indexed: bool,
        lock_timeout: float,
        real: str | None = None,
        retention: int = 0,
    ) -> None:
        #: The maildir's path.
        self.root = root
        #: The uid its files must have.
        self.owner = owner
        #: The snapshot taken at open, in message-number order (message 1 is index 0).
        self.messages = messages
        self._files = files
        self._lock = lock
        self._indexed = indexed
        self._lock_timeout = lock_timeout
        #: The maildir's path as the kernel had it at the last careful open (no links in it).
        self._real_path = real
        #: ``pop3_delete_retention`` in seconds: deleted messages are kept that long in
        #: ``.pobox-deleted/`` (:mod:`._retain`) instead of being unlinked; 0: unlinked.
        self.retention = retention
        #: For a Maildir++ folder: (the maildir, the folder's name): deleted messages are kept
        #: in the maildir's ``.pobox-deleted/``, with the folder noted; ``None``: the INBOX.
        self.kept_in: tuple[str, str] | None = None
        #: key → the UIDL a merged listing gave the message (``pop3_folders``), which it
        #: keeps while kept and gets again when restored; others keep their own.
        self.kept_uidls: dict[str, str] = {}
        self._closed = False

    def open_message(self, key: str) -> tuple[int, int]:
        """Open message ``key`` for reading; return the descriptor and the size to read.

        The file is found where the snapshot saw it, or again by listing the directories if
        it was renamed since (flags changed, moved to ``cur/``). It is opened without following
        any link, without blocking (a FIFO is refused, not waited on), and must be a regular
        file of the owner. The size is ``st_size`` at open (never a size from the file name):
        read at most that many octets. The caller owns the descriptor and closes it.

        A message is opened with one ``openat2(2)`` on the maildir's real path (noted when it
        was last opened the careful way, at open or by this method) allowing no link at all
        (:func:`~pobox.storage._safefs.open_by_real_path`); any doubt takes the careful way.

        Raises:
            MessageGone: the message is not in the snapshot, or its file is gone.
            UnsafeFile: the file (or ``new/``/``cur/``) is a link, or not a regular file of
                the owner.
            StorageError: it cannot be opened.
        """
        self._check_open()
        location = self._files.get(key)
        if location is None:
            msg = f"message {key!r} is not in the maildrop snapshot of {self.root}"
            raise MessageGone(msg)
        real = self._real_path
        if real is not None:
            fast = open_by_real_path(real, self.owner, *location)
            if fast is not None:
                return fast.detach(), fast.size
        with Dir.open_root(self.root, self.owner) as root:
            self._real_path = root.real_path()
            handle = root.open_file(*location)
            if handle is None:
                found = _find_message(root, key)
                if found is not None:
                    self._files[key] = found
                    handle = root.open_file(*found)
            if handle is None:
                msg = f"message {key!r} was removed from {self.root}"
                raise MessageGone(msg)
        return handle.detach(), handle.size

    def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Unlink the files of messages of the snapshot (UPDATE state, RFC 1939 §6).

        :meth:`unlink_messages`, then :meth:`forget` of those removed (waiting for the index
        lock at most ``lock_timeout``; best effort).

        Raises:
            StorageTemporaryError: the directories could not be synced.
        """
        result = self.unlink_messages(keys, lock_timeout=self._lock_timeout)
        if result.removed:
            with contextlib.suppress(StorageError):
                self.forget(result.removed, lock_timeout=self._lock_timeout)
        return result

    def unlink_messages(self, keys: Sequence[str], *, lock_timeout: float = 0) -> DeleteResult:
        """Unlink the files of messages of the snapshot, and fsync their directories.

        With a :attr:`retention`, the files are moved into ``.pobox-deleted/`` instead, under
        the index lock (waited for at most ``lock_timeout``; :class:`LockBusy` if still busy),
        and what was kept longer than the retention is purged (:func:`._retain.keep_messages`).

        A file already gone counts as removed; one that cannot be unlinked (``EACCES``, a
        directory, ``new/`` or ``cur/`` replaced by a link) and a key that is not in the
        snapshot are reported in ``failed``. Only names inside the maildir's own ``new/`` and
        ``cur/`` are ever unlinked.

        Raises:
            StorageTemporaryError: the directories could not be synced.
        """
        self._check_open()
        keys = tuple(keys)
        try:
            root = Dir.open_root(self.root, self.owner)
        except StorageError:
            return DeleteResult(removed=(), failed=keys)
        if self.retention > 0:
            with root:
                return self._keep(root, keys, lock_timeout)
        removed: list[str] = []
        failed: list[str] = []
        with root, _Subdirs(root) as subdirs:
            for key in keys:
                location = self._files.get(key)
                if location is not None and _unlink_message(subdirs, key, location):
                    removed.append(key)
                else:
                    failed.append(key)
            subdirs.fsync_touched()
        return DeleteResult(removed=tuple(removed), failed=tuple(failed))

    def _keep(self, root: Dir, keys: tuple[str, ...], lock_timeout: float) -> DeleteResult:
        """Move messages into ``.pobox-deleted/`` (see :meth:`unlink_messages`)."""
        infos = {info.key: info for info in self.messages}
        moves = []
        failed: list[str] = []
        for key in keys:
            location, info = self._files.get(key), infos.get(key)
            if location is None or info is None:
                failed.append(key)
            else:
                uidl = self.kept_uidls.get(key, info.uidl)
                moves.append((key, location[0], location[1], info.size, uidl))
        try:
            if self.kept_in is None:
                moved = keep_messages(
                    root, moves, retention=self.retention, lock_timeout=lock_timeout
                )
            else:
                maildir, folder = self.kept_in
                with Dir.open_root(maildir, self.owner) as top:
                    moved = keep_messages(
                        top,
                        moves,
                        retention=self.retention,
                        lock_timeout=lock_timeout,
                        origin=root,
                        from_folder=folder,
                    )
        except LockBusy:
            raise  # the caller waits and tries again
        except StorageError as exc:
            # ``.pobox-deleted`` unusable (a link, not the owner's, disk full): nothing is
            # unlinked; what did move is kept (the next open drops its index entries).
            logger.warning("cannot keep deleted messages in %s: %s", self.root, exc)
            return DeleteResult(removed=(), failed=keys)
        done = set(moved)
        failed.extend(key for key, *_ in moves if key not in done)
        return DeleteResult(removed=tuple(moved), failed=tuple(failed))

    def forget(self, keys: Sequence[str], *, lock_timeout: float) -> None:
        """Drop removed messages from the index (their UIDs are not reused).

        Best effort: if this fails, the next open drops the entries of files that are gone.

        Raises:
            LockBusy: the index lock stayed busy for ``lock_timeout`` seconds (try again).
            StorageError: the index could not be updated (nothing to do but go on).
        """
        if not keys:
            return
        with Dir.open_root(self.root, self.owner) as root:
            _forget(root, list(keys), lock_timeout, indexed=self._indexed)

    def note_retrieved(
        self, times: Mapping[str, float], *, lock_timeout: float | None = None
    ) -> None:
        """Record first retrievals (``key → when``) in ``pobox-retrieved`` (:mod:`._retrieved`).

        Waits ``lock_timeout`` seconds at most for the index lock (default: the store's).
        A message that has a time keeps it; keys not in the snapshot are skipped.  With the
        session lock held, entries of messages no longer in the snapshot are dropped too.

        Raises:
            LockBusy: the index lock stayed busy for ``lock_timeout`` seconds (try again).
            StorageError: the file could not be read or written.
        """
        self._check_open()
        add = {key: int(when) for key, when in times.items() if key in self._files}
        if not add:
            return
        keep = set(self._files) if self._lock is not None else None
        with (
            Dir.open_root(self.root, self.owner) as root,
            flocked(
                root,
                INDEX_LOCK_NAME,
                timeout=self._lock_timeout if lock_timeout is None else lock_timeout,
            ),
        ):
            update_retrieved(root, add, keep=keep)

    def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the snapshot's keys first retrieved at or before ``when``, in order.

        Raises:
            StorageError: ``pobox-retrieved`` cannot be read.
        """
        self._check_open()
        with Dir.open_root(self.root, self.owner) as root:
            times = read_retrieved(root)
        if not times:
            return ()
        return tuple(
            info.key
            for info in self.messages
            if info.key in self._files and times.get(info.key, when + 1) <= when
        )

    def unseen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Return the keys whose file, as last seen, still needs the ``S`` flag (no I/O).

        A message seen already in ``cur/`` (a second session's RETR of it) needs no visit to
        the disk at all.
        """
        files = self._files
        out = []
        for key in keys:
            location = files.get(key)
            if location is None or location[0] != "cur" or seen_name(location[1]) is not None:
                out.append(key)
        return tuple(out)

    def mark_seen(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Give messages of the snapshot the ``S`` (seen) flag, as an IMAP server would.

        Each file is renamed within the maildir to its name with ``S`` added to the flags
        (:func:`~._names.seen_name`), into ``cur/`` (a message in ``new/`` moves there, as
        Maildir wants of a message a client has seen). The base name, and so the UIDL, the
        index entry and the size fields, never changes; other flags are kept. A message that
        has the flag already, or whose file is gone (expunged by another program meanwhile),
        needs nothing. A file renamed by another program since the snapshot is found again
        once. Nothing is followed: only regular files of the owner in the maildir's own
        ``new/`` and ``cur/`` are renamed, and never over an existing name. The directories
        are not fsynced (as Dovecot's flag changes are not): a crash may lose a flag, never a
        message, which is a rename within the maildir.

        Returns:
            The keys whose file could not be renamed (no permission, not a regular file of
            the owner, a key not in the snapshot).

        Raises:
            StorageError: the maildir cannot be opened.
        """
        self._check_open()
        failed: list[str] = []
        with Dir.open_root(self.root, self.owner) as root, _Subdirs(root) as subdirs:
            for key in keys:
                location = self._files.get(key)
                if location is None:
                    failed.append(key)
                    continue
                try:
                    self._files[key] = _mark_seen(subdirs, key, location)
                except StorageError:
                    failed.append(key)
        return tuple(failed)

    def close(self) -> None:
        """Release the session lock; safe to call more than once."""
        self._closed = True
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def _check_open(self) -> None:
        """Refuse to work on a closed maildrop: its lock may belong to another session now."""
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)


class MaildirAccess:
    """Opens Maildir maildrops and delivers to them, synchronously (see the module doc)."""

    def __init__(
        self,
        location: str = "maildir:~/Maildir",
        *,
        index: bool = True,
        lock_timeout: float = LOCK_TIMEOUT,
        reuse_xuidl: bool = False,
        retention: int = 0,
        header_ends: bool = False,
    ) -> None:
        """Serve the maildirs that ``location`` names.

        Args:
            location: a Dovecot-style mail location template (see :mod:`._location`); a user's
                ``mail`` field overrides it.
            index: keep UIDs and sizes in ``pobox-uidlist`` (the default); without it, see the
                module documentation.
            lock_timeout: how long to wait at most for a busy index lock.
            reuse_xuidl: at a maildir's first open, keep the UIDL of an ``X-UIDL:`` header
                (Dovecot's ``pop3_reuse_xuidl``; see :mod:`._foreign`).
            retention: keep deleted messages this many seconds in ``.pobox-deleted/``
                (``pop3_delete_retention``; see :mod:`._retain`); 0: unlink them.
            header_ends: find out, once per message, whether it has the empty line that
                ends its header, and keep the answer in the index (``H``) for the snapshot's
                :attr:`~pobox.storage.base.MessageInfo.header_end`
                (``pop3_client_workarounds = oe-ns-eoh``).

        Raises:
            ConfigError: the location is malformed.
        """
        try:
            self._location = parse_location(location)
            self._location.expand(*_PROBE_USER)
        except LocationError as exc:
            msg = f"storage location: {exc}"
            raise ConfigError(msg) from exc
        self.index = index
        self.lock_timeout = lock_timeout
        self.reuse_xuidl = reuse_xuidl
        self.retention = retention
        self.header_ends = header_ends
        #: The snapshot cache (shared with the non-blocking open of the async store).
        self.cache = SnapshotCache()
        self._tmp_cleaner = TmpCleaner()
        #: (``mail`` field, name, home) → the maildir's path (see :meth:`maildir_root`).
        self._roots: dict[tuple[str | None, str, str | None], str] = {}

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

    def maildir_root(self, user: MailUser) -> str:
        """Return :meth:`maildir_path` as a string, worked out once per user.

        The path depends on nothing but the location and the user's ``mail`` field, name and
        home: it is remembered for those (up to :data:`_ROOTS_CAPACITY` users), so a login
        does not expand the template and parse the path again.  A user whose location cannot
        be expanded is not remembered (it raises each time).

        Raises:
            StoragePermanentError: as :meth:`maildir_path`.
        """
        key = (user.mail, user.name, user.home)
        root = self._roots.get(key)
        if root is None:
            root = str(self.maildir_path(user))
            if len(self._roots) >= _ROOTS_CAPACITY:
                self._roots.clear()
            self._roots[key] = root
        return root

    def open(self, user: MailUser, *, owner: int, lock: bool = True) -> MaildirHandle:
        """Open ``user``'s maildrop, taking the session lock if ``lock``.

        Args:
            owner: the uid the maildir and every file in it must have.

        Raises:
            MaildropLocked: another session holds the lock.
            StorageTemporaryError: a failure that may pass (I/O error, disk full, the index
                lock busy for ``lock_timeout`` seconds, ...).
            StoragePermanentError: a failure that needs an administrator (the maildir is not
                a directory of ``owner``, one of its files is a link, ...).
        """
        return self.open_path(self.maildir_root(user), owner=owner, lock=lock)

    def deliver(
        self,
        user: MailUser,
        message: IncomingMessage,
        *,
        owner: int,
        quota: Quota | None = None,
        folder: str = INBOX,
    ) -> str:
        """Store ``message`` durably in ``user``'s maildir (see :mod:`._deliver`); return its name.

        Args:
            owner: the uid the maildir and every file in it must have (new files get it).
            folder: a checked folder name (:func:`~pobox.storage.base.check_folder`): the
                message goes into the Maildir++ folder ``.<folder>`` (made if missing).

        Raises:
            QuotaExceeded: the message does not fit in ``quota``.
            StorageTemporaryError: a failure that may pass (disk full, the index lock busy for
                ``lock_timeout`` seconds, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        root: str = str(self.maildir_path(user))
        if folder != INBOX:
            root = FolderPath(root, f".{folder}")
        return deliver_message(
            root,
            message,
            owner=owner,
            quota=quota,
            lock_timeout=self.lock_timeout,
            tmp_cleaner=self._tmp_cleaner,
        )

    def pending_delivery(
        self, user: MailUser, message: IncomingMessage, *, owner: int
    ) -> PendingDelivery:
        """Write ``message`` to ``user``'s ``tmp/``; commit and finish it step by step.

        For callers that wait for the index lock in their own way (see
        :class:`~pobox.storage.maildir._deliver.PendingDelivery`); :meth:`deliver` does it all.
        """
        return PendingDelivery(
            str(self.maildir_path(user)), message, owner=owner, tmp_cleaner=self._tmp_cleaner
        )

    def kept(self, user: MailUser, *, owner: int) -> list[Kept]:
        """Return the messages ``.pobox-deleted/`` keeps for ``user`` (:mod:`._retain`)."""
        try:
            root = Dir.open_root(self.maildir_path(user), owner)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return []
            raise
        with root:
            return kept_messages(root)

    def restore(
        self,
        user: MailUser,
        select: Callable[[Kept], bool],
        *,
        owner: int,
        lock_timeout: float | None = None,
        folders: Sequence[str] | None = None,
        remember: Callable[[Dir, Mapping[str, str]], None] | None = None,
    ) -> list[Kept]:
        """Restore the kept messages ``select`` picks (:func:`._retain.restore_kept`).

        Raises:
            LockBusy: the index lock stayed busy for ``lock_timeout`` seconds.
            StorageError: the index or the list could not be written.
        """
        timeout = self.lock_timeout if lock_timeout is None else lock_timeout
        with Dir.open_root(self.maildir_path(user), owner) as root:
            fresh = _fresh_index if self.index else None
            return restore_kept(
                root,
                select,
                lock_timeout=timeout,
                fresh_index=fresh,
                folders=folders,
                remember=remember,
            )

    def purge(
        self,
        user: MailUser,
        *,
        owner: int,
        lock_timeout: float | None = None,
        now: int | None = None,
    ) -> int:
        """Unlink kept messages older than the retention (:func:`._retain.purge_kept`)."""
        timeout = self.lock_timeout if lock_timeout is None else lock_timeout
        with Dir.open_root(self.maildir_path(user), owner) as root:
            return purge_kept(root, retention=self.retention, lock_timeout=timeout, now=now)

    def usage(self, user: MailUser, *, owner: int) -> Usage:
        """Return the octets and number of messages in ``user``'s maildir.

        Raises:
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator.
        """
        return maildir_usage(str(self.maildir_path(user)), owner=owner)

    # --- for the async store -----------------------------------------------------------

    def open_path(
        self,
        root: str,
        *,
        owner: int,
        lock: bool,
        taken: SessionLock | None = None,
        lock_timeout: float | None = None,
    ) -> MaildirHandle:
        """Open the maildir at ``root`` (:meth:`open` with the path worked out).

        Args:
            taken: the session lock when the caller has taken it already (it is released if
                the open fails).
            lock_timeout: how long to wait for the index lock (default: the core's); 0 tries
                once and raises :class:`~pobox.storage._safefs.LockBusy` if it is busy, for a
                caller that waits elsewhere and tries again.
        """
        timeout = self.lock_timeout if lock_timeout is None else lock_timeout
        try:
            return self._open_existing(root, owner, lock, timeout, taken)
        except StorageError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
        open_maildir(root, owner, create=True).close()
        return self._open_existing(root, owner, lock, timeout)  # ``taken`` was released

    def open_if_cached(
        self, root: str, *, owner: int, lock: bool
    ) -> tuple[MaildirHandle | None, SessionLock | None]:
        """Open from the snapshot cache when that needs no waiting and no listing.

        It does when the cache holds the maildir, the session lock file does not exist, the
        index lock is free and nothing changed: a dozen system calls (open the root, flock
        the index lock, take the lock file (its spare renamed into place), stat the index
        and the two directories), no listing and no parsing. Meant for a thread that must
        not block (an event loop).

        Returns:
            The opened maildrop, or ``None`` and the session lock if it was taken (give it to
            :meth:`open_path`, which goes on with it).
        """
        cached = self.cache.get(root)
        if cached is None:
            return None, None
        session_lock = None
        try:
            with (
                Dir.open_root(root, owner) as directory,
                flocked_if_free(directory, INDEX_LOCK_NAME) as held,
            ):
                if lock:
                    # Under the index lock (if free) the session lock's spare may be used.
                    session_lock = SessionLock.take_if_free(directory, LOCK_NAME, spare=held)
                    if session_lock is None:
                        return None, None
                cached = self.cache.get(root)
                if (
                    held
                    and cached is not None
                    and _file_key(directory, INDEX_NAME) == cached.index_key
                    and _listing_current(cached, _dir_mtimes(directory))
                ):
                    handle = MaildirHandle(
                        root,
                        owner,
                        cached.messages,
                        dict(cached.files),
                        session_lock,
                        indexed=True,
                        lock_timeout=self.lock_timeout,
                        real=directory.real_path(),
                        retention=self.retention,
                    )
                    return handle, None
        except StorageError:
            if session_lock is not None:
                session_lock.release()
            return None, None  # the blocking path reports it, or creates the maildir
        return None, session_lock

    def _open_existing(
        self,
        root: str,
        owner: int,
        lock: bool,
        lock_timeout: float,
        taken: SessionLock | None = None,
    ) -> MaildirHandle:
        """Lock the maildir and take the snapshot; ``ENOENT`` if a directory is missing."""
        session_lock = taken
        try:
            with Dir.open_root(root, owner) as directory:
                if session_lock is None and lock:
                    session_lock = SessionLock(
                        directory, LOCK_NAME, INDEX_LOCK_NAME, timeout=lock_timeout
                    )
                if not self.index or self.cache.get(root) is None:
                    directory.make_dir("tmp")  # where deliveries write; whatever is there
                    self._tmp_cleaner.maybe_clean(directory)
                if self.index:
                    messages, files = _indexed_snapshot(
                        directory,
                        self.cache,
                        lock_timeout,
                        reuse_xuidl=self.reuse_xuidl,
                        header_ends=self.header_ends,
                    )
                else:
                    messages, files = _unindexed_snapshot(directory)
                real = directory.real_path()
        except BaseException:
            if session_lock is not None:
                session_lock.release()
            raise
        return MaildirHandle(
            root,
            owner,
            messages,
            files,
            session_lock,
            indexed=self.index,
            lock_timeout=self.lock_timeout,
            real=real,
            retention=self.retention,
        )


class _Subdirs:
    """``new/`` and ``cur/`` of one maildir, each opened once when first needed."""

    def __init__(self, root: Dir) -> None:
        self._root = root
        self._open: dict[str, Dir] = {}
        self._touched: set[str] = set()
        self._stack = ExitStack()

    def get(self, name: str) -> Dir:
        """Return the open subdirectory ``name``.

        Raises:
            UnsafeFile: it is a link, or not a directory of the owner.
            StorageError: it cannot be opened.
        """
        directory = self._open.get(name)
        if directory is None:
            directory = self._stack.enter_context(self._root.sub(name))
            self._open[name] = directory
        return directory

    def touched(self, name: str) -> None:
        """Note that an entry of ``name`` was removed (it is fsynced at the end)."""
        self._touched.add(name)

    def fsync_touched(self) -> None:
        """Fsync the subdirectories where entries were removed."""
        for name in sorted(self._touched):
            self._open[name].fsync()

    def __enter__(self) -> _Subdirs:
        """Return this; every subdirectory opened is closed at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the subdirectories."""
        self._stack.close()


def _indexed_snapshot(
    root: Dir,
    cache: SnapshotCache,
    lock_timeout: float,
    *,
    reuse_xuidl: bool = False,
    header_ends: bool = False,
) -> tuple[tuple[MessageInfo, ...], dict[str, Location]]:
    """Reconcile the index with the directories; return the snapshot and file locations.

    Uses and updates the cache (see the module documentation). At the first open (no
    ``pobox-uidlist`` yet), other servers' UIDLs are adopted (:func:`_adopt_foreign_uidls`).
    With ``header_ends``, each message whose entry does not say yet whether it has a header
    end is read up to it (:func:`_header_end`) and the answer kept in the index: a message
    is read for it once, not at every login.
    """
    first = False
    with flocked(root, INDEX_LOCK_NAME, timeout=lock_timeout):
        cached = cache.get(root.path)
        index_key = _file_key(root, INDEX_NAME)
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
            first = index_key is None
            uidlist, dirty, index_key, digest = _load_index(root, cached)
        with _Subdirs(root) as subdirs:
            files = _list_messages(subdirs)
            missing = [base for base in uidlist.entries if base not in files]
            if missing:
                for base, location in _list_messages(subdirs).items():
                    files.setdefault(base, location)
                for base in missing:
                    if base not in files:
                        del uidlist.entries[base]
                        dirty = True
            arrived = [base for base in files if base not in uidlist.entries]
            sizes = {base: _message_size(subdirs, base, files) for base in arrived}
            for base in sorted(arrived, key=delivery_sort_key):
                size = sizes[base]
                if size is None:  # gone meanwhile, or not a message of the owner
                    files.pop(base, None)
                    continue
                uidlist.entries[base] = IndexEntry(uid=uidlist.next_uid, size=size)
                uidlist.next_uid += 1
                dirty = True
            for base, entry in list(uidlist.entries.items()):
                if entry.size is None:  # imported from Dovecot without a size
                    entry.size = _message_size(subdirs, base, files)
                    if entry.size is None:  # removed meanwhile; its UID stays used
                        del uidlist.entries[base]
                        files.pop(base, None)
                    dirty = True
            if first and _adopt_foreign_uidls(root, subdirs, uidlist, files, reuse_xuidl):
                dirty = True
            if header_ends:
                for base, entry in list(uidlist.entries.items()):
                    seen_at = files.get(base)
                    if entry.header_end is None and seen_at is not None:
                        found = _header_end(subdirs, seen_at)
                        if found is not None:
                            # A new entry, not a change to one the cache may share.
                            uidlist.entries[base] = dataclasses.replace(entry, header_end=found)
                            dirty = True
        if dirty:
            text = format_pobox_uidlist(uidlist)
            raw = text.encode("utf-8", "surrogateescape")
            root.replace(INDEX_NAME, raw)
            index_key = _file_key(root, INDEX_NAME)
            digest = _digest(raw)
        messages = _snapshot_messages(uidlist, cached)
        if index_key is not None:
            cache.put(
                root.path,
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


def _adopt_foreign_uidls(
    root: Dir,
    subdirs: _Subdirs,
    uidlist: UidList,
    files: dict[str, Location],
    reuse_xuidl: bool,
) -> bool:
    """Give messages the UIDLs other servers gave them (:mod:`._foreign`); tell if any changed.

    By precedence: the admin's ``pobox-uidl-map``, Dovecot's ``P`` (already in ``uidlist``),
    Courier's ``courierpop3dsizelist``, then (``reuse_xuidl``) an ``X-UIDL:`` header. Then
    every UIDL is checked (valid, unique, not of pobox's generated form); one refused is
    dropped (the message gets a generated UIDL) and logged.
    """
    admin = _foreign_list(root, MAP_NAME, parse_uidl_map)
    courier = _foreign_list(root, COURIER_NAME, parse_courier_sizelist)
    if not (admin or courier or reuse_xuidl) and all(
        entry.uidl is None for entry in uidlist.entries.values()
    ):
        return False
    ordered = sorted(uidlist.entries.items(), key=lambda item: item[1].uid)
    proposed = []
    for base, entry in ordered:
        uidl = admin.get(base) or entry.uidl or courier.get(base)
        if uidl is None and reuse_xuidl and base in files:
            uidl = _xuidl(subdirs, files[base])
        proposed.append((base, uidl, f"{entry.uid:08x}{uidlist.uidvalidity:08x}"))
    generated = re.compile(f"[0-9a-f]{{8,}}{uidlist.uidvalidity:08x}")
    keep, complaints = checked_uidls(proposed, generated)
    for complaint in complaints[:_COMPLAINTS_LOGGED]:
        logger.warning(
            "Maildir %s: imported UIDL refused, a new one given: %s", root.path, complaint
        )
    if len(complaints) > _COMPLAINTS_LOGGED:
        logger.warning(
            "Maildir %s: %d more imported UIDLs refused",
            root.path,
            len(complaints) - _COMPLAINTS_LOGGED,
        )
    changed = False
    for base, entry in ordered:
        if entry.uidl != keep[base]:
            entry.uidl = keep[base]
            changed = True
    return changed


def _foreign_list(root: Dir, name: str, parse: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """Read and parse another server's list in the maildir; empty if missing or unusable."""
    try:
        raw = root.read_file(name, FOREIGN_MAX)
    except StorageError as exc:  # a link, a FIFO, too large: the user's doing
        logger.warning("Maildir %s: %s ignored: %s", root.path, name, exc)
        return {}
    if raw is None:
        return {}
    return parse(raw.decode("utf-8", "surrogateescape"))


def _xuidl(subdirs: _Subdirs, location: Location) -> str | None:
    """Return the ``X-UIDL:`` of a message file's header, if it has one (and is the owner's)."""
    directory, name = location
    try:
        handle = subdirs.get(directory).open_file(name)
        if handle is None:
            return None
        with handle:
            head = read_upto(handle.fd, min(handle.size, XUIDL_HEADER_MAX))
    except (StorageError, OSError):
        return None
    return xuidl_header(head)


def _file_key(root: Dir, name: str) -> _FileKey | None:
    """Return what identifies this version of a file (``lstat``), ``None`` if it does not exist."""
    st = root.stat(name)
    if st is None:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _dir_mtimes(root: Dir) -> tuple[int, int]:
    """Return ``st_mtime_ns`` of ``new/`` and ``cur/`` (``ENOENT`` as cause if one is missing).

    Raises:
        UnsafeFile: one is not a directory (a link, a file).
    """
    mtimes = []
    for name in MESSAGE_DIRS:
        st = root.stat(name)
        if st is None:
            # The cause set by hand: compiled by mypyc, ``raise ... from`` sets no cause
            # (bench/results/mypyc.md), and the callers create a maildir on ENOENT only.
            error = StorageError(f"no {root.path}/{name}")
            error.__cause__ = FileNotFoundError(name)
            raise error
        if not stat.S_ISDIR(st.st_mode):
            msg = f"refusing {root.path}/{name}: not a directory (mode {st.st_mode:o})"
            raise UnsafeFile(msg)
        mtimes.append(st.st_mtime_ns)
    return mtimes[0], mtimes[1]


def _listing_current(cached: _Cached, dir_mtimes: tuple[int, int]) -> bool:
    """Whether the cached listing still holds: the directory mtimes it saw, and trusted ones.

    See the module documentation; the caller has checked that the index file is unchanged.
    """
    return dir_mtimes == cached.dir_mtimes and max(dir_mtimes) < cached.scanned_ns - _MTIME_SLACK_NS


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
        MessageInfo(
            key=base,
            size=_known(entry.size),
            uidl=uidlist.uidl(entry),
            header_end=entry.header_end,
        )
        for base, entry in items
    )


def _listing_order(entry: IndexEntry) -> tuple[bool, int, int]:
    """Order messages as Dovecot does: by POP3 order number if any (those first), then UID."""
    return entry.order is None, entry.order or 0, entry.uid


def _known(size: int | None) -> int:
    """Return a size the reconciliation has filled in."""
    assert size is not None
    return size


def _load_index(root: Dir, cached: _Cached | None) -> tuple[UidList, bool, _FileKey | None, bytes]:
    """Return the index, whether it must be written back, the key and digest of the file read.

    When the file is the cached one with lines appended (by a delivery), only those are parsed.

    Falls back to importing ``dovecot-uidlist`` when pobox has no index yet, and to a fresh
    index (new UIDVALIDITY) when neither exists or pobox's own is unusable. A stale
    ``dovecot-uidlist`` is never imported over an unusable pobox index: pobox may have handed
    out UIDs above its ``N`` since.
    """
    read = _read_index(root)
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
    dovecot = root.read_file(DOVECOT_UIDLIST_NAME, INDEX_MAX)
    if dovecot is not None:
        _check_lines(dovecot, f"{root.path}/{DOVECOT_UIDLIST_NAME}")
        imported = parse_dovecot_uidlist(dovecot.decode("utf-8", "surrogateescape"))
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


def _read_index(root: Dir) -> tuple[bytes, _FileKey] | None:
    """Return the index's bytes and the key of the file read, ``None`` if it does not exist.

    Raises:
        UnsafeFile: it is a link or not a regular file of the owner.
        StoragePermanentError: it is larger than :data:`INDEX_MAX`, or has more lines than
            :data:`INDEX_MAX_LINES`.
    """
    handle = root.open_file(INDEX_NAME)
    if handle is None:
        return None
    with handle:
        st = handle.stat
        if handle.size > INDEX_MAX:
            msg = f"refusing {handle.path}: {handle.size} octets, more than {INDEX_MAX}"
            raise StoragePermanentError(msg)
        data = handle.read()
    _check_lines(data, handle.path)
    return data, (st.st_ino, st.st_mtime_ns, st.st_size)


def _check_lines(raw: bytes, path: object) -> None:
    """Refuse an index with more lines than :data:`INDEX_MAX_LINES` before parsing it.

    Raises:
        StoragePermanentError: it has more.
    """
    lines = raw.count(b"\n")
    if lines > INDEX_MAX_LINES:
        msg = f"refusing {path}: {lines} lines, more than {INDEX_MAX_LINES}"
        raise StoragePermanentError(msg)


def _fresh_index(root: Dir) -> UidList:
    """Return an empty index with a new UIDVALIDITY, and remember that one.

    The UIDVALIDITY is the current time, like Dovecot's, but always above the last one handed
    out: an index lost twice within a second still gets two different ones.
    """
    raw = root.read_file(UIDVALIDITY_NAME, _UIDVALIDITY_MAX) or b""
    last = raw.decode("ascii", "replace").strip()
    uidvalidity = max(int(time.time()), int(last) + 1 if last.isascii() and last.isdigit() else 1)
    root.replace(UIDVALIDITY_NAME, f"{uidvalidity}\n".encode())
    return UidList(uidvalidity=uidvalidity, next_uid=1)


def _unindexed_snapshot(root: Dir) -> tuple[tuple[MessageInfo, ...], dict[str, Location]]:
    """Return the snapshot of a maildir used without an index."""
    messages: list[MessageInfo] = []
    with _Subdirs(root) as subdirs:
        files = _list_messages(subdirs)
        for base in sorted(files, key=delivery_sort_key):
            size = _message_size(subdirs, base, files)
            if size is None:
                files.pop(base, None)
                continue
            uidl = hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()
            messages.append(MessageInfo(key=base, size=size, uidl=uidl))
    return tuple(messages), files


def _list_messages(subdirs: _Subdirs) -> dict[str, Location]:
    """Map the base name of every regular file in ``new/`` and ``cur/`` to where it is.

    A base name found in both (a move caught half-way, or a broken copy) is taken from cur/.
    Links, FIFOs, devices and directories are not messages (the entry's type says so, with no
    ``stat`` on most filesystems).
    """
    files: dict[str, Location] = {}
    for directory in MESSAGE_DIRS:
        for entry in subdirs.get(directory).scandir():
            name = entry.name
            if not is_acceptable_name(name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue  # vanished while listing
            files[base_name(name)] = (directory, name)
    return files


def _find_message(root: Dir, base: str) -> Location | None:
    """Look for the current file of the message with base name ``base``."""
    found: Location | None = None
    prefix = f"{base}:"
    with _Subdirs(root) as subdirs:
        for directory in MESSAGE_DIRS:
            for entry in subdirs.get(directory).scandir():
                if entry.name == base or entry.name.startswith(prefix):
                    found = (directory, entry.name)
    return found


def _message_size(subdirs: _Subdirs, base: str, files: dict[str, Location]) -> int | None:
    """Return a message's wire size: from ``,W=`` in its name if plausible, else by reading it.

    ``,W=`` is plausible when the file's real size (``lstat``) could give it: at least that
    size, at most twice it. Returns ``None`` if the file is gone (even after looking for it
    under a new name) or is not a regular file of the owner.
    """
    directory, name = files[base]
    st = _lstat(subdirs, directory, name)
    if st is None:
        found = _find_message_in(subdirs, base)
        if found is None:
            return None
        files[base] = found
        directory, name = found
        st = _lstat(subdirs, directory, name)
        if st is None:
            return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != subdirs.get(directory).owner:
        return None
    claimed = size_field(base, "W")
    if claimed is not None and st.st_size <= claimed <= 2 * st.st_size:
        return claimed
    return _file_wire_size(subdirs.get(directory), name)


def _lstat(subdirs: _Subdirs, directory: str, name: str) -> os.stat_result | None:
    """Return ``lstat`` of a message file, ``None`` if it does not exist."""
    return subdirs.get(directory).stat(name)


def _find_message_in(subdirs: _Subdirs, base: str) -> Location | None:
    """Look for the current file of ``base`` in the already open ``new/`` and ``cur/``."""
    found: Location | None = None
    prefix = f"{base}:"
    for directory in MESSAGE_DIRS:
        for entry in subdirs.get(directory).scandir():
            if entry.name == base or entry.name.startswith(prefix):
                found = (directory, entry.name)
    return found


def _header_end(subdirs: _Subdirs, location: Location) -> bool | None:
    """Read a message up to the end of its header; tell whether it has one.

    As :class:`pobox.protocol.HeaderEnd` decides it (on the wire form), which is what the
    ``oe-ns-eoh`` encoder uses when it sends the message.  ``None`` if the file is gone or
    not a regular file of the owner (the session then reads it itself, and RETR fails).
    """
    directory, name = location
    try:
        handle = subdirs.get(directory).open_file(name)
    except UnsafeFile:
        return None
    if handle is None:
        return None
    finder = HeaderEnd()
    with handle:
        for chunk in handle.chunks(_HEADER_CHUNK):
            finder.feed_stored(chunk)
            if finder.found:
                break
    return finder.found


def _file_wire_size(directory: Dir, name: str) -> int | None:
    """Read a message once, up to its ``fstat`` size, and return its wire size.

    ``None`` if it is gone or not a regular file of the owner.
    """
    try:
        handle = directory.open_file(name)
    except UnsafeFile:
        return None
    if handle is None:
        return None
    counter = WireSizeCounter()
    with handle:
        for chunk in handle.chunks(_SIZE_CHUNK):
            counter.feed(chunk)
    return counter.size


def _unlink_message(subdirs: _Subdirs, key: str, location: Location) -> bool:
    """Unlink a message file, following a rename; tell whether the message is gone."""
    try:
        directory, name = location
        if subdirs.get(directory).unlink(name):
            subdirs.touched(directory)
            return True
        found = _find_message_in(subdirs, key)
        if found is None:
            return True  # already gone: that is what was asked
        if subdirs.get(found[0]).unlink(found[1]):
            subdirs.touched(found[0])
    except StorageError:
        return False
    return True


def _mark_seen(subdirs: _Subdirs, key: str, location: Location) -> Location:
    """Rename one message file to its name with the ``S`` flag, in ``cur/``; return where it is.

    Nothing is done to a file that has the flag (in ``cur/``), whose info part is not ``2,``,
    or that is gone (expunged by another program): its last known location is returned.

    Raises:
        UnsafeFile: it is not a regular file of the owner.
        StorageError: the rename failed for another reason than the file being gone.
    """
    for _ in range(2):  # once more if another program renamed it since we last saw it
        directory, name = location
        new = seen_name(name) or name
        if (directory, new) == ("cur", name):
            return location
        source = subdirs.get(directory)
        st = source.stat(name)
        if st is not None:
            if not stat.S_ISREG(st.st_mode) or st.st_uid != source.owner:
                msg = f"refusing {source.path}/{name}: not a regular file of uid {source.owner}"
                raise UnsafeFile(msg)
            cur = subdirs.get("cur")
            if cur.stat(new) is not None:
                return "cur", new  # another program gave it that name already: not replaced
            try:
                source.rename(name, cur, new)
            except StorageError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError):
                    raise
            else:
                return "cur", new
        found = _find_message_in(subdirs, key)
        if found is None:
            return location  # expunged meanwhile: nothing to flag
        location = found
    return location


def _forget(root: Dir, bases: list[str], lock_timeout: float, *, indexed: bool = True) -> None:
    """Drop removed messages from the index and ``pobox-retrieved``, under the index lock.

    Callers treat this as best effort: if it fails, the next open drops the entries of files
    that are gone (and the next locked session's RETR those of ``pobox-retrieved``), so a
    failure here must not hide the result of the deletion.
    """
    with flocked(root, INDEX_LOCK_NAME, timeout=lock_timeout):
        with contextlib.suppress(StorageError):  # a hostile file must not keep the index
            update_retrieved(root, {}, keep=None, drop=bases)
        if not indexed:
            return
        read = _read_index(root)
        if read is None:
            return
        parsed = parse_pobox_uidlist(read[0].decode("utf-8", "surrogateescape"))
        if parsed is None:
            return  # no usable index: the next open builds one
        uidlist, _ = parsed
        dropped = [base for base in bases if uidlist.entries.pop(base, None) is not None]
        if dropped:
            text = format_pobox_uidlist(uidlist)
            root.replace(INDEX_NAME, text.encode("utf-8", "surrogateescape"))
