"""Where fetched messages go: a Maildir, an mbox file or an MDA command, each durably.

A sink hands out one :class:`Delivery` per message.  The fetcher streams the message into
it with LF line ends (the local convention) and calls :meth:`Delivery.commit`, which returns
only once the message is on disk for good (file and directory fsynced, or the MDA said yes);
only then may the server copy be deleted.  :meth:`Delivery.abort` throws a partial copy away.

- :class:`MaildirSink` spools (in memory while small, else to a nameless file in the
  Maildir's ``tmp/``), then delivers with :func:`pobox.storage.maildir.deliver_message`, the
  one Maildir writer (``tmp/``, fsync, link into ``new/``, no link ever followed): a 50 MB
  message never sits in memory, and a crash leaves at most a stray file in ``tmp/``.
- :class:`MboxSink` spools to a temporary file, then appends under an ``fcntl`` lock with a
  ``From_`` line (the envelope sender from ``Return-Path``) and mboxrd quoting (``>From``,
  ``>>From``...), which is reversible.  The standard library's :class:`mailbox.mbox` only
  writes ``From MAILER-DAEMON`` for a streamed message and rescans the whole file on open,
  so it is used to read mbox files back (tests), not to write them.  A failed append is
  truncated away.
- :class:`MdaSink` spools, then runs the command (no shell) with the message on its
  standard input; exit 0 is delivered, 75 (EX_TEMPFAIL) a temporary failure.

May import: the standard library, pobox.errors, pobox.storage and pobox.client._state.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import IO, Protocol

from pobox.client._state import fsync_dir
from pobox.errors import PoboxError
from pobox.storage.base import IncomingMessage, StorageError
from pobox.storage.maildir import deliver_message, message_name, open_maildir
from pobox.storage.spool import Spool

__all__ = [
    "Delivery",
    "DeliveryError",
    "DeliveryTemporaryError",
    "MaildirSink",
    "MboxSink",
    "MdaSink",
    "Sink",
]

#: How long an MDA may take for one message before it counts as failed.
MDA_TIMEOUT = 300.0
_EX_TEMPFAIL = 75
_COPY_CHUNK = 1 << 16
_FROM_LINE = re.compile(rb"^>*From ")


class DeliveryError(PoboxError):
    """A message could not be stored locally; it stays on the server."""


class DeliveryTemporaryError(DeliveryError):
    """A message could not be stored locally for now (the MDA said EX_TEMPFAIL)."""


class Delivery(Protocol):
    """One message on its way into a sink."""

    def write(self, data: bytes) -> None:
        """Append message bytes (LF line ends)."""

    def prepare(self) -> str | None:
        """Make the written bytes durable; return the file name :meth:`commit` will use.

        ``None`` when the destination has no such name (mbox, MDA): then :meth:`commit` is
        all or nothing by itself.
        """

    def commit(self) -> None:
        """Store the message durably; raise :class:`DeliveryError` if that fails."""

    def abort(self) -> None:
        """Throw the partial message away."""


class Sink(Protocol):
    """A local destination for messages."""

    def begin(self) -> Delivery:
        """Start storing one message."""

    def describe(self) -> str:
        """Name the destination for messages."""

    def stored(self, name: str) -> bool:
        """Whether the message :meth:`Delivery.prepare` called ``name`` is in place."""


class _MaildirDelivery:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._spool = Spool(directory=str(root / "tmp"))
        self._message = IncomingMessage(b"", self._spool)
        self._final: str | None = None

    @property
    def size(self) -> int:
        return self._spool.size

    def write(self, data: bytes) -> None:
        self._spool.write(data)

    def prepare(self) -> str:
        try:
            self._spool.finish()
        except OSError as exc:
            self.abort()
            msg = f"cannot store into {self._root}: {exc}"
            raise DeliveryError(msg) from exc
        self._final = message_name(self._message)
        return self._final

    def commit(self) -> None:
        if self._final is None:
            self.prepare()
        try:
            deliver_message(self._root, self._message, name=self._final)
        except StorageError as exc:
            msg = f"cannot store into {self._root}: {exc}"
            raise DeliveryError(msg) from exc
        finally:
            self._spool.close()

    def abort(self) -> None:
        self._spool.close()


class MaildirSink:
    """A local Maildir; created (``cur``, ``new``, ``tmp``) if missing."""

    def __init__(self, path: Path) -> None:
        """Use the Maildir at ``path``."""
        self.path = path

    def describe(self) -> str:
        """Name the destination for messages."""
        return f"Maildir {self.path}"

    def stored(self, name: str) -> bool:
        """Whether ``name`` is in ``new/``, or in ``cur/`` (maybe with a ``:2,`` suffix)."""
        if (self.path / "new" / name).exists():
            return True
        try:
            return any(
                entry == name or entry.startswith(name + ":")
                for entry in os.listdir(self.path / "cur")
            )
        except FileNotFoundError:
            return False

    def begin(self) -> Delivery:
        """Start storing one message (spooled beside the Maildir, in its ``tmp/``)."""
        try:
            open_maildir(self.path, os.geteuid(), create=True).close()
            return _MaildirDelivery(self.path)
        except (OSError, StorageError) as exc:
            msg = f"cannot use Maildir {self.path}: {exc}"
            raise DeliveryError(msg) from exc


class _Spool:
    """A message spooled to an anonymous temporary file."""

    def __init__(self, directory: Path | None) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self.last = b"\n"

    def write(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.last = data[-1:]

    def prepare(self) -> None:
        return None

    def abort(self) -> None:
        self.file.close()


def _envelope_sender(spool: IO[bytes]) -> str:
    """Return the address of the ``Return-Path`` header, or ``MAILER-DAEMON``."""
    spool.seek(0)
    headers = BytesHeaderParser().parse(spool, headersonly=True)
    value = str(headers.get("Return-Path", "")).strip().strip("<>").strip()
    spool.seek(0)
    if not value or any(c.isspace() for c in value):
        return "MAILER-DAEMON"
    return value


class _MboxDelivery(_Spool):
    def __init__(self, path: Path) -> None:
        super().__init__(path.parent)
        self._path = path

    def commit(self) -> None:
        try:
            sender = _envelope_sender(self.file)
            from_line = f"From {sender} {time.asctime(time.gmtime())}\n".encode()
            created = not self._path.exists()
            with self._path.open("ab") as box:
                fcntl.lockf(box.fileno(), fcntl.LOCK_EX)
                start = box.seek(0, os.SEEK_END)
                try:
                    box.write(from_line)
                    for line in self.file:
                        box.write(b">" + line if _FROM_LINE.match(line) else line)
                    box.write(b"\n" if self.last == b"\n" else b"\n\n")
                    box.flush()
                    os.fsync(box.fileno())
                except BaseException:
                    box.truncate(start)
                    raise
            if created:
                fsync_dir(self._path.parent)
        except OSError as exc:
            msg = f"cannot append to mbox {self._path}: {exc}"
            raise DeliveryError(msg) from exc
        finally:
            self.file.close()


class MboxSink:
    """A local mbox file (mboxrd quoting), created if missing."""

    def __init__(self, path: Path) -> None:
        """Use the mbox file at ``path``."""
        self.path = path

    def describe(self) -> str:
        """Name the destination for messages."""
        return f"mbox {self.path}"

    def stored(self, name: str) -> bool:
        """Never: an mbox append is all or nothing, it names no file."""
        return False

    def begin(self) -> Delivery:
        """Start spooling one message beside the mbox file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return _MboxDelivery(self.path)
        except OSError as exc:
            msg = f"cannot use mbox {self.path}: {exc}"
            raise DeliveryError(msg) from exc


