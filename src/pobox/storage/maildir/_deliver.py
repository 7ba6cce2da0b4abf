"""Maildir delivery: writing one new message so that it is never lost, doubled or half-seen.

Theory of operation (https://cr.yp.to/proto/maildir.html, and what Dovecot's LDA does):

1. A unique name is made: ``<secs>.M<usec>P<pid>Q<count>.<host>,S=<size>,W=<wire size>``.
   ``Q<count>`` numbers the deliveries of this process, so one process never repeats a name
   even within a microsecond; ``,S=`` and ``,W=`` (:mod:`._names`) let the POP3 side size the
   message without reading it.
2. The message is written to ``tmp/<name>`` (``O_EXCL``: an existing file is never reused)
   and fsynced.
3. It is hard-linked to ``new/<name>`` (``link(2)`` fails rather than overwrite) and
   ``new/`` is fsynced: only now is the message durable, and only now may the caller
   acknowledge it. The ``tmp/`` file is then unlinked.
4. Best effort: if the maildir has a usable ``pobox-uidlist``, a line for the message is
   appended to it under ``pobox-uidlist.lock`` (the short index lock, never the session lock
   ``dovecot-pop3-session.lock``), so the next POP3 login finds it indexed and sized. A crash
   before this step costs nothing but that work at the next login, which indexes files it does
   not know.

A process killed at any point leaves at most a file in ``tmp/``, which POP3 never lists, or a
complete message in ``new/``: a file appears in ``new/`` only by ``link(2)`` of a complete,
synced file.

Stored messages end their lines with LF, as Dovecot stores them: CRLF from the SMTP wire is
converted (the POP3 side sends CRLF again).

Quota is counted from the files in ``new/`` and ``cur/``: the ``,S=`` field of their names,
else ``stat(2)``.

May import: the standard library, :mod:`pobox.storage` and the modules of this package.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from pathlib import Path

from pobox.storage._wire import wire_size
from pobox.storage.base import (
    IncomingMessage,
    Quota,
    QuotaExceeded,
    StoragePermanentError,
    StorageTemporaryError,
    Usage,
)
from pobox.storage.maildir._fs import fsync_directory, held_lock, os_errors
from pobox.storage.maildir._index import INDEX_NAME, parse_pobox_uidlist
from pobox.storage.maildir._names import base_name, is_acceptable_name, size_field

__all__ = ["deliver_message", "maildir_usage"]

#: The index lock, as :mod:`._store` names it.
_INDEX_LOCK_NAME = "pobox-uidlist.lock"
_ALL_DIRS = ("cur", "new", "tmp")
#: Attempts at a fresh unique name when one is taken (a clock going backwards, a reused PID).
_NAME_ATTEMPTS = 10
_deliveries = itertools.count(1)


def maildir_usage(root: Path) -> Usage:
    """Return the octets and the number of the messages in ``new/`` and ``cur/``."""
    octets = count = 0
    for directory in ("new", "cur"):
        path = root / directory
        if not path.is_dir():
            continue  # a maildir not created yet is empty
        with os_errors("list", path), os.scandir(path) as entries:
            for entry in entries:
                if not is_acceptable_name(entry.name):
                    continue
                size = size_field(base_name(entry.name), "S")
                if size is None:
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue  # removed while we list
                    except OSError as exc:
                        raise StorageTemporaryError(str(exc)) from exc
                octets += size
                count += 1
    return Usage(octets=octets, messages=count)


def deliver_message(root: Path, message: IncomingMessage, *, quota: Quota | None = None) -> str:
    """Store ``message`` durably in the maildir ``root``; return its file name in ``new/``.

    Args:
        root: the maildir (created with ``cur``, ``new`` and ``tmp``, mode 0700, if missing).
        message: the header for this recipient and the spooled body (LF line endings).
        quota: limits to enforce, counting this message.

    Raises:
        QuotaExceeded: the message does not fit in the quota.
        StorageTemporaryError: a failure that may pass (disk full, I/O error, ...).
        StoragePermanentError: a failure that needs an administrator (permissions, ...).
    """
    size = message.size
    wire = wire_size(message.header) + message.body.wire_size
    for directory in (root, *(root / name for name in _ALL_DIRS)):
        with os_errors("create maildir directory", directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
    if quota is not None and not quota.unlimited:
        _check_quota(root, size, quota)
    suffix = f",S={size},W={wire}"
    for _ in range(_NAME_ATTEMPTS):
        name = _unique_name() + suffix
        temporary = root / "tmp" / name
        if _write_new_file(temporary, message):
            break
    else:
        msg = f"cannot find a free file name in {root / 'tmp'}"
        raise StorageTemporaryError(msg)
    final = root / "new" / name
    try:
        with os_errors("link", final):
            os.link(temporary, final)
        fsync_directory(root / "new")
    finally:
        # The message is in new/ (or was not delivered): the tmp/ name is no longer needed.
        # A leftover in tmp/ is harmless: POP3 never lists tmp/.
        with contextlib.suppress(OSError):
            temporary.unlink()
    _index_new_message(root, name, wire)
    return name


def _check_quota(root: Path, size: int, quota: Quota) -> None:
    """Raise :class:`QuotaExceeded` if a message of ``size`` octets does not fit."""
    usage = maildir_usage(root)
    octets, count = usage.octets, usage.messages
    if quota.max_messages and count + 1 > quota.max_messages:
        msg = f"quota exceeded: {count} messages of at most {quota.max_messages} in {root}"
        raise QuotaExceeded(msg)
    if quota.max_bytes and octets + size > quota.max_bytes:
        msg = f"quota exceeded: {octets} + {size} octets over {quota.max_bytes} in {root}"
        raise QuotaExceeded(msg)


def _unique_name() -> str:
    """Return a new Maildir unique name, ``<secs>.M<usec>P<pid>Q<count>.<host>``."""
    now = time.time_ns() // 1000
    seconds, micro = divmod(now, 1_000_000)
    # The Maildir specification: "/" and ":" cannot appear in a host name part.
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{seconds}.M{micro}P{os.getpid()}Q{next(_deliveries)}.{host}"


def _write_new_file(path: Path, message: IncomingMessage) -> bool:
    """Create ``path``, write ``message`` and fsync it; ``False`` if the name is taken."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        with os_errors("create", path):
            raise exc from None
    try:
        with os_errors("write", path):
            _write_all(fd, message.header)
            for chunk in message.body.chunks():
                _write_all(fd, chunk)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _index_new_message(root: Path, name: str, size: int) -> None:
    """Append the new message to ``pobox-uidlist`` if there is a usable one (best effort).

    The line gets the next UID, as a login would give it: ``parse_pobox_uidlist`` raises the
    next UID above every UID listed, and every rewrite of the index writes that raised value,
    so a UID is never handed out twice. A message the index already knows (a login that
    listed ``new/`` between our link and this lock) is left alone.
    """
    path = root / INDEX_NAME
    try:
        with held_lock(root / _INDEX_LOCK_NAME):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return  # the first login builds the index (or imports Dovecot's)
            parsed = parse_pobox_uidlist(raw.decode("utf-8", "surrogateescape"))
            if parsed is None:
                return
            uidlist, _ = parsed
            if name in uidlist.entries:
                return
            line = f"{uidlist.next_uid} W{size} :{name}\n".encode("utf-8", "surrogateescape")
            if raw and not raw.endswith(b"\n"):
                line = b"\n" + line  # never glue our line to a torn one
            with path.open("ab") as handle:
                handle.write(line)
    except (OSError, StorageTemporaryError, StoragePermanentError):
        return
