"""A minimal, strict POP3 client for the conformance suite: raw lines in, nothing forgiven.

Unlike :mod:`poplib`, it hides nothing a check needs to see: it keeps each multi-line
response as the raw lines the server sent (dot-stuffing and line ends intact), notes a bare
LF, and records every status line in :attr:`Wire.status_lines` so that later checks can
look at the response codes of the whole run.

May import: the standard library only (the suite is black-box: nothing of the server).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Final

__all__ = ["Connection", "ConnectionLost", "Reply", "Target", "Wire", "unstuff"]

#: The longest line read before the server is declared broken. RFC 2449 §4 caps a
#: response line at 512 octets; message lines may be longer (RFC 5322 §2.1.1 allows 998
#: and real mail breaks even that), so this is generous.
MAX_LINE: Final = 1024 * 1024


class ConnectionLost(Exception):
    """The server closed the connection, timed out, or sent something unreadable."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to connect, and as whom.

    Attributes:
        mode: ``"plain"``, ``"tls"`` (TLS from the first byte) or ``"starttls"`` (STLS
            right after the greeting, on every connection).
        context: the client TLS context (``None`` for ``"plain"``).
    """

    host: str
    port: int
    user: str
    password: str
    mode: str = "plain"
    context: ssl.SSLContext | None = None
    timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class Reply:
    """A status line: ``ok`` for ``+OK``, ``text`` after the indicator and its space."""

    ok: bool
    text: bytes
    line: bytes

    @property
    def continuation(self) -> bool:
        """Whether this is a SASL continuation (``+`` alone or ``+ data``)."""
        return self.line == b"+" or self.line.startswith(b"+ ")


@dataclass
class Wire:
    """What every connection of a run shares: the status lines seen, in order."""

    status_lines: list[bytes] = field(default_factory=list)


def unstuff(raw: list[bytes]) -> bytes:
    """Return the content of a multi-line body from its raw lines (terminator excluded).

    RFC 1939 §3: a line beginning with the termination octet has it doubled; the client
    removes the first.
    """
    return b"".join(line[1:] if line.startswith(b".") else line for line in raw)


class Connection:
    """One POP3 connection (blocking socket, with a timeout on every read)."""

    def __init__(self, target: Target, wire: Wire) -> None:
        """Connect (and for ``tls`` mode, handshake); the greeting is read by :meth:`greeting`."""
        self.target = target
        self.wire = wire
        self.bare_lf = False
        self._buffer = bytearray()
        try:
            sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        self._sock: socket.socket = sock
        if target.mode == "tls":
            self._wrap()

    def _wrap(self) -> None:
        assert self.target.context is not None
        try:
            self._sock = self.target.context.wrap_socket(
                self._sock, server_hostname=self.target.host
            )
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise ConnectionLost(f"TLS handshake failed: {exc}") from exc

    def starttls(self) -> Reply:
        """Send STLS; on ``+OK`` do the TLS handshake. Return the reply."""
        reply = self.command(b"STLS")
        if reply.ok:
            if self._buffer:
                raise ConnectionLost("the server sent data after its STLS reply, before TLS")
            self._wrap()
        return reply

    def close(self) -> None:
        """Close the socket (no QUIT)."""
        self._sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(f"sending failed: {exc}") from exc

    def readline(self) -> bytes:
        """Return the next line with its line end (CRLF, or a bare LF, which is noted)."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                if not line.endswith(b"\r\n"):
                    self.bare_lf = True
                return line
            if len(self._buffer) > MAX_LINE:
                raise ConnectionLost(f"a line longer than {MAX_LINE} octets")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise ConnectionLost(f"no answer within {self.target.timeout:g} s") from exc
            except OSError as exc:
                raise ConnectionLost(f"reading failed: {exc}") from exc
            if not chunk:
                raise ConnectionLost("the server closed the connection")
            self._buffer += chunk

    def at_eof(self) -> bool:
        """Whether the server closes the connection now (after QUIT), sending nothing more."""
        if self._buffer:
            return False
        try:
            return self._sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def reply(self) -> Reply:
        """Read one status line."""
        raw = self.readline()
        line = raw.rstrip(b"\r\n")
        self.wire.status_lines.append(line)
        if line == b"+OK" or line.startswith(b"+OK "):
            return Reply(True, line[4:], line)
        if line == b"-ERR" or line.startswith(b"-ERR "):
            return Reply(False, line[5:], line)
        if line == b"+" or line.startswith(b"+ "):
            return Reply(False, line[2:], line)
        raise ConnectionLost(f"not a POP3 status line: {line[:80]!r}")

    def command(self, line: bytes) -> Reply:
        """Send one command line and read its status line."""
        self.send(line + b"\r\n")
        return self.reply()

    def body(self) -> list[bytes]:
        """Read the lines of a multi-line body up to the terminating ``.`` (excluded), raw."""
        lines: list[bytes] = []
        while True:
            line = self.readline()
            if line.rstrip(b"\r\n") == b".":
                return lines
            lines.append(line)

    def multi(self, line: bytes) -> tuple[Reply, list[bytes]]:
        """Send a command whose ``+OK`` is followed by a multi-line body; return both."""
        reply = self.command(line)
        return reply, (self.body() if reply.ok else [])
