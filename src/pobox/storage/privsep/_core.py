"""What the storage helper needs from a mail backend: a synchronous core, plain data in and out.

The helper runs each call in a worker thread whose filesystem uid/gid are the owner's
(:mod:`._fsid`), so the core must do its file work in the calling thread: no thread hops,
no event loop. Everything it takes and returns is plain data or a file descriptor.

May import: the standard library, :mod:`pobox.records`, :mod:`pobox.storage` and the modules
of this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pobox.records import Quota, User
from pobox.storage.base import DeleteResult, IncomingMessage, MessageInfo, Usage
from pobox.storage.privsep._owner import Owner

__all__ = ["CoreMaildrop", "MailCore"]


class CoreMaildrop(Protocol):
    """One open maildrop of the synchronous core; the helper holds it for a session."""

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open."""

    def open_message(self, key: str) -> tuple[int, int]:
        """Open message ``key`` read-only; return the descriptor and its size in octets."""

    def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove messages of the snapshot (UPDATE state)."""

    def close(self) -> None:
        """Release the session lock; safe to call more than once."""


class MailCore(Protocol):
    """The synchronous operations of a mail backend, each with the owner's credentials."""

    def open(self, user: User, owner: Owner, *, lock: bool) -> CoreMaildrop:
        """Open ``user``'s maildrop, whose files ``owner`` owns."""

    def deliver(
        self, user: User, owner: Owner, message: IncomingMessage, quota: Quota | None
    ) -> str:
        """Store a message durably in ``user``'s maildrop; return its key."""

    def usage(self, user: User, owner: Owner) -> Usage:
        """Return what ``user``'s maildrop holds."""


# --- provisional: the Maildir store's internals, until the synchronous core of the Maildir
# --- backend lands (issue 10, layer 1); replaced by it at the merge.

import os  # noqa: E402
import stat  # noqa: E402
from pathlib import Path  # noqa: E402

from pobox.storage.base import MessageGone, StoragePermanentError  # noqa: E402
from pobox.storage.maildir import MaildirMaildrop, MaildirStore  # noqa: E402
from pobox.storage.maildir import _store as _maildir  # noqa: E402
from pobox.storage.maildir._deliver import deliver_message, maildir_usage  # noqa: E402


class _ProvisionalMaildrop:
    def __init__(self, maildrop: MaildirMaildrop) -> None:
        self._maildrop = maildrop

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._maildrop.messages

    def open_message(self, key: str) -> tuple[int, int]:
        def attempt(path: Path) -> int | None:
            try:
                return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None

        fd, _ = self._maildrop._locate(key, attempt)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise StoragePermanentError(f"message {key!r} is not a regular file")
        return fd, info.st_size

    def delete(self, keys: Sequence[str]) -> DeleteResult:
        return self._maildrop._delete(tuple(keys))

    def close(self) -> None:
        lock = self._maildrop._lock
        self._maildrop._lock = None
        if lock is not None:
            lock.release()


class MaildirCore:
    """The Maildir backend's synchronous operations (provisional adapter)."""

    def __init__(self, location: str) -> None:
        self._store = MaildirStore(location)
        self._cache = _maildir._SnapshotCache()

    def open(self, user: User, owner: Owner, *, lock: bool) -> CoreMaildrop:
        root = self._store.maildir_path(user)
        opened = _maildir._open_maildrop(root, lock, True, self._cache)
        return _ProvisionalMaildrop(MaildirMaildrop(opened))

    def deliver(
        self, user: User, owner: Owner, message: IncomingMessage, quota: Quota | None
    ) -> str:
        return deliver_message(self._store.maildir_path(user), message, quota=quota)

    def usage(self, user: User, owner: Owner) -> Usage:
        return maildir_usage(self._store.maildir_path(user))


_ = MessageGone
