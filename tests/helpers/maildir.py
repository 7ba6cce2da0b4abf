"""Put mail into a Maildir the way a *foreign* MTA or mail client would, for tests.

This is a test fixture, deliberately not pobox's Maildir writer
(:func:`pobox.storage.maildir.deliver_message` is the only one): it imitates the files other
programs leave (names with or without size fields, CRLF kept as written, messages moved to
``cur/`` with flags), which the store must read as they are.

:func:`deliver` writes the message into ``tmp/`` under a unique name
(``<secs>.M<usec>P<pid>Q<n>.<host>`` plus size fields), then renames it into ``new/``, which
is how qmail, Postfix and Dovecot's LDA deliver (https://cr.yp.to/proto/maildir.html); with
``flags`` it then moves the file to ``cur/`` with ``:2,<flags>``, as a client that has seen it.
Names increase with every call, so their order is the delivery order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pobox.storage.base import IncomingMessage
from pobox.storage.spool import Spool

__all__ = ["User", "deliver", "incoming", "index_lock_held", "set_flags", "swap_for_link"]

_state = {"last": 0, "count": 0}


@dataclass(frozen=True, slots=True)
class User:
    """A user as the storage layer sees one (satisfies ``pobox.storage.base.MailUser``)."""

    name: str
    home: str | None = None
    mail: str | None = None
    uid: int | None = None
    gid: int | None = None


def deliver(maildir: Path, data: bytes, *, fields: str = "SW", flags: str | None = None) -> str:
    """Deliver ``data`` into ``maildir`` (created if missing) and return the base name.

    Args:
        maildir: the Maildir directory.
        data: the message as stored.
        fields: which size fields the name carries: ``"SW"``, ``"S"``, ``"W"`` or ``""``.
            ``S`` is the file size, ``W`` the size with CRLF line endings.
        flags: if not ``None``, move the message to ``cur/`` with ``:2,<flags>``.
    """
    for directory in ("cur", "new", "tmp"):
        (maildir / directory).mkdir(parents=True, exist_ok=True)
    base = _unique_name()
    if "S" in fields:
        base += f",S={len(data)}"
    if "W" in fields:
        bare_lfs = data.count(b"\n") - data.count(b"\r\n")
        base += f",W={len(data) + bare_lfs}"
    temporary = maildir / "tmp" / base
    temporary.write_bytes(data)
    os.rename(temporary, maildir / "new" / base)
    if flags is not None:
        os.rename(maildir / "new" / base, maildir / "cur" / f"{base}:2,{flags}")
    return base


def set_flags(maildir: Path, base: str, flags: str) -> Path:
    """Move message ``base`` to ``cur/`` with ``:2,<flags>``, wherever it is; return the path."""
    for directory in ("new", "cur"):
        for entry in (maildir / directory).iterdir():
            if entry.name == base or entry.name.startswith(f"{base}:"):
                target = maildir / "cur" / f"{base}:2,{flags}"
                os.rename(entry, target)
                return target
    msg = f"no message {base!r} in {maildir}"
    raise FileNotFoundError(msg)


def _unique_name() -> str:
    """Return ``<secs>.M<usec>P<pid>Q<n>.<host>``, increasing with every call."""
    now = max(time.time_ns() // 1000, _state["last"] + 1)
    _state["last"] = now
    _state["count"] += 1
    seconds, micros = divmod(now, 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{seconds}.M{micros}P{os.getpid()}Q{_state['count']}.{host}"


def incoming(data: bytes, header: bytes = b"") -> IncomingMessage:
    """Return ``data`` (as received: CRLF or LF lines) as a message to deliver."""
    return IncomingMessage(header, Spool.from_bytes(data))


@contextlib.contextmanager
def index_lock_held(maildir: Path) -> Iterator[None]:
    """Hold a ``flock`` on the maildir's ``pobox-uidlist.lock`` for the block, as its user may.

    The lock is taken on a descriptor of its own, so it excludes pobox as another process's
    would (``flock`` locks belong to open file descriptions).
    """
    fd = os.open(maildir / "pobox-uidlist.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def swap_for_link(directory: Path, target: Path) -> None:
    """Move ``directory`` aside (``<name>.real``) and put a link to ``target`` in its place."""
    directory.rename(directory.with_name(f"{directory.name}.real"))
    directory.symlink_to(target)
