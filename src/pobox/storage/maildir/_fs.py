"""The session lock of the Maildir backend: Dovecot's POP3 dotlock, on :mod:`.._safefs`.

Every file operation goes through :class:`~pobox.storage._safefs.Dir` (relative to the maildir's
descriptor, no link followed, regular files of the owner only); a lock file that is a link, a
FIFO or someone else's file is judged by its ``lstat`` alone, as an unreadable one is.

The session lock (:class:`SessionLock`), held for a whole POP3 session, holds no descriptor:
one per session would, next to the socket, double what 10,000 idle sessions cost against
``RLIMIT_NOFILE``. It is a dotlock, the one Dovecot's ``pop3_lock_session`` takes, so that
pobox and a Dovecot serving the same maildir exclude each other (facts from Dovecot 2.3,
``src/pop3/pop3-client.c`` and ``src/lib/file-dotlock.c``):

* the file ``dovecot-pop3-session.lock`` in the maildir, created with
  ``O_CREAT | O_EXCL`` and holding ``<pid>:<hostname>`` (no newline; ``gethostname()``);
  whoever creates it holds the lock, until it unlinks it;
* a content cut short (a reader racing the one ``write``) never names a wrong process: the
  PID is trusted only with the ``:`` that ends it and the whole host name after it;
* a lock is stale, and may be broken, when its host is this one and its PID is not alive
  (``kill(pid, 0)`` fails with ``ESRCH``), or is our own PID but this process does not hold
  that lock (a PID reused after a crash); otherwise when its ``mtime`` is older than
  :data:`STALE_TIMEOUT` (Dovecot's 300 seconds): the lock of another host, or one whose
  content cannot be read. A live PID of this host keeps its lock, as in Dovecot, unless the
  file is older than :data:`LIVE_PID_STALE_TIMEOUT`: every holder touches it more often than
  that (Dovecot every 300 seconds), so such a file names a PID reused after a crash;
* a holder touches its lock (``utime``) to keep it fresh: one thread per process touches every
  lock the process holds each :data:`REFRESH_INTERVAL` seconds;
* a lock is released by unlinking it, only if the file is still ours (same device, inode
  and content): a lock broken and taken by another session meanwhile is left alone.

pobox does not allocate an inode per session (on ext4, with many logins a second, creating
the file cost ~300 µs, most of a PLAIN login): a release renames its lock file, still holding
its content, to the *spare* ``dovecot-pop3-session.lock.pobox-spare``
(``renameat2(RENAME_NOREPLACE)``; unlinked as above where a spare exists already, the file
has a second name or the rename fails). A take that holds the index lock (which every pobox
claiming a spare holds; Dovecot never touches the spare) opens the spare (no link followed: a
regular file of the owner with one name), writes its own content into it and renames it to
the lock's name (``RENAME_NOREPLACE``: exclusive exactly as ``O_EXCL``): the lock appears
holding ``<pid>:<hostname>`` with a fresh ``mtime``, as a created one does. If what the
rename moved is not the file written (the owner swapped the spare), it is put back and the
lock is created. A crash at any point leaves a lock naming a dead process (broken at once)
or a spare, never an empty lock; an error before the rename leaves the spare, unused.

A root process whose worker threads take on each owner's filesystem ids (the storage helper)
calls :func:`use_thread_rights` at start: each lock then remembers the rights of the thread
that took it, and the refresher thread, or a finalizer in whatever thread, touches and
releases it with those rights only, never with root's (a lock taken with root's rights is
then never touched by the refresher).

Breaking is serialized among pobox processes by the index lock (``flock``, waited for at most
``lock_timeout`` seconds): a stale-looking lock is
checked again and unlinked under it, and only then created afresh. Creating needs no index
lock: ``O_EXCL`` lets one creator win, and a lock can vanish under a breaker only if its
holder releases it, which a holder that is dead (or, in this process, not holding it) does
not do. Dovecot breaks stale locks without that lock, exactly as it races against itself.
Within the process, a registry (by device and inode, under a mutex also held while a lock
file is created and written) tells our live locks from those a dead process of our PID left.

May import: the standard library, :mod:`pobox.storage.base` and :mod:`pobox.storage._safefs`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager

from pobox.storage._safefs import Dir, UnsafeFile, flocked, storage_error
from pobox.storage.base import MaildropLocked, StorageError

__all__ = [
    "LIVE_PID_STALE_TIMEOUT",
    "REFRESH_INTERVAL",
    "STALE_TIMEOUT",
    "SessionLock",
    "refresh_session_locks",
    "spare_name",
    "use_thread_rights",
]

#: Dovecot's ``POP3_SESSION_DOTLOCK_STALE_TIMEOUT_SECS``: a lock untouched this long is stale.
STALE_TIMEOUT = 300
#: A lock naming a live PID of this host is stale only after this long untouched (see above).
LIVE_PID_STALE_TIMEOUT = 2 * STALE_TIMEOUT
#: How often held locks are touched: a fifth of :data:`STALE_TIMEOUT`, so a late pass or two
#: never lets a live lock look stale (Dovecot touches every :data:`STALE_TIMEOUT`, no margin).
REFRESH_INTERVAL = 60
#: The spare of a lock file ``NAME`` is ``NAME`` + this (see the module documentation).
SPARE_SUFFIX = ".pobox-spare"
#: Dovecot reads at most this much of a lock file.
_CONTENT_MAX = 511
#: Tries to take a lock that keeps changing under us before calling the maildrop locked.
_ATTEMPTS = 3
_NS = 1_000_000_000
#: The largest PID there can be (Linux's ``PID_MAX_LIMIT``); larger numbers name no process.
_PID_MAX = 4 * 1024 * 1024

#: What identifies one lock file: ``(st_dev, st_ino)``.
_FileId = tuple[int, int]


#: The rights a thread works with (see :func:`use_thread_rights`); opaque here.
Rights = object
#: ``(capture, enter)``: the rights of the calling thread, and a context manager running a
#: block with given rights; ``None`` when every thread has the process's own.
_thread_rights: tuple[Callable[[], Rights], Callable[[Rights], AbstractContextManager[None]]] | None
_thread_rights = None


def use_thread_rights(
    capture: Callable[[], Rights], enter: Callable[[Rights], AbstractContextManager[None]]
) -> None:
    """Touch and release each lock with the rights of the thread that took it.

    For a process whose threads have rights of their own (per-thread ``setfsuid``): ``capture``
    returns the calling thread's rights (``None``: the process's own, which are then never
    used for a lock taken so), ``enter(rights)`` runs a block with them in any thread.
    """
    global _thread_rights  # noqa: PLW0603 - one setting per process, made once at start
    _thread_rights = (capture, enter)


#: What :func:`_rights_of` returns when every thread has the process's own rights (reusable).
_OWN_RIGHTS: AbstractContextManager[None] = contextlib.nullcontext()


def _rights_of(held: _Held) -> AbstractContextManager[None]:
    """Return what runs a block with the rights ``held`` was taken with.

    A plain function, not a generator: a session's release runs it once per login.

    Raises:
        PermissionError: it was taken with the process's own rights in a process whose
            threads have their own: the lock is left as it is.
    """
    if _thread_rights is None:
        return _OWN_RIGHTS
    if held.rights is None:
        msg = f"{held.path} was taken with the process's own rights: left alone"
        raise PermissionError(errno.EPERM, msg)
    return _thread_rights[1](held.rights)


class _Held:
    """A lock file this process created and holds."""

    __slots__ = ("content", "file_id", "name", "owner", "rights", "root")

    def __init__(self, root: Dir, name: str, file_id: _FileId, content: bytes) -> None:
        #: The maildir's path (a string: 10,000 idle sessions hold 10,000 of these) and owner;
        #: the lock is found again through them, never through a descriptor kept open.
        self.root = root.path
        self.owner = root.owner
        self.name = name
        self.file_id = file_id
        #: The same object for every lock of the process.
        self.content = content
        #: The rights of the thread that took it (:func:`use_thread_rights`), or ``None``.
        self.rights = None if _thread_rights is None else _thread_rights[0]()

    @property
    def path(self) -> str:
        """The lock file's path, for messages."""
        return f"{self.root}/{self.name}"


