"""Helpers for the delivery tests: a running pobox with its delivery listeners, a POP3 reader,
a raw SMTP/LMTP client, and a look at the spool files a process holds open."""

from __future__ import annotations

import asyncio
import os
import poplib
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.cli import build_store
from pobox.delivery import DeliveryServer, build_agent
from pobox.testing import RunningServer, running_server
from tests.integration.wire import Wire

PASSWORD = "secret"

#: A ``Received:`` header with its folded continuation lines (LF or CRLF line ends).
_RECEIVED = re.compile(rb"^Received: [^\n]*\n(?:\t[^\n]*\n)*", re.MULTILINE)


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Return the first ``Received:`` header of ``data`` and ``data`` without it.

    The header carries a date and an id, different every time: tests check its shape with
    a pattern and compare the rest byte for byte.
    """
    match = _RECEIVED.search(data)
    assert match is not None, data[:300]
    return match.group(0), data[: match.start()] + data[match.end() :]


#: Seconds a raw client waits for a reply (a deadline for the test, not a timed assertion).
REPLY_DEADLINE = 30.0


@dataclass
class Running:
    """A pobox serving POP3 and delivering over LMTP/SMTP."""

    pop3: RunningServer
    delivery: DeliveryServer

    @property
    def lmtp(self) -> tuple[str, int]:
        """The LMTP TCP address."""
        return self.delivery.address("lmtp")

    @property
    def smtp(self) -> tuple[str, int]:
        """The SMTP TCP address."""
        return self.delivery.address("smtp")


@asynccontextmanager
async def running_pobox(
    root: Path,
    users: tuple[str, ...] = ("alice",),
    *,
    extra_fields: Mapping[str, str] | None = None,
    **settings: Any,
) -> AsyncIterator[Running]:
    """Run pobox with POP3 and delivery listeners (LMTP and SMTP on loopback by default).

    Args:
        extra_fields: passwd-file extra fields by user (``"quota_bytes=10"``).
    """
    settings.setdefault("lmtp_listen", ["127.0.0.1:0"])
    settings.setdefault("smtp_listen", ["127.0.0.1:0"])
    settings.setdefault("hostname", "mx.pobox.test")
    async with running_server(root, dict.fromkeys(users, PASSWORD), **settings) as pop3:
        if extra_fields:
            passwd = Path(pop3.config.passwd_file)
            lines = []
            for entry in passwd.read_text().splitlines():
                name = entry.partition(":")[0]
                if name in extra_fields:
                    # user:password:uid:gid:gecos:home:shell:extra fields
                    padded = entry.ljust(len(entry) + 7 - entry.count(":"), ":")
                    entry = padded + extra_fields[name]  # noqa: PLW2901 - the entry, extended
                lines.append(entry + "\n")
            passwd.write_text("".join(lines))
        config = pop3.config
        agent = build_agent(
            config, PasswdFileAuthenticator(config.passwd_file), build_store(config)
        )
        delivery = DeliveryServer(config, agent)
        await delivery.start()
        try:
            yield Running(pop3, delivery)
        finally:
            await delivery.aclose()


def retrieve_all(host: str, port: int, user: str, *, delete: bool = False) -> list[bytes]:
    """Log in by POP3 and return every message as RETR sends it (CRLF lines, unstuffed)."""
    client = poplib.POP3(host, port, timeout=30)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        messages = []
        for number in range(1, count + 1):
            _, lines, _ = client.retr(number)
            messages.append(b"".join(line + b"\r\n" for line in lines))
            if delete:
                client.dele(number)
    finally:
        client.quit()
    return messages


async def connect(address: tuple[str, int] | Path, *, source: str | None = None) -> Wire:
    """Open a raw connection to a TCP address (from ``source``) or a Unix socket path."""
    if isinstance(address, Path):
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(*address, local_addr=local)
    return Wire(reader, writer)


async def reply(wire: Wire, timeout: float = REPLY_DEADLINE) -> bytes:
    """Read one SMTP reply, every line of it (RFC 5321 §4.2.1: ``NNN-`` goes on)."""
    out = b""
    while True:
        line = await wire.line(timeout)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


async def start_data(wire: Wire, rcpt: bytes = b"alice", *, lmtp: bool = False) -> None:
    """Read the greeting and go as far as ``354`` after DATA, asserting every reply."""
    assert (await reply(wire)).startswith(b"220 ")
    await wire.send((b"LHLO" if lmtp else b"EHLO") + b" client.test\r\n")
    assert (await reply(wire)).startswith(b"250")
    for command in (b"MAIL FROM:<s@example.org>", b"RCPT TO:<" + rcpt + b">", b"DATA"):
        await wire.send(command + b"\r\n")
        answer = await reply(wire)
        assert answer[:1] in (b"2", b"3"), (command, answer)


def open_files_in(directory: Path, pid: int | str = "self") -> list[int]:
    """Return the sizes of the files under ``directory`` that process ``pid`` holds open.

    Spool files have no name (``O_TMPFILE``) but their descriptor still says where they are:
    ``/proc/PID/fd/N`` links to ``DIRECTORY/#INODE (deleted)``.
    """
    prefix = f"{directory}/"
    sizes = []
    fds = Path(f"/proc/{pid}/fd")
    for entry in fds.iterdir():
        try:
            target = os.readlink(entry)
            if target.startswith(prefix):
                sizes.append(os.stat(entry).st_size)
        except FileNotFoundError:  # closed meanwhile
            continue
    return sizes


def maildir_files(root: Path, user: str = "alice") -> list[Path]:
    """Return every file in ``user``'s maildir: ``new``, ``cur`` and ``tmp``."""
    maildir = root / "mail" / user
    return [path for sub in ("new", "cur", "tmp") for path in (maildir / sub).glob("*")]
