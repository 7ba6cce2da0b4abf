"""Every file operation under a maildir, made safe against the user who owns the maildir.

Threat model: the user whose mail this is controls everything *inside* the maildir root. They
may replace any file or directory there by a symbolic link (to ``/etc/shadow``, to another
user's mail), a FIFO, a device, a hard link, a file far larger than its name says, and they may
do it at any moment, between any two system calls. Nothing pobox does there may then read,
write, create or remove anything outside the maildir, or anything the owner could not touch
themselves, nor wait without a bound. (What the *admin* configures above the root is trusted:
the root may be reached through symbolic links, as when ``~/Maildir`` points at a data disk.)

The rules, each kept in this one module (the Maildir store, its index and locks, and delivery
use nothing else to touch files):

* The root is opened by its path (following links above it and at it), then ``fstat``: it must
  be a directory owned by the *owner*, the uid the mail is accessed with (a root owned by
  anyone else, e.g. ``~/Maildir -> /etc`` or ``-> /home/bob/Maildir``, is refused).
* A Maildir++ folder (``.Junk``) is opened as the root, then the folder below it, by
  descriptor, as every other directory below the root (:class:`FolderPath`): a folder
  replaced by a link (``.Junk -> /home/bob/Maildir``) is refused, never followed.
* Everything below it is reached from a directory descriptor, one name at a time (a name with
  ``/`` or NUL, or ``.``/``..``, is refused), with ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC``
  (directories ``O_DIRECTORY | O_NOFOLLOW``), and through ``openat2(2)`` with
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` where the kernel has it
  (probed once; else plain ``openat``). A symbolic link is therefore never followed below the
  root, and a FIFO never blocks an ``open``.
* After ``open``, ``fstat``: a file must be a regular file (``S_ISREG``) owned by the owner, a
  directory a directory owned by the owner; anything else raises :class:`UnsafeFile`. A hard
  link to someone else's file is caught by the owner check.
* Sizes come from ``fstat``, never from a file name; a read never goes past the size the
  file had when it was opened (a file growing under us is read up to that size).
* Files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to their directory's
  descriptor; renames, links and unlinks are relative to descriptors and never follow a link;
  directories are fsynced through their descriptors.
* No lock waits without a bound: :func:`flocked` retries ``LOCK_NB`` until a deadline, then
  raises :class:`LockBusy` (a :class:`~pobox.storage.base.StorageTemporaryError`); with a
  deadline of 0 it tries once, for callers that wait elsewhere (the asyncio store waits in
  the event loop, so no thread ever sleeps on a lock).

Files pobox creates belong to the owner: a process that is root (euid 0) acting for another
owner gives each file or directory it has just created (``O_EXCL``, ``mkdirat``) to the owner
(``fchown`` of the descriptor, the root's group). Any other process creates them with its own
uid, which must be the owner.

Error mapping: an :class:`OSError` becomes a :class:`~pobox.storage.base.StoragePermanentError`
when retrying cannot help without an administrator (``EACCES``, ``EPERM``, ``ENOTDIR``,
``EROFS``, ``ELOOP``, ...) and a :class:`~pobox.storage.base.StorageTemporaryError` otherwise
(``EIO``, ``ENOSPC``, ``EDQUOT``, ``EAGAIN``, ``EMFILE``, ...). Messages name the operation and
the path.

Everything here blocks (briefly: no call waits for another process except :func:`flocked`, up
to its timeout) and may run in any thread.

May import: the standard library and :mod:`pobox.storage.base`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

from pobox.storage.base import StorageError, StoragePermanentError, StorageTemporaryError

__all__ = [
    "CHUNK_SIZE",
    "Dir",
    "FolderPath",
    "LockBusy",
    "OpenFile",
    "UnsafeFile",
    "check_name",
    "flocked",
    "flocked_if_free",
    "open_by_real_path",
    "openat2_available",
    "os_errors",
    "read_chunks",
    "read_upto",
    "storage_error",
    "unlock_and_close",
]

#: Chunks :func:`read_chunks` reads.
CHUNK_SIZE = 256 * 1024

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
        errno.EXDEV,
    }
)


class UnsafeFile(StoragePermanentError):
    """A file or directory of a maildir is not what it must be, and was not used.

    A symbolic link, a FIFO, a device or a socket where a file or directory belongs, or an
    object owned by someone other than the owner. Refused, never followed or read.
    """


def storage_error(exc: OSError, action: str, path: object) -> StorageError:
    """Return the storage error that ``exc``, raised while doing ``action`` on ``path``, maps to."""
    code = exc.errno
    name = errno.errorcode.get(code, "unknown error") if code is not None else "unknown error"
    reason = exc.strerror or str(exc)
    message = f"cannot {action} {path}: {reason} ({name})"
    if code == errno.ELOOP:
        return UnsafeFile(f"cannot {action} {path}: a symbolic link is on its way (ELOOP)")
    if code == errno.ENXIO:
        return UnsafeFile(f"cannot {action} {path}: not a regular file (ENXIO: a socket?)")
    if code in _PERMANENT_ERRNOS:
        return StoragePermanentError(message)
    return StorageTemporaryError(message)


@contextlib.contextmanager
def os_errors(action: str, path: object) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a storage error."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, action, path) from exc


def check_name(name: str) -> str:
    """Return ``name`` if it is one path component, else raise :class:`UnsafeFile`.

    A component is not empty, not ``.`` or ``..``, and holds neither ``/`` nor NUL.
    """
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        msg = f"refusing the file name {name!r}: not a single path component"
        raise UnsafeFile(msg)
    return name


# --------------------------------------------------------------------------- openat2(2)

#: ``openat2(2)``'s system call number: the same on every Linux architecture (it came after
#: the numbering was unified, in Linux 5.6).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    """``struct open_how`` (``linux/openat2.h``)."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


