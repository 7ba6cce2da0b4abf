"""The Python floor: the least a uvloop POP3 server must do for the benchmark's workloads.

    python bench/floor.py --port PORT --passwd PASSWD-FILE

Not a server anyone should run: no lock, no log, no limit, no timeout, no TLS, no privilege
separation, no check of what the files are, no UPDATE (DELE is not even parsed), and the
passwd-file is read once. It answers exactly the commands the load generator sends
(``USER``, ``PASS``, ``STAT``, ``LIST``, ``UIDL``, ``RETR``, ``QUIT``) with answers the
generator checks like any other server's (every RETR's content, un-stuffed, against the
delivered message), doing the same work per command as any POP3 server must: the password
compared or hashed, the Maildir listed at login, each RETR's file opened, read, put in wire
form (CRLF line ends, dot-stuffing, the terminator) and sent in one write.

``bench/run.py --servers python-floor,...`` runs it beside pobox and Dovecot, on the same
data and the same core. What it measures: how far a CPython + uvloop server can go at
most with this design; the gap between it and pobox is pobox's own work (safety, locks,
logging, limits, the sans-IO core), the gap between it and Dovecot is what Python costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import warnings
from pathlib import Path

import uvloop

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # SHA512-CRYPT, as pobox checks it (the C library's crypt(3))

import argon2

_HASHER = argon2.PasswordHasher()


def _verify(stored: str, password: str) -> bool:
    scheme, _, value = stored[1:].partition("}")
    if scheme == "PLAIN":
        return value == password
    if scheme == "SHA512-CRYPT":
        return crypt.crypt(password, value) == value
    if scheme == "ARGON2ID":
        try:
            return _HASHER.verify(value, password)
        except argon2.exceptions.VerificationError:
            return False
    return False


def _users(passwd: Path) -> dict[str, tuple[str, str]]:
    """name -> (stored password, Maildir path)."""
    users = {}
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        users[fields[0]] = (fields[1], fields[5] + "/Maildir")
    return users


def _listing(maildir: str) -> list[tuple[str, int]]:
    """(path, POP3 size from W=) of each message, in name order."""
    found = []
    for sub in ("new", "cur"):
        with os.scandir(f"{maildir}/{sub}") as entries:
            for entry in entries:
                size = int(entry.name.rsplit("W=", 1)[1].split(":", 1)[0].split(",", 1)[0])
                found.append((entry.name, entry.path, size))
    found.sort()
    return [(path, size) for _, path, size in found]


def _wire(data: bytes) -> bytes:
    """A message in wire form: CRLF line ends, dot-stuffed, the terminator after it."""
    if b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class Floor(asyncio.Protocol):
    def __init__(self, users: dict[str, tuple[str, str]]) -> None:
        self.users = users
        self.buf = b""
        self.user = ""
        self.messages: list[tuple[str, int]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport
        transport.write(b"+OK floor ready.\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            reply = self.answer(line)
            if reply:
                self.transport.write(reply)  # type: ignore[attr-defined]

    def answer(self, line: bytes) -> bytes:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        messages = self.messages
        if verb == b"RETR" and messages is not None:
            path, size = messages[int(arg) - 1]
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.read(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            return b"+OK %d octets\r\n" % size + _wire(data)
        if verb == b"USER":
            self.user = arg.decode()
            return b"+OK\r\n"
        if verb == b"PASS":
            found = self.users.get(self.user)
            if found is None or not _verify(found[0], arg.decode()):
                return b"-ERR [AUTH] Authentication failed.\r\n"
            self.messages = _listing(found[1])
            return b"+OK Logged in.\r\n"
        if verb == b"QUIT":
            self.transport.write(b"+OK Logging out.\r\n")  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]
            return b""
        if messages is None:
            return b"-ERR Unknown command.\r\n"
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (len(messages), sum(size for _, size in messages))
        if verb == b"LIST":
            lines = [b"%d %d\r\n" % (n, size) for n, (_, size) in enumerate(messages, 1)]
            return b"+OK\r\n" + b"".join(lines) + b".\r\n"
        if verb == b"UIDL":
            lines = [
                b"%d %s\r\n" % (n, os.path.basename(path).split(",", 1)[0].encode())
                for n, (path, _) in enumerate(messages, 1)
            ]
            return b"+OK\r\n" + b"".join(lines) + b".\r\n"
        return b"-ERR Unknown command.\r\n"


async def serve(port: int, passwd: Path) -> None:
    users = _users(passwd)
    loop = asyncio.get_running_loop()
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    server = await loop.create_server(lambda: Floor(users), sock=sock)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--passwd", type=Path, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.passwd))


if __name__ == "__main__":
    main()