class _MdaDelivery(_Spool):
    def __init__(self, argv: list[str]) -> None:
        super().__init__(None)
        self._argv = argv

    def commit(self) -> None:
        try:
            self.file.flush()
            self.file.seek(0)
            done = subprocess.run(  # noqa: S603 - the user's own MDA, no shell
                self._argv,
                stdin=self.file,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=MDA_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            msg = f"MDA {shlex.join(self._argv)} failed: {exc}"
            raise DeliveryError(msg) from exc
        finally:
            self.file.close()
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
            why = f": {detail[-1]}" if detail else ""
            msg = f"MDA {shlex.join(self._argv)} exited with status {done.returncode}{why}"
            if done.returncode == _EX_TEMPFAIL:
                raise DeliveryTemporaryError(msg)
            raise DeliveryError(msg)


class MdaSink:
    """A command that delivers one message from its standard input (run without a shell)."""

    def __init__(self, command: str) -> None:
        """Use ``command``, split like a shell would split it."""
        self.argv = shlex.split(command)
        if not self.argv:
            msg = "the MDA command is empty"
            raise ValueError(msg)
        if self.argv[0] == "pobox" and shutil.which("pobox") is None:
            # ``--mda 'pobox deliver -u alice'`` from a pobox that is not on PATH (run from
            # its virtualenv, or by cron with a short PATH): this very pobox delivers.
            self.argv[:1] = [sys.executable, "-m", "pobox"]

    def describe(self) -> str:
        """Name the destination for messages."""
        return f"MDA {shlex.join(self.argv)}"

    def stored(self, name: str) -> bool:
        """Never: an MDA run names no file."""
        return False

    def begin(self) -> Delivery:
        """Start spooling one message to a temporary file."""
        return _MdaDelivery(self.argv)