class _Openat2:
    """``openat2(2)`` through ``syscall(2)``, if this kernel (and its seccomp filter) has it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probed = False
        self._syscall: Callable[..., int] | None = None
        #: Tests switch it off to exercise the ``openat`` fallback.
        self.enabled = True
        #: ``struct open_how`` by reference, one per (flags, mode, resolve) ever used: a few,
        #: built once and never written to again (the kernel only reads them).
        self._hows: dict[tuple[int, int, int], Any] = {}

    def available(self) -> bool:
        """Tell whether ``openat2`` works here (probed on first use)."""
        if not self._probed:
            with self._lock:
                if not self._probed:
                    self._syscall = _probe_openat2()
                    self._probed = True
        return self.enabled and self._syscall is not None

    def open(self, dir_fd: int, path: bytes, flags: int, mode: int, resolve: int = _RESOLVE) -> int:
        """Open ``path`` beneath ``dir_fd`` following no link; raise :class:`OSError`."""
        syscall = self._syscall
        assert syscall is not None
        how = self._hows.get((flags, mode, resolve))
        if how is None:
            # openat2 refuses a mode without O_CREAT or O_TMPFILE (which includes O_DIRECTORY).
            creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
            how = ctypes.byref(_OpenHow(flags, mode if creates else 0, resolve))
            self._hows[flags, mode, resolve] = how
        fd = syscall(_SYS_OPENAT2, dir_fd, path, how, _OPEN_HOW_SIZE)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return int(fd)


def _probe_openat2() -> Callable[..., int] | None:
    """Return ``syscall`` if ``openat2`` opens ``.`` beneath ``/``, else ``None``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    # Declared, so that calls convert plain ints without building ctypes objects each time
    # (glibc's syscall() reads its arguments as longs from the registers either way).
    syscall.argtypes = (
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
    )
    try:
        base = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE)
        fd = syscall(_SYS_OPENAT2, base, b".", ctypes.byref(how), _OPEN_HOW_SIZE)
        if fd < 0:
            return None  # ENOSYS (old kernel), EPERM (seccomp), E2BIG, ...
        os.close(int(fd))
        return syscall
    finally:
        os.close(base)


