"""Locks on an mbox spool that MTAs and MUAs on the same machine respect.

Three locks, as Dovecot takes them with ``mbox_read_locks = fcntl`` and
``mbox_write_locks = dotlock fcntl`` (and as Debian Policy §22.6 requires of every program
that writes to ``/var/mail``: a dotlock and ``fcntl``):

* **The dotlock** ``<spool>.lock``, beside the spool: created with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` (so a link of that name, planted by the user, is never followed and counts as
  a held lock), holding ``PID:HOST`` as Dovecot's do. A dotlock not changed for
  :data:`DOTLOCK_STALE` seconds (Dovecot's ``mbox_dotlock_change_timeout``, 2 minutes), or
  naming a process of this host that no longer exists (a crashed pobox or Dovecot), is stale
  and removed (the name itself, never what a link points to). Taken for every change of
  the spool (delivery, rewrite); not to read it.
* **An fcntl lock** on the spool itself, after the dotlock: a write lock to append or
  rewrite, a read lock to read. Linux's open file description locks (``F_OFD_SETLK``), which
  conflict with the classic ``fcntl``/``lockf`` locks of other processes exactly as those do,
  but belong to the descriptor, not to the process (a classic lock is dropped when *any*
  descriptor of the file is closed by any thread of the process).
* **The session lock**: a ``flock`` on ``.<spool>.pobox-session``, held from a locked open to
  close (RFC 1939 §8), so a second POP3 session is refused at once (``[IN-USE]``) while MTAs
  still deliver: it is not one of the locks they take.

Waits are bounded: a busy dotlock or fcntl lock is retried (a few milliseconds, doubling up
to 50) for at most the store's ``lock_timeout``, then the operation fails with
:class:`~pobox.storage.base.StorageTemporaryError` (``[SYS/TEMP]``). These waits run in a
worker thread, never in the event loop.

May import: the standard library and :mod:`pobox.storage`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator

from pobox.storage._safefs import Dir, storage_error, write_all
from pobox.storage.base import MaildropLocked, StorageError, StorageTemporaryError

__all__ = ["DOTLOCK_STALE", "dotlocked", "fcntl_locked", "session_lock"]

#: A dotlock unchanged this long is stale (Dovecot's ``mbox_dotlock_change_timeout``).
DOTLOCK_STALE = 120.0
_RETRY_FIRST = 0.002
_RETRY_MAX = 0.05
#: ``F_OFD_SETLK`` (Linux 3.15); Python has it as ``fcntl.F_OFD_SETLK`` on Linux.
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)


def _pauses(timeout: float) -> Iterator[float]:
    """Yield how long to sleep before each retry, until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    pause = _RETRY_FIRST
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(pause, left)
        pause = min(pause * 2, _RETRY_MAX)


@contextlib.contextmanager
def dotlocked(directory: Dir, spool: str, *, timeout: float) -> Iterator[None]:
    """Hold the dotlock ``<spool>.lock`` of ``directory`` for the block.

    Raises:
        StorageTemporaryError: it stayed held by someone else for ``timeout`` seconds.
        StorageError: it cannot be created or removed (no write permission, ...).
    """
    name = f"{spool}.lock"
    pauses = _pauses(timeout)
    while True:
        fd = directory.create(name, 0o600)
        if fd is not None:
            break
        held = directory.stat(name)
        if held is not None and (
            time.time() - held.st_mtime >= DOTLOCK_STALE or _holder_is_gone(directory, name)
        ):
            directory.unlink(name)
            continue
        pause = next(pauses, None)
        if pause is None:
            msg = f"{directory.path}/{name} is held by another program for more than {timeout:g} s"
            raise StorageTemporaryError(msg)
        time.sleep(pause)
    try:
        try:
            write_all(fd, f"{os.getpid()}:{socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
        yield
    finally:
        with contextlib.suppress(StorageError):
            directory.unlink(name)


def _holder_is_gone(directory: Dir, name: str) -> bool:
    """Tell whether the dotlock ``name`` names a process of this host that no longer exists.

    Dovecot's and pobox's dotlocks hold ``PID:HOST`` (or a bare PID); a lock that is a link,
    not the owner's, unreadable or holding anything else is judged by its age only.
    """
    try:
        text = directory.read_file(name, 256)
    except StorageError:
        return False
    if text is None:
        return False
    pid_text, _, host = text.decode("ascii", "replace").strip().partition(":")
    if not pid_text.isdigit() or int(pid_text) <= 1 or host not in {"", socket.gethostname()}:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _flock_struct(kind: int) -> bytes:
    """Return a ``struct flock`` for the whole file (``l_pid`` 0, as OFD locks need)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


@contextlib.contextmanager
def fcntl_locked(fd: int, path: str, *, write: bool, timeout: float) -> Iterator[None]:
    """Hold an fcntl lock (OFD) on the whole of ``fd`` for the block.

    Raises:
        StorageTemporaryError: another process held a conflicting lock for ``timeout`` seconds.
    """
    kind = fcntl.F_WRLCK if write else fcntl.F_RDLCK
    pauses = _pauses(timeout)
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, _flock_struct(kind))
            break
        except (BlockingIOError, PermissionError):
            pause = next(pauses, None)
            if pause is None:
                msg = f"{path} is locked (fcntl) by another program for more than {timeout:g} s"
                raise StorageTemporaryError(msg) from None
            time.sleep(pause)
        except OSError as exc:
            raise storage_error(exc, "lock", path) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_OFD_SETLK, _flock_struct(fcntl.F_UNLCK))


def session_lock(directory: Dir, spool: str) -> int:
    """Take the session lock of ``spool`` at once; return the descriptor that holds it.

    :func:`~pobox.storage._safefs.unlock_and_close` releases it (closing alone may not, while
    a child process forked meanwhile still holds a copy of the descriptor).

    Raises:
        MaildropLocked: another session holds it.
        StorageError: the lock file cannot be opened.
    """
    name = f".{spool}.pobox-session"
    fd = directory.open_writable(name, create=True)
    assert fd is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        msg = f"{directory.path}/{spool} is in use by another POP3 session"
        raise MaildropLocked(msg) from None
    except OSError as exc:
        os.close(fd)
        raise storage_error(exc, "lock", f"{directory.path}/{name}") from exc
    return fd