def _hostname() -> bytes:
    """Return the host name Dovecot writes: ``gethostname()``."""
    return os.fsencode(socket.gethostname())


class _Registry:
    """The session locks this process holds, and the thread that keeps them fresh.

    ``mutex`` is re-entrant: a lock collected without release is released by its finalizer,
    which may run in any thread, inside any allocation, even one made under the mutex.
    """

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.held: dict[_FileId, _Held] = {}
        self.refresher: threading.Thread | None = None
        #: What this process writes into a lock it takes: ``<pid>:<hostname>``.
        self.content = b"%d:%s" % (os.getpid(), _hostname())

    def holds(self, file_id: _FileId) -> bool:
        """Tell whether this process holds the lock file ``file_id``."""
        with self.mutex:
            return file_id in self.held

    def add(self, held: _Held) -> None:
        """Record a lock just taken; start the refresher if it is not running (mutex held)."""
        self.held[held.file_id] = held
        if self.refresher is None:
            self.refresher = threading.Thread(
                target=_refresh_forever, name="pobox-session-lock-refresh", daemon=True
            )
            self.refresher.start()

    def discard(self, held: _Held) -> None:
        """Forget a released lock (a newer lock that reused its inode stays recorded)."""
        with self.mutex:
            if self.held.get(held.file_id) is held:
                del self.held[held.file_id]

    def snapshot(self) -> list[_Held]:
        """Return the locks held now."""
        with self.mutex:
            return list(self.held.values())


