"""A tiny POP3 server with bugs to order, to show that the conformance checks can fail.

``async with fake_server({"no-stuffing"}) as port:`` serves the seed messages to any
USER/PASS on ``127.0.0.1:port``; each flaw is a bug seen in real servers:

- ``no-stuffing``: RETR and TOP do not double a leading dot;
- ``top-miscount``: TOP n k counts the blank line after the header as a body line;
- ``no-quit-reply``: QUIT closes the connection without ``+OK``;
- ``stat-after-dele``: STAT and LIST still count messages marked deleted;
- ``pipelining-order``: a batch of commands is answered last first;
- ``bad-expire``: CAPA says ``EXPIRE soon`` (RFC 2449 §6.7 wants a number or NEVER);
- ``bad-delay``: CAPA says ``LOGIN-DELAY 15m`` (RFC 2449 §6.5 wants seconds);
- ``user-after-login``: CAPA after login still says ``EXPIRE 30 USER`` (USER is for before
  login: logged in, the value is the user's own);
- ``bad-resp-code``: a wrong password gets ``-ERR [AUTH wrong`` (no closing bracket);
- ``auth-no-initial``: AUTH PLAIN refuses an initial response (RFC 5034 §4 allows one);
- ``utf8-refused``: UTF8 is advertised, the command gets -ERR;
- ``utf8-no-prep``: after UTF8, USER and PASS are compared as sent (no SASLprep), so
  credentials typed in fullwidth letters are refused;
- ``bad-lang``: LANG lists ``en_US`` (not a language tag);
- ``evil-greeting``: the greeting is ``-ERR`` with terminal escapes and a line break;
- ``endless-line``: the greeting never ends (2 MiB without a line break);
- ``rset-ignored``: RSET answers ``+OK`` and unmarks nothing.

Without flaws it is a correct (small) POP3 server: the suite passes it.
"""

from __future__ import annotations

import asyncio
import base64
import unicodedata
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pobox.conformance import SEED_MESSAGES

__all__ = ["FLAWS", "Fake", "fake_server"]

FLAWS = frozenset(
    {
        "no-stuffing",
        "top-miscount",
        "no-quit-reply",
        "stat-after-dele",
        "pipelining-order",
        "bad-expire",
        "bad-delay",
        "user-after-login",
        "bad-resp-code",
        "auth-no-initial",
        "utf8-refused",
        "utf8-no-prep",
        "bad-lang",
        "evil-greeting",
        "endless-line",
        "rset-ignored",
    }
)
_CAPA = (
    b"CAPA\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
    b"SASL PLAIN\r\nLOGIN-DELAY 900\r\nUTF8 USER\r\nLANG\r\nIMPLEMENTATION fake-pop3 1.0\r\n"
)
_CREDENTIALS = b"\0alice\0secret"


def _uid(message: bytes) -> bytes:
    return b"uid-%d" % SEED_MESSAGES.index(message)


