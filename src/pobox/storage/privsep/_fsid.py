"""Per-thread filesystem credentials: run file operations with a user's rights in one thread.

Linux checks file access against a thread's *filesystem* uid and gid (``setfsuid(2)``,
``setfsgid(2)``), which follow the effective ids unless set apart. Unlike ``setuid(2)``, whose
glibc wrapper changes every thread of the process, the glibc wrappers of ``setfsuid`` and
``setfsgid`` are plain system calls: they change the calling thread only. So one root process
can run each operation in a worker thread under the mail owner's fsuid/fsgid while its other
threads keep theirs, and the kernel itself enforces the owner's rights on every path
resolved, file opened, created, renamed or removed. When the fsuid goes from 0 to another
value the kernel also clears the thread's filesystem capabilities (``CAP_DAC_OVERRIDE``,
``CAP_DAC_READ_SEARCH``, ``CAP_FOWNER``, ``CAP_CHOWN``, ... see ``capabilities(7)``), so root's
override does not apply; going back to 0 restores them.

The calls never report an error: they return the previous value. :func:`owner_rights`
therefore calls each twice and compares, and raises :class:`CredentialsError` if the kernel
did not take the value (no ``CAP_SETUID``); a failure to switch *back* is fatal for the
thread and, in the helper, for the process.

The process must have no supplementary groups while it does this (the helper clears them
at start): they are per process in practice (glibc's ``setgroups`` changes every thread)
and would add their rights to the owner's.

May import: the standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CredentialsError", "become", "current_fs_ids", "owner_rights", "thread_ids"]


class CredentialsError(OSError):
    """The kernel did not take (or give back) a thread's filesystem credentials."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_setfsuid = _libc.setfsuid
_setfsuid.argtypes = [ctypes.c_uint]
_setfsuid.restype = ctypes.c_int
_setfsgid = _libc.setfsgid
_setfsgid.argtypes = [ctypes.c_uint]
_setfsgid.restype = ctypes.c_int


def _set(call: ctypes._NamedFuncPointer, value: int, what: str) -> int:
    """Set one filesystem id of the calling thread; return the previous one.

    Raises:
        CredentialsError: the kernel kept another value.
    """
    previous = int(call(value))
    now = int(call(value))  # returns the current value: ours if the first call took
    if now != value:
        msg = f"set{what}({value}) was refused (it is {now})"
        raise CredentialsError(msg)
    return previous


#: The filesystem ids :func:`become` last gave each thread (a thread starts with the process's).
_threads = threading.local()


def become(uid: int, gid: int) -> None:
    """Make the calling thread's filesystem ids ``uid``/``gid``, and leave them so.

    For a worker thread that only ever does file work for owners: it keeps the last owner's
    ids between operations (with fewer rights than root's, never more) and changes them only
    for another owner, two checked system calls each, instead of four there and four back.

    Raises:
        CredentialsError: the kernel did not take them (the thread's ids are then unknown:
            stop using it).
    """
    if getattr(_threads, "ids", None) == (uid, gid):
        return
    _threads.ids = None  # unknown until both calls took
    _set(_setfsgid, gid, "fsgid")
    _set(_setfsuid, uid, "fsuid")
    _threads.ids = (uid, gid)


def thread_ids() -> tuple[int, int] | None:
    """Return the ids :func:`become` gave the calling thread, ``None`` if it gave none."""
    ids: tuple[int, int] | None = getattr(_threads, "ids", None)
    return ids


def current_fs_ids() -> tuple[int, int]:
    """Return the calling thread's (fsuid, fsgid), as the kernel reports them."""
    fsuid = fsgid = -1
    with open("/proc/thread-self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Uid:"):
                fsuid = int(line.split()[4])
            elif line.startswith(b"Gid:"):
                fsgid = int(line.split()[4])
    return fsuid, fsgid


@contextmanager
def owner_rights(uid: int, gid: int) -> Iterator[None]:
    """Run the block with the calling thread's filesystem ids set to ``uid``/``gid``.

    The group is set first and restored last, the usual order of credential changes.

    Raises:
        CredentialsError: the ids could not be set (the block does not run), or could not be
            restored (the thread's credentials are unknown: stop using the thread).
    """
    known = getattr(_threads, "ids", None)
    _threads.ids = None
    old_gid = _set(_setfsgid, gid, "fsgid")
    try:
        old_uid = _set(_setfsuid, uid, "fsuid")
    except BaseException:
        _set(_setfsgid, old_gid, "fsgid")
        _threads.ids = known
        raise
    try:
        yield
    finally:
        _set(_setfsuid, old_uid, "fsuid")
        _set(_setfsgid, old_gid, "fsgid")
        _threads.ids = known