_registry = _Registry()


def _reset_in_child() -> None:
    """Start a forked child with no locks: its parent's locks name the parent's PID."""
    global _registry  # noqa: PLW0603 - one registry per process, replaced in a forked child
    _registry = _Registry()


os.register_at_fork(after_in_child=_reset_in_child)


def _refresh_forever() -> None:
    """Touch every held lock each :data:`REFRESH_INTERVAL` seconds (the refresher thread)."""
    while True:
        time.sleep(REFRESH_INTERVAL)
        refresh_session_locks()


def refresh_session_locks() -> int:
    """Touch every session lock this process holds, so none looks stale; return how many.

    A lock whose file is gone or is no longer ours (broken as stale by someone else) is
    skipped: touching it would keep another session's lock fresh on its behalf. Its content
    is compared, not just its inode, which a file created after ours was unlinked may reuse.
    """
    touched = 0
    for held in _registry.snapshot():
        with (
            contextlib.suppress(OSError, StorageError),
            _rights_of(held),
            Dir.open_root(held.root, held.owner) as root,
        ):
            found = _read_lock(root, held.name)
            if found is not None and _is_ours(found, held):
                os.utime(held.name, dir_fd=root.fd, follow_symlinks=False)
                touched += 1
    return touched


def _is_ours(found: _Found, held: _Held) -> bool:
    """Tell whether the lock file ``found`` is the one we created as ``held``."""
    return found.file_id == held.file_id and found.content == held.content


class _Found:
    """A lock file as read: its identity, ``mtime``, names and (up to 511 bytes of) content."""

    __slots__ = ("content", "file_id", "mtime_ns", "nlink")

    def __init__(self, st: os.stat_result, content: bytes | None) -> None:
        self.file_id = (st.st_dev, st.st_ino)
        self.mtime_ns = st.st_mtime_ns
        self.nlink = st.st_nlink
        #: ``None`` when the file cannot be read (another user's lock).
        self.content = content


def _local_pid(content: bytes | None) -> int | None:
    """Return the PID a lock names if it names a process of this host, else ``None``.

    As Dovecot's ``read_local_pid``: one trailing newline is allowed; the host name is all that
    follows the first ``:`` and must be ours; the PID must be a positive decimal number.
    """
    if not content:
        return None
    content = content.removesuffix(b"\n")
    pid, colon, host = content.partition(b":")
    if not colon or host != _hostname() or not pid.isdigit():
        return None
    number = int(pid)
    return number if 0 < number <= _PID_MAX else None


