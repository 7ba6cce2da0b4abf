"""Filesystem primitives of the Maildir backend: error mapping, locks, atomic replace.

Everything here blocks and is called from worker threads (``asyncio.to_thread``).

Error mapping: an :class:`OSError` becomes a :class:`~pobox.storage.base.StoragePermanentError`
when retrying cannot help without an administrator (``EACCES``, ``EPERM``, ``ENOTDIR``,
``EROFS``, ...) and a :class:`~pobox.storage.base.StorageTemporaryError` otherwise (``EIO``,
``ENOSPC``, ``EDQUOT``, ``EAGAIN``, ``EMFILE``, ...). The message names the operation and path.

Locks are ``flock(2)`` locks on files inside the maildir. The kernel drops them when their
descriptor is closed, including when the process dies, so a crashed session never blocks a
maildrop; and two ``open()`` calls of one file conflict even within a process, so two sessions
of one pobox process exclude each other.

May import: the standard library and :mod:`pobox.storage.base`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

from pobox.storage.base import (
    MaildropLocked,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
)

__all__ = [
    "SessionLock",
    "fsync_directory",
    "held_lock",
    "os_errors",
    "replace_file",
    "storage_error",
]

_PERMANENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EROFS,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.EINVAL,
    }
)


def storage_error(exc: OSError, action: str, path: Path | str) -> StorageError:
    """Return the storage error that ``exc``, raised while doing ``action`` on ``path``, maps to."""
    code = exc.errno
    name = errno.errorcode.get(code, "unknown error") if code is not None else "unknown error"
    reason = exc.strerror or str(exc)
    message = f"cannot {action} {path}: {reason} ({name})"
    if code in _PERMANENT_ERRNOS:
        return StoragePermanentError(message)
    return StorageTemporaryError(message)


@contextlib.contextmanager
def os_errors(action: str, path: Path | str) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a storage error."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, action, path) from exc


class SessionLock:
    """The exclusive, non-blocking lock a session holds on its maildrop.

    Released by :meth:`release`, or when the object is garbage-collected, so a session that
    forgets to close cannot keep a maildrop locked for the life of the process.
    """

    def __init__(self, path: Path) -> None:
        """Take the lock on ``path``, creating the file if needed.

        Raises:
            MaildropLocked: another session (in this process or another) holds the lock.
            StorageError: the lock file cannot be created, opened or locked.
        """
        with os_errors("open lock file", path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            msg = f"maildrop {path.parent} is locked by another session"
            raise MaildropLocked(msg) from None
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, "lock", path) from exc
        self._finalizer = weakref.finalize(self, _release, fd)

    def release(self) -> None:
        """Release the lock; safe to call more than once."""
        self._finalizer()


def _release(fd: int) -> None:
    """Unlock and close a lock file descriptor."""
    # Closing the descriptor drops the flock; unlocking first makes it explicit.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting for it if needed.

    This guards the read-modify-write of the index, which is short, so waiting is fine.
    """
    with os_errors("open lock file", path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with os_errors("lock", path):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _release(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Writes a temporary file next to it, fsyncs it, renames it over ``path`` and fsyncs the
    directory: a crash leaves either the old or the new file, never a mix.
    """
    temporary = path.with_name(f"{path.name}.tmp")
    with os_errors("write", temporary):
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    with os_errors("rename", temporary):
        os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (creations, renames, unlinks) to disk."""
    with os_errors("sync directory", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