_OPEN_HOW_SIZE = ctypes.sizeof(_OpenHow)
_openat2 = _Openat2()


#: ``renameat2(2)``'s flag: fail with ``EEXIST`` rather than replace the target.
_RENAME_NOREPLACE = 1
#: Where ``renameat2`` fails this way, this kernel or filesystem cannot do it.
_RENAMEAT2_MISSING = frozenset({errno.ENOSYS, errno.EINVAL, errno.EPERM})


def _find_renameat2() -> Callable[..., int] | None:
    """Return glibc's ``renameat2`` (2.28 and later), or ``None`` without it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    path = ctypes.c_char_p
    function.argtypes = (ctypes.c_int, path, ctypes.c_int, path, ctypes.c_uint)
    return function


_renameat2 = _find_renameat2()


def openat2_available() -> bool:
    """Tell whether opens go through ``openat2(2)`` with ``RESOLVE_BENEATH`` and friends."""
    return _openat2.available()


def _open_beneath(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """Open the single component ``name`` of ``dir_fd``, never following a link.

    Raises:
        OSError: as ``open(2)``; ``ELOOP`` for a symbolic link.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _openat2.available():
        return _openat2.open(dir_fd, os.fsencode(name), flags, mode)
    return os.open(name, flags, mode, dir_fd=dir_fd)


# --------------------------------------------------------------------------- files

#: For :func:`open_by_real_path`: no link anywhere on the path.
_RESOLVE_NO_LINKS = _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
#: ``AT_FDCWD``: an absolute path ignores it.
_AT_FDCWD = -100


def open_by_real_path(real_root: str, owner: int, *names: str) -> OpenFile | None:
    """Open ``names`` below a maildir known by its real path in one ``openat2(2)``, if possible.

    The fast way to a message for a caller that opened the maildir the careful way once
    (:meth:`Dir.real_path`): one system call with ``RESOLVE_NO_SYMLINKS`` on the whole path,
    which has no link in it by construction. A link anywhere on the path (the user's, or an
    admin's new one above the maildir), a missing file or a kernel without ``openat2`` give
    ``None``: take the careful way (:meth:`Dir.open_root`, :meth:`Dir.open_file`), which
    tells those cases apart. What is opened must be a regular file of ``owner``, as always.

    Raises:
        UnsafeFile: it is not a regular file of ``owner``.
    """
    if not _openat2.available():
        return None
    for name in names:
        check_name(name)
    try:
        fd = _openat2.open(
            _AT_FDCWD,
            os.fsencode("/".join((real_root, *names))),
            os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
            0,
            _RESOLVE_NO_LINKS,
        )
    except OSError:
        return None
    try:
        st = _checked(fd, stat.S_IFREG, owner, real_root, names)
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, st, real_root, names)


def read_upto(fd: int, size: int) -> bytes:
    """Read from ``fd``'s offset until ``size`` octets or the end of the file, whichever first.

    Raises:
        OSError: the read failed.
    """
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    parts = [data]
    left = size - len(data)
    while left:
        more = os.read(fd, left)
        if not more:
            break
        parts.append(more)
        left -= len(more)
    return b"".join(parts)