def _alive(pid: int) -> bool:
    """Tell whether process ``pid`` exists (a process of another user exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(found: _Found, now_ns: int) -> bool:
    """Tell whether the lock ``found`` may be broken (the rules are in the module doc)."""
    age_ns = now_ns - found.mtime_ns
    pid = _local_pid(found.content)
    if pid is None:
        return age_ns > STALE_TIMEOUT * _NS
    if pid == os.getpid():
        return not _registry.holds(found.file_id)
    if not _alive(pid):
        return True
    return age_ns > LIVE_PID_STALE_TIMEOUT * _NS


def _read_lock(root: Dir, name: str) -> _Found | None:
    """Return the lock file ``name`` as it is now, ``None`` if there is none.

    A lock file that cannot be read (another user's), or is not a regular file of the owner
    (a link, a FIFO: never followed or opened for reading), is judged by its ``lstat`` alone.

    Raises:
        StorageError: it cannot be looked at.
    """
    try:
        handle = root.open_file(name)
    except StorageError as exc:
        if not isinstance(exc, UnsafeFile) and not isinstance(exc.__cause__, PermissionError):
            raise
        st = root.stat(name)
        if st is None:
            return None
        return _Found(st, None)
    if handle is None:
        return None
    with handle:
        st = handle.stat
        try:
            content = os.read(handle.fd, _CONTENT_MAX)
        except OSError as exc:
            raise storage_error(exc, "read lock file", handle.path) from exc
    return _Found(st, content)


def _create_lock(root: Dir, name: str, *, spare: bool = False) -> _Held | None:
    """Create the lock file ``name`` and record it as held; ``None`` if it exists.

    With ``spare`` (the caller holds the index lock, which every pobox claiming a spare
    takes), the spare a release left is renamed into place if there is one
    (:func:`_claim_spare`); else the file is created. The registry's mutex is held from the
    creation to the record, so no thread of this process sees our PID in a lock file that is
    not yet recorded as ours.

    Raises:
        StorageError: the file cannot be created or written.
    """
    content = _registry.content
    with _registry.mutex:
        if spare:
            claimed = _claim_spare(root, name, content)
            if not isinstance(claimed, _NoSpare):
                return claimed
        fd = root.create(name)
        if fd is None:
            return None
        try:
            try:
                written = os.write(fd, content)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if written != len(content):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            with contextlib.suppress(StorageError):
                root.unlink(name)
            raise storage_error(exc, "write lock file", f"{root.path}/{name}") from exc
        return _record(root, name, (st.st_dev, st.st_ino), content)


def _record(root: Dir, name: str, file_id: _FileId, content: bytes) -> _Held:
    """Record the lock file ``file_id`` as held (the registry's mutex held)."""
    held = _Held(root, name, file_id, content)
    _registry.add(held)
    return held


class _NoSpare:
    """What :func:`_claim_spare` returns when there is no spare to take: create the file."""


_NO_SPARE = _NoSpare()


def spare_name(name: str) -> str:
    """Return the name of the spare of the lock file ``name``."""
    return f"{name}{SPARE_SUFFIX}"


def _claim_spare(root: Dir, name: str, content: bytes) -> _Held | _NoSpare | None:
    """Take the lock ``name`` by renaming the spare into place; ``None`` if the lock exists.

    The caller holds the index lock, so no other pobox writes into the spare meanwhile (and
    Dovecot never does). The spare is opened (no link followed: a regular file of the owner
    with one name), our content written into it, and only then renamed into place: the lock
    appears holding ``<pid>:<host>`` and a fresh ``mtime``, never a past holder's content.
    If what the rename moved is not the file written (the owner swapped the spare), it is
    put back and the lock file is created instead.

    Returns :data:`_NO_SPARE` when there is no usable spare (none, anything else, no
    ``renameat2`` here, or an error before the rename): the caller then creates the file.

    Raises:
        StorageError: the lock that appeared cannot be looked at.
    """
    spare = spare_name(name)
    try:
        fd = root.open_writable(spare)
    except StorageError:  # a link, a FIFO, a directory, another's file, EMFILE: not used
        return _NO_SPARE
    if fd is None:
        return _NO_SPARE
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1:
            return _NO_SPARE  # a second name of another file (a message, a backup's link)
        written = os.pwrite(fd, content, 0)
        if written != len(content):
            return _NO_SPARE
        if st.st_size > written:
            os.ftruncate(fd, written)
        moved = root.rename_exclusive(spare, name)
    except (OSError, StorageError):
        return _NO_SPARE  # nothing renamed: the spare's content is no one's concern
    finally:
        os.close(fd)
    if moved is None:
        return _NO_SPARE
    if not moved:
        return None
    now = root.stat(name)
    if now is None or (now.st_dev, now.st_ino, now.st_nlink) != (st.st_dev, st.st_ino, 1):
        if now is not None and root.rename_exclusive(name, spare) is not True:
            return None  # broken and taken meanwhile, or cannot be put back: locked
        return _NO_SPARE
    return _record(root, name, (st.st_dev, st.st_ino), content)


class SessionLock:
    """The exclusive, non-blocking lock a session holds on its maildrop: a Dovecot dotlock.

    It holds no file descriptor (see the module documentation). Released by :meth:`release`,
    or when the object is garbage-collected, so a session that forgets to close cannot keep a
    maildrop locked for the life of the process.
    """

    def __init__(self, root: Dir, name: str, guard: str, *, timeout: float) -> None:
        """Take the lock ``name`` in ``root``, breaking a stale one while holding ``guard``.

        Args:
            root: the maildir (its descriptor is used only during this call).
            name: the lock file (``dovecot-pop3-session.lock``).
            guard: the ``flock`` file that serializes breaking stale locks among pobox
                processes (the index lock).
            timeout: how long to wait for ``guard`` at most.

        Raises:
            MaildropLocked: another session (in this process or another) holds the lock.
            StorageTemporaryError: ``guard`` stayed busy for ``timeout`` seconds.
            StorageError: the lock file cannot be created, read or removed.
        """
        held = _take(root, name, guard, timeout)
        self._finalizer = weakref.finalize(self, _release, held)

    @classmethod
    def take_if_free(cls, root: Dir, name: str, *, spare: bool = False) -> SessionLock | None:
        """Take the lock if no lock file exists; ``None`` if one does (locked, or stale).

        A few system calls and no waiting, so it may run in the event loop's thread.
        ``spare``: the caller holds the index lock, so the spare may be renamed into place.

        Raises:
            StorageError: the lock file cannot be created.
        """
        held = _create_lock(root, name, spare=spare)
        if held is None:
            return None
        lock = cls.__new__(cls)
        lock._finalizer = weakref.finalize(lock, _release, held)
        return lock

    def release(self) -> None:
        """Release the lock; safe to call more than once."""
        self._finalizer()


def _take(root: Dir, name: str, guard: str, timeout: float) -> _Held:
    """Create the lock file, or break a stale one and create it (see :class:`SessionLock`)."""
    for _ in range(_ATTEMPTS):
        held = _create_lock(root, name)
        if held is not None:
            return held
        found = _read_lock(root, name)
        if found is None:
            continue  # released meanwhile
        if not _is_stale(found, time.time_ns()):
            break
        with flocked(root, guard, timeout=timeout):
            again = _read_lock(root, name)
            if again is not None:
                if not _is_stale(again, time.time_ns()):
                    break
                root.unlink(name)
            held = _create_lock(root, name, spare=True)
        if held is not None:
            return held
    msg = f"maildrop {root.path} is locked by another session"
    raise MaildropLocked(msg)


def _release(held: _Held) -> None:
    """Give up a lock file if it is still ours, then forget it; never raises."""
    try:
        with _rights_of(held), Dir.open_root(held.root, held.owner) as root:
            _give_up(root, held)
    except (OSError, StorageError):
        pass  # already gone, or no longer ours
    finally:
        _registry.discard(held)


def _give_up(root: Dir, held: _Held) -> None:
    """Make the lock file the spare if it is ours (else leave it); unlink it if that fails.

    The file keeps our content: a crash at any point leaves a lock naming a dead process
    (broken at once) or a spare, never an empty lock. Where a spare exists already, the
    file has a second name, or the rename fails (no ``renameat2``, a full disk, ...), the
    lock is unlinked as before.

    Raises:
        StorageError: it cannot be looked at or removed.
    """
    found = _read_lock(root, held.name)
    if found is None or not _is_ours(found, held):
        return
    if found.nlink == 1:
        try:
            if root.rename_exclusive(held.name, spare_name(held.name)):
                return
        except StorageError:
            pass
    root.unlink(held.name)
