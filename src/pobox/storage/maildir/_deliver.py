"""Maildir delivery: the one code that writes a message into a maildir, so it is never lost,
doubled or half-seen; and what a maildir holds, and the clean-up of its ``tmp/``.

Theory of operation (https://cr.yp.to/proto/maildir.html, and what Dovecot's LDA does):

1. A unique name is made: ``<secs>.M<usec>P<pid>Q<count>.<host>,S=<size>,W=<wire size>``.
   ``Q<count>`` numbers the deliveries of this process, so one process never repeats a name
   even within a microsecond; ``,S=`` and ``,W=`` (:mod:`._names`) let the POP3 side size the
   message without reading it (it checks them against the file's real size first).
2. The message is written to ``tmp/<name>`` (``O_EXCL | O_NOFOLLOW``, relative to the ``tmp/``
   descriptor: an existing file or link is never reused) and fsynced.
3. Under ``pobox-uidlist.lock`` (the short index lock, never the session lock
   ``dovecot-pop3-session.lock``; waited for at most ``lock_timeout`` seconds, else
   :class:`~pobox.storage._safefs.LockBusy` and nothing is delivered): the quota is checked,
   so that concurrent pobox deliveries cannot together exceed it; the file is hard-linked to
   ``new/<name>`` (``link(2)`` fails rather than overwrite, and the new name must be the very
   file written: one swapped in ``tmp/`` meanwhile is taken out again); and, best effort, if
   the maildir has a usable ``pobox-uidlist``, a line for the message is appended to it, so
   the next POP3 login finds it indexed and sized. A crash before that costs nothing but that
   work at the next login, which indexes files it does not know (and one after it but before
   the next step, a UID: the next login drops a line whose file is gone).
4. ``new/`` is fsynced (outside the lock, so concurrent deliveries share the disk's flushes):
   only now is the message durable, and only now may the caller acknowledge it. The ``tmp/``
   file is unlinked.

:class:`PendingDelivery` runs these steps one by one, for a caller that waits for the lock in
its own way (the asyncio store tries it once in a worker thread, and sleeps in the event
loop between tries, so that no thread ever waits for a user's lock).

A process killed at any point leaves at most a file in ``tmp/``, which POP3 never lists, or a
complete message in ``new/``: a file appears in ``new/`` only by ``link(2)`` of a complete,
synced file. Files left in ``tmp/`` are removed after 36 hours (:class:`TmpCleaner`).

Stored messages end their lines with LF, as Dovecot stores them: CRLF from the SMTP wire is
converted (the POP3 side sends CRLF again).

Quota is counted from the regular files in ``new/`` and ``cur/``: the ``,S=`` field of their
names (as Dovecot's Maildir quota does), else ``lstat(2)``.

Every file operation goes through :mod:`pobox.storage._safefs`: relative to directory
descriptors, never following a link, on files and directories of the owner only.

May import: the standard library, :mod:`pobox.storage` and the modules of this package.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from pobox.storage._safefs import (
    Dir,
    FolderPath,
    LockBusy,
    UnsafeFile,
    check_name,
    flocked,
    os_errors,
    write_all,
)
from pobox.storage._wire import wire_size
from pobox.storage.base import (
    IncomingMessage,
    Quota,
    QuotaExceeded,
    StorageError,
    StorageTemporaryError,
    Usage,
)
from pobox.storage.maildir._index import (
    INDEX_MAX,
    INDEX_MAX_LINES,
    INDEX_NAME,
    parse_pobox_uidlist,
)
from pobox.storage.maildir._names import base_name, is_acceptable_name, size_field

__all__ = [
    "ALL_DIRS",
    "INDEX_LOCK_NAME",
    "LOCK_TIMEOUT",
    "MESSAGE_DIRS",
    "TMP_MAX_AGE",
    "LockBusy",
    "PendingDelivery",
    "TmpCleaner",
    "deliver_message",
    "maildir_usage",
    "message_name",
    "open_maildir",
]

#: The lock serializing updates of the index and deliveries, inside the maildir.
INDEX_LOCK_NAME = "pobox-uidlist.lock"
#: How long an operation waits at most for the index lock, which others hold only for
#: moments but the user may hold forever. Dovecot waits 10 seconds for its POP3 session lock.
LOCK_TIMEOUT = 10.0
#: Where delivered messages live, in listing order: new/ first, so that a message moving from
#: new/ to cur/ while we list is seen in at least one of them.
MESSAGE_DIRS = ("new", "cur")
ALL_DIRS = ("cur", "new", "tmp")
#: Files in ``tmp/`` untouched this long are left over from a crash: Dovecot's 36 hours.
TMP_MAX_AGE = 36 * 3600
#: ``tmp/`` of one maildir is looked at no more often than this (per process).
TMP_CLEAN_INTERVAL = 3600
#: How many maildirs :class:`TmpCleaner` remembers.
_CLEANER_CAPACITY = 4096
#: Attempts at a fresh unique name when one is taken (a clock going backwards, a reused PID).
_NAME_ATTEMPTS = 10
_deliveries = itertools.count(1)


def open_maildir(root: str | Path, owner: int, *, create: bool = False) -> Dir:
    """Open the maildir root ``root`` of ``owner``; with ``create``, make it and its subdirs.

    Creating makes the path (``mkdir -p``, mode 0700) and ``cur``, ``new`` and ``tmp``, each
    only if missing. The root must then be a directory of ``owner``.

    Raises:
        StorageError: it cannot be opened or created (``ENOENT`` as cause when missing).
        UnsafeFile: it (or a subdirectory) is not a directory of ``owner``.
    """
    if not create:
        return Dir.open_root(root, owner)
    directory = _open_or_make_root(root, owner)
    try:
        for name in ALL_DIRS:
            directory.sub(name, create=True).close()
    except BaseException:
        directory.close()
        raise
    return directory


def _open_or_make_root(root: str | Path, owner: int) -> Dir:
    """Open the maildir root, making it (``mkdir -p``, mode 0700) first if it is missing."""
    path = os.fspath(root)
    try:
        return Dir.open_root(path, owner)
    except StorageError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
    if isinstance(path, FolderPath):
        # A Maildir++ folder: made below its maildir by descriptor, never through a link,
        # with the ``maildirfolder`` marker file Maildir++ (and Dovecot) expect in it.
        with _open_or_make_root(path.maildir, owner) as parent:
            parent.make_dir(path.folder)
            with parent.sub(path.folder) as folder:
                marker = folder.create("maildirfolder")
                if marker is not None:
                    os.close(marker)
        return Dir.open_root(path, owner)
    with os_errors("create maildir directory", path):
        os.makedirs(path, mode=0o700, exist_ok=True)
    return Dir.open_root(path, owner)


def maildir_usage(root: str | Path, *, owner: int | None = None) -> Usage:
    """Return the octets and the number of the messages in ``new/`` and ``cur/``.

    Args:
        owner: the uid the maildir must have (default: this process's euid).

    Raises:
        UnsafeFile: the root, ``new/`` or ``cur/`` is a link or not a directory of ``owner``.
        StorageError: they cannot be listed.
    """
    try:
        directory = Dir.open_root(root, os.geteuid() if owner is None else owner)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return Usage(octets=0, messages=0)  # a maildir not created yet is empty
        raise
    with directory:
        return _usage(directory)


def _usage(root: Dir) -> Usage:
    """Return what ``new/`` and ``cur/`` of the open maildir hold."""
    octets = count = 0
    for name in MESSAGE_DIRS:
        try:
            subdir = root.sub(name)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                continue
            raise
        with subdir:
            for entry in subdir.scandir():
                if not is_acceptable_name(entry.name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    size = size_field(base_name(entry.name), "S")
                    if size is None:
                        size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed while we list
                except OSError as exc:
                    raise StorageTemporaryError(str(exc)) from exc
                octets += size
                count += 1
    return Usage(octets=octets, messages=count)


def deliver_message(
    root: str | Path,
    message: IncomingMessage,
    *,
    owner: int | None = None,
    quota: Quota | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    size_fields: bool = True,
    name: str | None = None,
    tmp_cleaner: TmpCleaner | None = None,
) -> str:
    """Store ``message`` durably in the maildir ``root``; return its file name in ``new/``.

    Args:
        root: the maildir (created with ``cur``, ``new`` and ``tmp``, mode 0700, if missing).
        message: the header for this recipient and the spooled body (LF line endings).
        owner: the uid the maildir and its files must have (default: this process's euid);
            the new file gets it.
        quota: limits to enforce, counting this message.
        lock_timeout: how long to wait at most for the index lock.
        size_fields: put ``,S=`` and ``,W=`` in the name (always, but for tests that imitate
            an MTA that does not).
        name: the name to give the message, from :func:`message_name` (for a caller that
            records it before the delivery); default: a fresh one.
        tmp_cleaner: removes ``tmp/`` leftovers after the delivery, if due.

    Raises:
        QuotaExceeded: the message does not fit in the quota.
        StorageTemporaryError: a failure that may pass (disk full, I/O error, the index lock
            busy for ``lock_timeout`` seconds, ...).
        StoragePermanentError: a failure that needs an administrator (permissions, a
            directory of the maildir replaced by a link, ...).
    """
    pending = PendingDelivery(
        root, message, owner=owner, size_fields=size_fields, name=name, tmp_cleaner=tmp_cleaner
    )
    with pending:
        pending.commit(quota=quota, lock_timeout=lock_timeout)
        return pending.finish()


class PendingDelivery:
    """One delivery in three steps, for callers that must not block on the index lock.

    1. Creating it writes the message to ``tmp/`` and fsyncs it (no lock; the work the
       message's size sets).
    2. :meth:`commit`, under the index lock (waited for at most ``lock_timeout``: 0 tries
       once, raising :class:`~pobox.storage._safefs.LockBusy`; try again later), checks the
       quota, links the file into ``new/`` and appends the index line. A commit that failed
       may be tried again.
    3. :meth:`finish` fsyncs ``new/`` (the message is durable only then) and removes the
       ``tmp/`` name.

    :func:`deliver_message` does all three. Close it (or use it as a context manager): an
    unfinished delivery leaves nothing behind but what was committed.
    """

    def __init__(
        self,
        root: str | Path,
        message: IncomingMessage,
        *,
        owner: int | None = None,
        size_fields: bool = True,
        name: str | None = None,
        tmp_cleaner: TmpCleaner | None = None,
    ) -> None:
        """Write ``message`` into ``tmp/`` of the maildir ``root`` (see :func:`deliver_message`).

        Raises:
            StorageTemporaryError: a failure that may pass (disk full, I/O error, ...).
            StoragePermanentError: a failure that needs an administrator.
        """
        self._size = message.size
        self._wire = wire_size(message.header) + message.body.wire_size
        self._tmp_cleaner = tmp_cleaner
        self._committed = False
        self._fd = -1
        with contextlib.ExitStack() as stack:
            owner = os.geteuid() if owner is None else owner
            self._root = stack.enter_context(_open_or_make_root(root, owner))
            self._tmp = stack.enter_context(self._root.sub("tmp", create=True))
            self._new = stack.enter_context(self._root.sub("new", create=True))
            self._root.make_dir("cur")  # for the POP3 side; one mkdir, whatever is there
            names = iter([name]) if name is not None else _fresh_names(message, size_fields)
            self.name, self._fd = _write_to_tmp(self._tmp, names, message)
            #: Held open until linked: its inode number cannot be reused by a swapped-in file.
            self._written = os.fstat(self._fd)
            self._stack = stack.pop_all()

    def commit(self, *, quota: Quota | None = None, lock_timeout: float = LOCK_TIMEOUT) -> None:
        """Check the quota and link the message into ``new/``, under the index lock.

        Raises:
            LockBusy: the index lock stayed busy for ``lock_timeout`` seconds.
            QuotaExceeded: the message does not fit in ``quota``.
            StorageTemporaryError: a failure that may pass.
            StoragePermanentError: a failure that needs an administrator (the ``tmp/`` file
                replaced meanwhile, ...).
        """
        if self._committed:
            return
        with flocked(self._root, INDEX_LOCK_NAME, timeout=lock_timeout):
            if quota is not None and not quota.unlimited:
                _check_quota(self._root, self._size, quota)
            if not self._tmp.link(self.name, self._new, self.name, expect=self._written):
                msg = f"cannot deliver to {self._new.path}: {self.name} exists already"
                raise StorageTemporaryError(msg)
            self._committed = True
            _index_new_message(self._root, self.name, self._wire)

    def finish(self) -> str:
        """Make the committed message durable (fsync ``new/``); return its name in ``new/``.

        Raises:
            StorageTemporaryError: ``new/`` could not be synced.
        """
        assert self._committed
        self._new.fsync()
        if self._tmp_cleaner is not None:
            self._tmp_cleaner.maybe_clean(self._root)
        self.close()
        return self.name

    def close(self) -> None:
        """Remove the ``tmp/`` name and close everything; safe to call more than once."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        # The message is in new/ (or was not delivered): the tmp/ name is no longer needed.
        # A leftover in tmp/ is harmless: POP3 never lists tmp/.
        with contextlib.suppress(StorageError):
            self._tmp.unlink(self.name)
        self._stack.close()

    def __enter__(self) -> PendingDelivery:
        """Return this delivery; it is closed at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the delivery."""
        self.close()


def message_name(message: IncomingMessage, *, size_fields: bool = True) -> str:
    """Return a fresh name for ``message``, as :func:`deliver_message` names it."""
    return next(_fresh_names(message, size_fields))


def _fresh_names(message: IncomingMessage, size_fields: bool) -> Iterator[str]:
    """Yield fresh unique names for ``message``: a few, for when one is taken."""
    suffix = ""
    if size_fields:
        suffix = f",S={message.size},W={wire_size(message.header) + message.body.wire_size}"
    for _ in range(_NAME_ATTEMPTS):
        yield _unique_name() + suffix


def _write_to_tmp(tmp: Dir, names: Iterator[str], message: IncomingMessage) -> tuple[str, int]:
    """Write ``message`` to a new file of ``tmp/`` and fsync it; return its name and descriptor.

    The first of ``names`` that is free is used.
    """
    for name in names:
        fd = tmp.create(check_name(name))
        if fd is not None:
            break
    else:
        msg = f"cannot find a free file name in {tmp.path}"
        raise StorageTemporaryError(msg)
    try:
        with os_errors("write", f"{tmp.path}/{name}"):
            write_all(fd, message.header)
            for chunk in message.body.chunks():
                write_all(fd, chunk)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(StorageError):
            tmp.unlink(name)
        raise
    return name, fd


def _check_quota(root: Dir, size: int, quota: Quota) -> None:
    """Raise :class:`QuotaExceeded` if a message of ``size`` octets does not fit."""
    usage = _usage(root)
    octets, count = usage.octets, usage.messages
    if quota.max_messages and count + 1 > quota.max_messages:
        msg = f"quota exceeded: {count} messages of at most {quota.max_messages} in {root.path}"
        raise QuotaExceeded(msg)
    if quota.max_bytes and octets + size > quota.max_bytes:
        msg = f"quota exceeded: {octets} + {size} octets over {quota.max_bytes} in {root.path}"
        raise QuotaExceeded(msg)


def _unique_name() -> str:
    """Return a new Maildir unique name, ``<secs>.M<usec>P<pid>Q<count>.<host>``."""
    now = time.time_ns() // 1000
    seconds, micro = divmod(now, 1_000_000)
    # The Maildir specification: "/" and ":" cannot appear in a host name part.
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_deliveries)}.{host}"


def _index_new_message(root: Dir, name: str, size: int) -> None:
    """Append the new message to ``pobox-uidlist`` if there is a usable one (best effort).

    Runs under the index lock. The line gets the next UID, as a login would give it:
    ``parse_pobox_uidlist`` raises the next UID above every UID listed, and every rewrite of
    the index writes that raised value, so a UID is never handed out twice. A message the
    index already knows (a login that listed ``new/`` between our link and this lock) is left
    alone. An index that is a link, a FIFO or someone else's file is left alone too.
    """
    with contextlib.suppress(StorageError):
        raw = root.read_file(INDEX_NAME, INDEX_MAX)
        if raw is None:
            return  # the first login builds the index (or imports Dovecot's)
        encoded = name.encode("utf-8", "surrogateescape")
        next_uid = _next_uid(raw)
        if next_uid is None:  # not the plain shape pobox writes: parse it all
            if raw.count(b"\n") > INDEX_MAX_LINES:
                return  # refused at the next login: never parsed
            parsed = parse_pobox_uidlist(raw.decode("utf-8", "surrogateescape"))
            if parsed is None:
                return
            uidlist, _ = parsed
            if name in uidlist.entries:
                return
            next_uid = uidlist.next_uid
        elif b":" + encoded + b"\n" in raw:
            return
        line = b"%d W%d :%s\n" % (next_uid, size, encoded)
        if raw and not raw.endswith(b"\n"):
            line = b"\n" + line  # never glue our line to a torn one
        fd = root.open_writable(INDEX_NAME, append=True)
        if fd is None:
            return
        try:
            with os_errors("append to", f"{root.path}/{INDEX_NAME}"):
                write_all(fd, line)
        finally:
            os.close(fd)


def _next_uid(raw: bytes) -> int | None:
    """Return the next UID of an index as pobox writes it, without parsing every line.

    pobox writes the lines in UID order and deliveries append increasing UIDs, so the next
    UID is the header's ``N`` or one above the last line's UID, whichever is higher. ``None``
    when the header or the last line is not of that plain shape (then parse it all).
    """
    header, _, rest = raw.partition(b"\n")
    fields = header.split()
    if len(fields) < 3 or fields[:2] != [b"pobox-uidlist", b"1"]:
        return None
    found: dict[bytes, bytes] = {}
    for field in fields[2:]:
        found.setdefault(field[:1], field[1:])
    validity, next_uid = found.get(b"V", b""), found.get(b"N", b"")
    if not (validity.isdigit() and next_uid.isdigit() and int(validity) and int(next_uid)):
        return None
    last = rest.rstrip(b"\n").rpartition(b"\n")[2]
    if not last:
        return int(next_uid)
    uid = last.partition(b" ")[0]
    if not uid.isdigit():
        return None
    return max(int(next_uid), int(uid) + 1)


class TmpCleaner:
    """Removes files left in ``tmp/`` for over :data:`TMP_MAX_AGE`, at most hourly per maildir.

    A file of ``tmp/`` is a delivery in progress, or the leftover of one that crashed; after
    36 hours untouched (``lstat`` mtime) it is the latter, and Dovecot removes it too. Entries are
    unlinked relative to the ``tmp/`` descriptor: a link is removed itself, never followed;
    directories are left alone. Best effort: errors are ignored.
    """

    def __init__(self, capacity: int = _CLEANER_CAPACITY) -> None:
        self._lock = threading.Lock()
        self._last: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def maybe_clean(self, root: Dir) -> int:
        """Clean ``tmp/`` of ``root`` if it was not cleaned in the last hour; return removals."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(root.path)
            if last is not None and now - last < TMP_CLEAN_INTERVAL:
                return 0
            self._last[root.path] = now
            self._last.move_to_end(root.path)
            while len(self._last) > self._capacity:
                self._last.popitem(last=False)
        return clean_tmp(root)


def clean_tmp(root: Dir, max_age: float = TMP_MAX_AGE) -> int:
    """Remove every non-directory of ``root``'s ``tmp/`` untouched for ``max_age`` seconds.

    Returns:
        How many entries were removed.
    """
    removed = 0
    cutoff = time.time() - max_age
    with contextlib.suppress(StorageError), root.sub("tmp") as tmp:
        for entry in tmp.scandir():
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) or st.st_mtime >= cutoff:
                continue
            with contextlib.suppress(StorageError, UnsafeFile):
                if tmp.unlink(entry.name):
                    removed += 1
    return removed