def read_chunks(fd: int, size: int, chunk: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield at most ``size`` octets of ``fd`` from its offset, in chunks of up to ``chunk``.

    Raises:
        OSError: a read failed.
    """
    left = size
    while left > 0:
        data = os.read(fd, min(chunk, left))
        if not data:
            return
        left -= len(data)
        yield data


class _Descriptor:
    """Something holding one file descriptor: closed by :meth:`close` or a ``with`` block."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        """Close the descriptor; safe to call more than once."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        """Return this; it is closed at the end of the block."""
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the descriptor."""
        self.close()


class OpenFile(_Descriptor):
    """A regular file of the owner, open for reading, and its size when it was opened.

    Read it with :meth:`read` or :meth:`chunks`, which never go past :attr:`size`; hand the
    descriptor on with :meth:`detach`. Close it (or use it as a context manager).
    """

    __slots__ = ("_where", "size", "stat")

    def __init__(self, fd: int, st: os.stat_result, base: str, names: tuple[str, ...]) -> None:
        super().__init__(fd)
        self.stat = st
        #: ``st_size`` at open: reads stop there.
        self.size = st.st_size
        self._where = (base, names)

    @property
    def path(self) -> str:
        """The file's path, for messages."""
        return _joined(*self._where)

    def read(self) -> bytes:
        """Return the whole file, up to :attr:`size` octets.

        Raises:
            StorageError: the read failed.
        """
        with os_errors("read", self.path):
            return read_upto(self.fd, self.size)

    def chunks(self, chunk: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the file up to :attr:`size` octets in chunks.

        Raises:
            StorageError: a read failed.
        """
        with os_errors("read", self.path):
            yield from read_chunks(self.fd, self.size, chunk)

    def detach(self) -> int:
        """Return the descriptor, which the caller now owns (and must close)."""
        fd, self.fd = self.fd, -1
        return fd


def _joined(base: str, names: tuple[str, ...]) -> str:
    """Return ``base/names...`` (paths are built only for messages, and only when needed)."""
    return "/".join((base, *names))


def _check(st: os.stat_result, kind: int, owner: int, path: str) -> None:
    """Raise :class:`UnsafeFile` unless ``st`` is of type ``kind`` and belongs to ``owner``."""
    if stat.S_IFMT(st.st_mode) != kind:
        what = "regular file" if kind == stat.S_IFREG else "directory"
        msg = f"refusing {path}: not a {what} (mode {st.st_mode:o})"
        raise UnsafeFile(msg)
    if st.st_uid != owner:
        msg = f"refusing {path}: owned by uid {st.st_uid}, not by the mail's owner uid {owner}"
        raise UnsafeFile(msg)


def _checked(fd: int, kind: int, owner: int, base: str, names: tuple[str, ...]) -> os.stat_result:
    """Return ``fstat`` of ``fd`` if it is a ``kind`` of ``owner``, else raise.

    Raises:
        UnsafeFile: it is not.
        StorageError: ``fstat`` failed.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise storage_error(exc, "stat", _joined(base, names)) from exc
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != owner:
        _check(st, kind, owner, _joined(base, names))
    return st


class FolderPath(str):
    """The path of a Maildir++ folder: a maildir root, and one directory name below it.

    It is the text ``<maildir>/<folder>`` (for caches, messages and logs), and wherever a root
    path goes (:meth:`Dir.open_root`), the folder is opened below the root the careful way
    (:meth:`Dir.sub`: never through a link, a directory of the owner), since it is the
    user's ground while the root's path is the admin's.
    """

    maildir: str
    folder: str

    def __new__(cls, maildir: str | os.PathLike[str], folder: str) -> Self:
        """Name ``folder`` (one name, :func:`check_name`) of the maildir at ``maildir``."""
        check_name(folder)
        base = os.fspath(maildir)
        self = super().__new__(cls, f"{base.rstrip('/')}/{folder}")
        self.maildir = base
        self.folder = folder
        return self


class Dir(_Descriptor):
    """An open directory of a maildir, owned by the owner: the handle every operation starts from.

    Get the root with :meth:`open_root`, subdirectories with :meth:`sub`. Close it (or use it as
    a context manager); it holds one descriptor.
    """

    __slots__ = ("gid", "owner", "path")

    def __init__(self, fd: int, path: str, owner: int, gid: int) -> None:
        super().__init__(fd)
        #: For error messages and logs only; never opened again.
        self.path = path
        #: The uid every file and directory used here must have.
        self.owner = owner
        #: The group files created for another owner are given (the root's group).
        self.gid = gid

    # --- opening directories -----------------------------------------------------------

    @classmethod
    def open_root(cls, path: str | os.PathLike[str], owner: int) -> Dir:
        """Open a maildir root: by its path, links followed, and owned by ``owner``.

        A :class:`FolderPath` opens its maildir root so, then the folder below it with
        :meth:`sub` (no link followed).

        Raises:
            StorageError: it cannot be opened (``ENOENT`` as the cause when missing).
            UnsafeFile: it is not a directory of ``owner``.
        """
        if isinstance(path, FolderPath):
            with cls.open_root(path.maildir, owner) as parent:
                return parent.sub(path.folder)
        text = os.fspath(path)
        try:
            fd = os.open(text, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise storage_error(exc, "open maildir", text) from exc
        try:
            st = _checked(fd, stat.S_IFDIR, owner, text, ())
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, text, owner, st.st_gid)

    def sub(self, name: str, *, create: bool = False) -> Dir:
        """Open the subdirectory ``name`` (never a link), creating it (mode 0700) if asked.

        Raises:
            StorageError: it cannot be opened (``ENOENT`` as the cause when missing).
            UnsafeFile: it is a link, or not a directory of the owner.
        """
        check_name(name)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
        try:
            fd = _open_beneath(self.fd, name, flags)
        except FileNotFoundError:
            if not create:
                with os_errors("open directory", self._join(name)):
                    raise
            self.make_dir(name)
            with os_errors("open directory", self._join(name)):
                fd = _open_beneath(self.fd, name, flags)
        except NotADirectoryError as exc:
            msg = f"refusing {self._join(name)}: not a directory (a link, or a file)"
            raise UnsafeFile(msg) from exc
        except OSError as exc:
            raise storage_error(exc, "open directory", self._join(name)) from exc
        path = self._join(name)
        try:
            _checked(fd, stat.S_IFDIR, self.owner, self.path, (name,))
        except BaseException:
            os.close(fd)
            raise
        return Dir(fd, path, self.owner, self.gid)

    def real_path(self) -> str | None:
        """Return the path the kernel has for this directory now, ``None`` if it has none.

        Read from ``/proc/self/fd`` (one system call); it has no link in it. ``None`` without
        ``/proc``, or when the directory was removed.
        """
        try:
            path = os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return None
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return None
        return path

    def make_dir(self, name: str, mode: int = 0o700) -> bool:
        """Create the subdirectory ``name``; ``False`` if something of that name exists.

        What is made is given to the owner (see :meth:`_give`). The caller opens it with
        :meth:`sub`, which checks what it is.

        Raises:
            StorageError: it cannot be created.
        """
        check_name(name)
        try:
            os.mkdir(name, mode, dir_fd=self.fd)
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage_error(exc, "create directory", self._join(name)) from exc
        if os.geteuid() != self.owner:
            path = self._join(name)
            with os_errors("give to its owner", path):
                fd = _open_beneath(self.fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
            try:
                with os_errors("stat directory", path):
                    self._give(fd, os.fstat(fd), path)
            finally:
                os.close(fd)
        return True

    # --- files -------------------------------------------------------------------------

    def open_file(self, *names: str) -> OpenFile | None:
        """Open a regular file of the owner for reading; ``None`` if it (or a directory) is missing.

        ``names`` are the components below this directory (``"cur", name``): intermediate
        directories are never links either.

        Raises:
            UnsafeFile: a component is a link, or the file is not a regular file of the owner.
            StorageError: it cannot be opened or examined.
        """
        for name in names:
            check_name(name)
        flags = os.O_RDONLY | os.O_NONBLOCK
        try:
            if len(names) == 1:
                fd = _open_beneath(self.fd, names[0], flags)
            elif _openat2.available():
                fd = _openat2.open(
                    self.fd, os.fsencode("/".join(names)), flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0
                )
            else:
                fd = self._walk_open(names, flags)
        except FileNotFoundError:
            return None
        except NotADirectoryError as exc:
            msg = f"refusing {self._join(*names)}: a directory on the way is not one (a link?)"
            raise UnsafeFile(msg) from exc
        except OSError as exc:
            raise storage_error(exc, "open", self._join(*names)) from exc
        try:
            st = _checked(fd, stat.S_IFREG, self.owner, self.path, names)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, st, self.path, names)

    def _walk_open(self, names: tuple[str, ...], flags: int) -> int:
        """Open ``names`` one component at a time with ``O_NOFOLLOW`` (no ``openat2``)."""
        parent = self.fd
        opened: list[int] = []
        try:
            for name in names[:-1]:
                parent = _open_beneath(parent, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
                opened.append(parent)
            return _open_beneath(parent, names[-1], flags)
        finally:
            for fd in opened:
                os.close(fd)

    def read_file(self, name: str, limit: int) -> bytes | None:
        """Return a small file of the owner whole; ``None`` if it does not exist.

        Raises:
            UnsafeFile: it is not a regular file of the owner.
            StoragePermanentError: it is larger than ``limit`` octets.
            StorageError: it cannot be read.
        """
        handle = self.open_file(name)
        if handle is None:
            return None
        with handle:
            if handle.size > limit:
                msg = f"refusing {handle.path}: {handle.size} octets, more than {limit}"
                raise StoragePermanentError(msg)
            return handle.read()

    def create(self, name: str, mode: int = 0o600) -> int | None:
        """Create the file ``name`` (``O_EXCL``), open for writing; ``None`` if it exists.

        Raises:
            StorageError: it cannot be created.
        """
        check_name(name)
        try:
            fd = _open_beneath(self.fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            return None
        except OSError as exc:
            raise storage_error(exc, "create", self._join(name)) from exc
        if os.geteuid() == self.owner:
            return fd  # what we create is ours, so the owner's: nothing to give
        path = self._join(name)
        try:
            with os_errors("stat", path):
                self._give(fd, os.fstat(fd), path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
            raise
        return fd

    def open_writable(self, name: str, *, append: bool = False, create: bool = False) -> int | None:
        """Open the owner's regular file ``name`` for reading and writing (``O_APPEND`` if asked).

        With ``create``, a missing file is created (``O_EXCL``, mode 0600, then open for
        writing only); else ``None`` if it does not exist.

        Raises:
            UnsafeFile: it is a link, or not a regular file of the owner.
            StorageError: it cannot be opened.
        """
        check_name(name)
        flags = os.O_RDWR | os.O_NONBLOCK | (os.O_APPEND if append else 0)
        for _ in range(3):
            try:
                fd = _open_beneath(self.fd, name, flags)
            except FileNotFoundError:
                if not create:
                    return None
                created = self.create(name)
                if created is not None:
                    return created
                continue  # created by someone else meanwhile: open theirs
            except OSError as exc:
                raise storage_error(exc, "open", self._join(name)) from exc
            try:
                _checked(fd, stat.S_IFREG, self.owner, self.path, (name,))
            except BaseException:
                os.close(fd)
                raise
            return fd
        path = self._join(name)
        msg = f"cannot open {path}: it keeps changing"
        raise StorageTemporaryError(msg)

    def replace(self, name: str, data: bytes) -> None:
        """Replace the file ``name`` by ``data``, atomically and durably.

        Writes ``<name>.tmp`` (a leftover of that name, even a link, is unlinked first, then it
        is created with ``O_EXCL``), fsyncs it, renames it over ``name`` (which replaces a link
        there, never its target) and fsyncs this directory.

        Raises:
            StorageError: it cannot be written.
        """
        check_name(name)
        temporary = f"{name}.tmp"
        path = self._join(temporary)
        for _ in range(3):
            self.unlink(temporary)
            fd = self.create(temporary)
            if fd is not None:
                break
        else:
            msg = f"cannot create {path}: it keeps reappearing"
            raise StorageTemporaryError(msg)
        try:
            with os_errors("write", path):
                write_all(fd, data)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(temporary)
            raise
        os.close(fd)
        self.rename(temporary, self, name)
        self.fsync()

    # --- names -------------------------------------------------------------------------

    def stat(self, name: str) -> os.stat_result | None:
        """Return ``lstat`` of ``name`` (a link is not followed); ``None`` if it does not exist.

        Raises:
            StorageError: it cannot be examined.
        """
        check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc, "stat", self._join(name)) from exc

    def unlink(self, name: str) -> bool:
        """Remove the name ``name`` (a link itself, never its target); ``False`` if missing.

        Raises:
            StorageError: it cannot be removed (a directory, no permission, ...).
        """
        check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, "unlink", self._join(name)) from exc
        return True

    def rename(self, name: str, target: Dir, new_name: str) -> None:
        """Rename ``name`` here to ``new_name`` in ``target`` (replacing what is there).

        Raises:
            StorageError: the rename failed (``ENOENT`` as the cause if ``name`` is missing).
        """
        check_name(name)
        check_name(new_name)
        try:
            os.rename(name, new_name, src_dir_fd=self.fd, dst_dir_fd=target.fd)
        except OSError as exc:
            raise storage_error(exc, "rename", self._join(name)) from exc

    def rename_exclusive(self, name: str, new_name: str) -> bool | None:
        """Rename ``name`` to ``new_name`` in this directory, unless ``new_name`` exists.

        ``renameat2(RENAME_NOREPLACE)``: atomic, and a link at ``name`` is moved itself, never
        followed. ``True`` when renamed, ``False`` when ``new_name`` exists, ``None`` when
        ``name`` is missing or this kernel or filesystem cannot rename so (the caller then
        does without).

        Raises:
            StorageError: the rename failed otherwise.
        """
        check_name(name)
        check_name(new_name)
        function = _renameat2
        if function is None:
            return None
        new = os.fsencode(new_name)
        if function(self.fd, os.fsencode(name), self.fd, new, _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code == errno.ENOENT or code in _RENAMEAT2_MISSING:
            return None
        path = self._join(name)
        raise storage_error(OSError(code, os.strerror(code), path), "rename", path)

    def link(self, name: str, target: Dir, new_name: str, *, expect: os.stat_result) -> bool:
        """Hard-link ``name`` here as ``new_name`` in ``target``; ``False`` if that exists.

        ``link(2)`` never replaces a file, and a link at ``name`` is linked itself, not followed.
        ``expect`` is what ``name`` must be (``fstat`` of the descriptor the caller wrote, and
        still holds open, so that its inode number cannot be reused): if the new name is
        anything else (``name`` was swapped meanwhile), it is removed again.

        Raises:
            UnsafeFile: ``name`` was replaced by something else under us.
            StorageError: the link failed.
        """
        path = self._join(check_name(name))
        check_name(new_name)
        try:
            os.link(name, new_name, src_dir_fd=self.fd, dst_dir_fd=target.fd, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage_error(exc, "link", path) from exc
        linked = target.stat(new_name)
        if linked is None or (linked.st_dev, linked.st_ino) != (expect.st_dev, expect.st_ino):
            with contextlib.suppress(StorageError):
                target.unlink(new_name)
            msg = f"refusing {path}: replaced by another file while it was written"
            raise UnsafeFile(msg)
        return True

    def scandir(self) -> Iterator[os.DirEntry[str]]:
        """Yield the entries of this directory (``os.scandir`` on a duplicate descriptor).

        Use ``entry.is_file(follow_symlinks=False)``: it answers from the directory entry's
        type where the filesystem records one, without a ``stat``.

        Raises:
            StorageError: the directory cannot be listed.
        """
        with os_errors("list", self.path), os.scandir(self.fd) as entries:
            yield from entries

    def fsync(self) -> None:
        """Flush this directory's entries (creations, renames, unlinks) to disk.

        Raises:
            StorageError: the sync failed.
        """
        with os_errors("sync directory", self.path):
            os.fsync(self.fd)

    # --- the rest ----------------------------------------------------------------------

    def _give(self, fd: int, st: os.stat_result, path: str) -> os.stat_result:
        """Give what this process just created to the owner, if that is not already its uid.

        Only root can, and only an object root owns (so, one root made) is given away.
        """
        if st.st_uid == self.owner:
            return st
        euid = os.geteuid()
        if euid != 0:
            msg = f"cannot create {path} for uid {self.owner} as uid {euid}"
            raise StoragePermanentError(msg)
        if st.st_uid != 0:
            return st  # not the one we made: the owner check refuses it
        with os_errors("give to its owner", path):
            os.fchown(fd, self.owner, self.gid)
            return os.fstat(fd)

    def _join(self, *names: str) -> str:
        """Return the path of ``names`` below this directory, for messages."""
        return "/".join((self.path, *names))


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``.

    Raises:
        OSError: the write failed.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --------------------------------------------------------------------------- locks

#: The first pause between two tries of a busy lock; it doubles up to :data:`_RETRY_MAX`.
_RETRY_FIRST = 0.002
_RETRY_MAX = 0.05


class LockBusy(StorageTemporaryError):
    """A ``flock`` stayed busy for as long as the caller would wait (maybe not at all).

    A caller that must not block (an event loop) tries once (``timeout=0``) in a worker thread
    and, on this, waits in its own way before trying again.
    """


def _lock_fd(directory: Dir, name: str) -> int:
    """Open (creating if missing) the lock file ``name``: a regular file of the owner."""
    fd = directory.open_writable(name, create=True)
    assert fd is not None
    return fd


def unlock_and_close(fd: int) -> None:
    """Drop the ``flock`` held through ``fd``, then close it.

    Closing alone is not enough: a child process forked meanwhile (any thread's subprocess)
    holds a copy of the descriptor until it execs, and the lock, which belongs to the open
    file, would stay held until then. ``LOCK_UN`` drops it at once for every copy.
    """
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def flocked(directory: Dir, name: str, *, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock(2)`` on the file ``name`` of ``directory`` for the block.

    The lock file is created if missing (mode 0600) and must be a regular file of the owner.
    A busy lock is retried (``LOCK_NB``) until ``timeout`` seconds have passed (0: tried once).

    Raises:
        LockBusy: still busy after ``timeout`` seconds.
        UnsafeFile: the lock file is a link or not a regular file of the owner.
        StorageError: it cannot be opened or locked.
    """
    fd = _lock_fd(directory, name)
    try:
        deadline = time.monotonic() + timeout
        pause = _RETRY_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    path = f"{directory.path}/{name}"
                    msg = f"{path} is locked by another process for more than {timeout:g} s"
                    raise LockBusy(msg) from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, _RETRY_MAX)
            except OSError as exc:
                raise storage_error(exc, "lock", f"{directory.path}/{name}") from exc
        yield
    finally:
        unlock_and_close(fd)


@contextlib.contextmanager
def flocked_if_free(directory: Dir, name: str) -> Iterator[bool]:
    """Hold the ``flock`` of :func:`flocked` if it is free; yield whether it is held.

    Never waits: when someone else holds it, the block runs at once, told so (``False``).

    Raises:
        UnsafeFile: the lock file is a link or not a regular file of the owner.
        StorageError: it cannot be opened or locked.
    """
    fd = _lock_fd(directory, name)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            raise storage_error(exc, "lock", f"{directory.path}/{name}") from exc
        yield True
    finally:
        unlock_and_close(fd)