class _Session:
    def __init__(self, flaws: Collection[str], store: list[bytes]) -> None:
        self.flaws = flaws
        self.store = store
        self.messages = list(store)  # the maildrop as it was at the start
        self.user = b""
        self.logged_in = False
        self.deleted: set[int] = set()
        self.quit = False
        self.sasl = False  # waiting for the AUTH PLAIN response
        self.utf8 = False  # after UTF8: USER and PASS arguments are NFKC-normalised

    def _number(self, arg: bytes) -> int | None:
        if not arg.isdigit():
            return None
        number = int(arg)
        if not 1 <= number <= len(self.messages) or number in self.deleted:
            return None
        return number

    def _lines(self, data: bytes) -> bytes:
        if "no-stuffing" in self.flaws:
            return data + b".\r\n"
        stuffed = b"".join(
            b"." + line if line.startswith(b".") else line
            for line in data.splitlines(keepends=True)
        )
        return stuffed + b".\r\n"

    def _plain(self, response: bytes) -> bytes:
        if response == b"*":
            return b"-ERR cancelled\r\n"
        try:
            decoded = base64.b64decode(response, validate=True)
        except ValueError:
            return b"-ERR bad base64\r\n"
        if decoded != _CREDENTIALS:
            return (
                b"-ERR [AUTH wrong\r\n" if "bad-resp-code" in self.flaws else b"-ERR [AUTH] no\r\n"
            )
        self.logged_in = True
        return b"+OK logged in\r\n"

    def _visible(self) -> list[int]:
        if "stat-after-dele" in self.flaws:
            return list(range(1, len(self.messages) + 1))
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def answer(self, line: bytes) -> bytes | None:
        """Return the reply to one command line (``None``: close without a reply)."""
        if self.sasl:
            self.sasl = False
            return self._plain(line)
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"CAPA":
            expire = b"EXPIRE soon" if "bad-expire" in self.flaws else b"EXPIRE 30"
            if "user-after-login" in self.flaws and self.logged_in:
                expire += b" USER"
            capa = _CAPA
            if "bad-delay" in self.flaws:
                capa = capa.replace(b"LOGIN-DELAY 900", b"LOGIN-DELAY 15m")
            return b"+OK\r\n" + capa + expire + b"\r\n.\r\n"
        if verb == b"LANG" and arg:
            return b"+OK\r\n" if arg in (b"en", b"de") else b"-ERR [LANG] unknown\r\n"
        if verb == b"LANG":
            tag = b"en_US" if "bad-lang" in self.flaws else b"en"
            return b"+OK\r\n" + tag + b" English\r\nde Deutsch\r\n.\r\n"
        if verb == b"QUIT":
            self.quit = True
            for gone in sorted(self.deleted, reverse=True):  # the UPDATE state
                del self.store[self.store.index(self.messages[gone - 1])]
            return None if "no-quit-reply" in self.flaws else b"+OK bye\r\n"
        if verb == b"NOOP" and self.logged_in:
            return b"+OK\r\n"
        if not self.logged_in:
            if self.utf8 and verb in (b"USER", b"PASS") and "utf8-no-prep" not in self.flaws:
                # SASLprep's NFKC is what fullwidth letters need (a fake: no other step).
                arg = unicodedata.normalize("NFKC", arg.decode("utf-8", "replace")).encode()
            if verb == b"USER" and arg:
                self.user = arg
                return b"+OK\r\n"
            if verb == b"PASS" and self.user:
                return self._plain(base64.b64encode(b"\0" + self.user + b"\0" + arg))
            if verb == b"AUTH" and arg.upper() == b"PLAIN":
                self.sasl = True
                return b"+ \r\n"
            if verb == b"AUTH" and arg.upper().startswith(b"PLAIN "):
                if "auth-no-initial" in self.flaws:
                    return b"-ERR no initial response, please\r\n"
                return self._plain(arg[6:])
            if verb == b"UTF8" and "utf8-refused" not in self.flaws:
                self.utf8 = True
                return b"+OK UTF8 on\r\n"
            return b"-ERR not now\r\n"
        visible = self._visible()
        sizes = {n: len(self.messages[n - 1]) for n in visible}
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (len(visible), sum(sizes.values()))
        if verb == b"RSET":
            if "rset-ignored" not in self.flaws:
                self.deleted.clear()
            return b"+OK\r\n"
        if verb in (b"LIST", b"UIDL") and not arg:
            body = b"".join(
                b"%d %d\r\n" % (n, sizes[n])
                if verb == b"LIST"
                else b"%d %s\r\n" % (n, _uid(self.messages[n - 1]))
                for n in visible
            )
            return b"+OK\r\n" + body + b".\r\n"
        args = arg.split(b" ")
        number = self._number(args[0])
        if number is None:
            return b"-ERR no such message\r\n"
        data = self.messages[number - 1]
        if verb == b"LIST":
            return b"+OK %d %d\r\n" % (number, len(data))
        if verb == b"UIDL":
            return b"+OK %d %s\r\n" % (number, _uid(data))
        if verb == b"DELE":
            self.deleted.add(number)
            return b"+OK\r\n"
        if verb == b"RETR":
            return b"+OK\r\n" + self._lines(data)
        if verb == b"TOP" and len(args) == 2 and args[1].isdigit():
            header, _, body = data.partition(b"\r\n\r\n")
            count = int(args[1])
            if "top-miscount" in self.flaws:
                count = max(count - 1, 0)
            kept = b"".join(body.splitlines(keepends=True)[:count])
            return b"+OK\r\n" + self._lines(header + b"\r\n\r\n" + kept)
        return b"-ERR bad command\r\n"


@dataclass
class Fake:
    """A running fake server: its port, and the messages it holds (UPDATE removes them)."""

    port: int
    store: list[bytes]


@asynccontextmanager
async def fake_server(flaws: Collection[str] = ()) -> AsyncIterator[Fake]:
    """Serve the seed messages with ``flaws`` on a loopback port."""
    unknown = set(flaws) - FLAWS
    assert not unknown, unknown

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(flaws, store)
        if "evil-greeting" in flaws:
            writer.write(b"-ERR \x1b[2J\x1b[31mPASS  forged\rline\r\n")
        elif "endless-line" in flaws:
            writer.write(b"+OK " + b"x" * (2 * 1024 * 1024))
        else:
            writer.write(b"+OK fake POP3 ready\r\n")
        buffer = b""
        try:
            while chunk := await reader.read(65536):
                # A pipelined batch arrives in one read on loopback (one small send).
                *lines, buffer = (buffer + chunk).split(b"\n")
                replies = [session.answer(line.rstrip(b"\r")) for line in lines]
                if "pipelining-order" in flaws:
                    replies.reverse()
                closing = session.quit
                writer.write(b"".join(reply for reply in replies if reply is not None))
                await writer.drain()
                if closing:
                    break
        finally:
            writer.close()

    store = list(SEED_MESSAGES)
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Fake(server.sockets[0].getsockname()[1], store)
    finally:
        server.close()
        await server.wait_closed()
