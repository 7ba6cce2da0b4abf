"""What a fetch account has already downloaded: a per-account state file, safe to crash.

The state maps a message identity (its UIDL, or a TOP-based identity when the server has no
UIDL) to the time it was stored locally.  It lives in two files:

- ``<name>.json``, a snapshot, only ever replaced whole (write a temporary file, fsync it,
  rename it over the old one, fsync the directory), so a reader sees the old or the new one;
- ``<name>.journal``, one ``identity TAB unix-time`` line appended and fsynced per stored
  message (and, for a Maildir, a ``pending TAB identity TAB file-name`` line just before the
  file is put in place, so that a crash between the two does not fetch it twice).
  Rewriting the snapshot after each of 10,000 messages would write O(n²) bytes; the journal
  keeps each update O(1).  A torn last line (the run died mid-append) is ignored: that
  message was not acknowledged, so it is still on the server and is fetched again.

:meth:`SeenState.compact` folds the journal into a new snapshot at the end of a run.  A
``<name>.lock`` file, locked with ``flock``, keeps two runs of one account (an overlapping cron
job) from fetching the same messages twice.

May import: the standard library and pobox.errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from pobox.errors import PoboxError

__all__ = ["SeenState", "StateLocked", "fsync_dir"]

_VERSION = 1
_PENDING = "pending"


class StateLocked(PoboxError):
    """Another run holds this account's lock."""


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SeenState:
    """The identities an account has stored locally, with the time each was stored.

    Use as a context manager: entering takes the account's lock and loads the state.
    """

    def __init__(self, path: Path) -> None:
        """Prepare the state whose snapshot is ``path`` (``.json``); nothing is read yet."""
        self.path = path
        self.journal_path = path.with_suffix(".journal")
        self.lock_path = path.with_suffix(".lock")
        self.seen: dict[str, float] = {}
        self._lock: IO[bytes] | None = None
        self._journal: IO[bytes] | None = None
        #: identity → local file name, for messages being put in place when a run died.
        self.pending: dict[str, str] = {}

    def __enter__(self) -> SeenState:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.lock_path.open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            msg = f"another pobox fetch is running for this account (lock {self.lock_path})"
            raise StateLocked(msg) from None
        self._lock = lock
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the journal and release the lock."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = {"version": _VERSION, "seen": {}}
        except ValueError as exc:
            msg = f"state file {self.path} is damaged ({exc}); move it away to start afresh"
            raise PoboxError(msg) from None
        self.seen = {str(k): float(v) for k, v in data.get("seen", {}).items()}
        self.pending = {}
        with contextlib.suppress(FileNotFoundError), self.journal_path.open("rb") as journal:
            for line in journal:
                if not line.endswith(b"\n"):
                    break  # torn by a crash: not acknowledged, so fetched again
                fields = line[:-1].decode("utf-8", "replace").split("\t")
                if len(fields) == 3 and fields[0] == _PENDING:
                    self.pending[fields[1]] = fields[2]
                elif len(fields) == 2:
                    with contextlib.suppress(ValueError):
                        self.seen[fields[0]] = float(fields[1])
                        self.pending.pop(fields[0], None)

    def _append(self, line: str) -> None:
        if self._journal is None:
            existed = self.journal_path.exists()
            self._journal = self.journal_path.open("ab")
            if not existed:
                fsync_dir(self.journal_path.parent)
        self._journal.write(line.encode())
        self._journal.flush()
        os.fsync(self._journal.fileno())

    @staticmethod
    def _check(*values: str) -> None:
        for value in values:
            if "\t" in value or "\n" in value:
                msg = f"unusable message identity or name {value!r}"
                raise ValueError(msg)

    def record_pending(self, identity: str, name: str) -> None:
        """Durably note that ``identity`` is about to appear under the file name ``name``.

        A run killed between the rename into place and :meth:`record` leaves the message
        stored but unrecorded; the next run finds the name in :attr:`pending`, checks that
        the file is there, and records it instead of fetching it again.
        """
        self._check(identity, name)
        self._append(f"{_PENDING}\t{identity}\t{name}\n")
        self.pending[identity] = name

    def record(self, identity: str, when: float) -> None:
        """Durably note that ``identity`` is stored locally (append and fsync the journal)."""
        self._check(identity)
        self._append(f"{identity}\t{when:.0f}\n")
        self.seen[identity] = when
        self.pending.pop(identity, None)

    def compact(self, keep: Iterable[str] | None = None) -> None:
        """Write a new snapshot (only ``keep``'s identities, if given) and drop the journal.

        Args:
            keep: identities still on the server; the others are gone for good (UIDLs are
                never reused, RFC 1939 §7) and need no remembering.
        """
        if keep is not None:
            wanted = set(keep)
            self.seen = {k: v for k, v in self.seen.items() if k in wanted}
        tmp = self.path.with_suffix(".json.tmp")
        with tmp.open("wb") as out:
            out.write(json.dumps({"version": _VERSION, "seen": self.seen}, indent=0).encode())
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(self.path)
        fsync_dir(self.path.parent)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
