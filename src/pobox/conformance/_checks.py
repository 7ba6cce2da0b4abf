"""The checks: one run of black-box RFC 1939/2449/3206/2595/5034/6856 checks against a server.

Theory of operation: :class:`Suite` opens a main session, reads CAPA before and after
login, lists and retrieves the maildrop, and then works through the checks in a fixed
order; a few checks open sessions of their own (a wrong password, AUTH, STLS, UIDL
stability, the UPDATE state). Each check ends as PASS, FAIL (with what was seen) or SKIP
(with the reason: the server does not advertise the capability, or the maildrop has no
message the check needs). A broken connection fails the check that was running, never the
run: the next check that needs a session opens a new one.

Nothing is removed unless ``allow_delete``: the DELE checks end with RSET, and every
session ends with RSET before QUIT. With it, one message (the last) is deleted for good to
check the UPDATE state (RFC 1939 §6).

May import: the standard library and :mod:`pobox.conformance` only.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterator
from typing import Final

from pobox.conformance._client import Connection, ConnectionLost, Reply, Target, Wire, unstuff
from pobox.conformance._report import Check, Report, Status

__all__ = ["SEED_MESSAGES", "Suite", "run_suite"]

#: Messages to put in the maildrop before a run (``\r\n`` or ``\n`` line ends, as a
#: delivery agent stores them): each check then finds what it needs. The second has lines
#: that begin with dots (byte-stuffing), the first enough body lines to count TOP's, the
#: third no body at all.
SEED_MESSAGES: Final = (
    b"From: seed@example.org\r\nTo: user@example.org\r\nSubject: conformance one\r\n"
    b"Message-ID: <seed1@example.org>\r\n\r\n"
    b"line 1\r\nline 2\r\nline 3\r\nline 4\r\nline 5\r\n",
    b"From: seed@example.org\r\nTo: user@example.org\r\nSubject: conformance dots\r\n"
    b"Message-ID: <seed2@example.org>\r\n\r\n"
    b".leading dot\r\n..two dots\r\nplain\r\n.\r\nlast\r\n",
    b"From: seed@example.org\r\nTo: user@example.org\r\nSubject: conformance no body\r\n"
    b"Message-ID: <seed3@example.org>\r\n\r\n",
)

#: At most this many messages are asked for one by one (LIST n, RETR, TOP, UIDL n): a
#: big maildrop is checked on its first messages.
MAX_RETRIEVED: Final = 50

_STAT: Final = re.compile(rb"(\d+) (\d+)(?: .*)?")
_SCAN: Final = re.compile(rb"(\d+) (\d+)(?: .*)?")
_UIDL: Final = re.compile(rb"(\d+) ([\x21-\x7e]{1,70})")
# RFC 2449 §6: capa-tag = 1*cchar; a keyword, then parameters, all printable.
_CAPA: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*(?: [\x21-\x7e]+)*")
# RFC 2449 §8: resp-code = "[" resp-level *("/" resp-level) "]"; schar excludes "]".
_RESP_CODE: Final = re.compile(
    rb"\[[\x21-\x2e\x30-\x5c\x5e-\x7e]+(?:/[\x21-\x2e\x30-\x5c\x5e-\x7e]+)*\]"
)
# RFC 2449 §6.5/§6.7: EXPIRE SP (digits / "NEVER") [SP "USER"]; LOGIN-DELAY SP digits
# [SP "USER"]; USER (the value varies per user) only before login, where it may be shown.
_EXPIRE_PRE: Final = re.compile(r"(?:\d+|NEVER)(?: USER)?")
_EXPIRE_POST: Final = re.compile(r"\d+|NEVER")
_DELAY_PRE: Final = re.compile(r"\d+(?: USER)?")
_DELAY_POST: Final = re.compile(r"\d+")
# RFC 6856 §3: LANG lines are a language tag (RFC 5646, loosely) and a description.
_LANG_LINE: Final = re.compile(rb"(?:\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*) [\x20-\xff]+")

_1939, _2449, _3206, _2595, _5034, _6856 = (
    "RFC 1939",
    "RFC 2449",
    "RFC 3206",
    "RFC 2595",
    "RFC 5034",
    "RFC 6856",
)


class _Fail(Exception):
    """The check failed; the message says what was seen."""


class _Skip(Exception):
    """The check does not apply; the message says why."""


class _Abort(Exception):
    """Nothing more can be checked (no greeting, no login)."""


def _expect(condition: bool, detail: str) -> None:
    if not condition:
        raise _Fail(detail)


def _ok(reply: Reply, what: str) -> None:
    _expect(reply.ok, f"{what}: expected +OK, got {reply.line[:100]!r}")


def _err(reply: Reply, what: str) -> None:
    _expect(
        not reply.ok and reply.line.startswith(b"-ERR"),
        f"{what}: expected -ERR, got {reply.line[:100]!r}",
    )


def _fullwidth(text: str) -> str | None:
    """Return printable ASCII ``text`` in its fullwidth forms (U+FF01...), else ``None``.

    A space becomes U+3000 IDEOGRAPHIC SPACE, which SASLprep maps back to a space.
    """
    if not text or not all(" " <= c <= "~" for c in text):
        return None
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) for c in text)


def _crlf_lines(data: bytes) -> list[bytes]:
    """Split ``data`` into lines ending in CRLF (a lone CR or LF is not a line end)."""
    lines = [part + b"\r\n" for part in data.split(b"\r\n")]
    last = lines.pop()[:-2]  # what follows the last CRLF
    if last:
        lines.append(last)
    return lines


def _parse_capa(lines: list[bytes]) -> tuple[dict[str, list[str]], list[str]]:
    """Return the capabilities (keyword upper-cased → parameters) and the malformed lines."""
    caps: dict[str, list[str]] = {}
    bad = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not _CAPA.fullmatch(line):
            bad.append(repr(line[:80]))
            continue
        keyword, *params = line.decode("ascii").split(" ")
        if keyword.upper() in caps:
            bad.append(f"{keyword} twice")
        caps[keyword.upper()] = params
    return caps, bad


class Suite:
    """One conformance run against ``target``."""

    def __init__(self, target: Target, *, allow_delete: bool = False) -> None:
        """Prepare a run; :meth:`run` runs it."""
        self.target = target
        self.allow_delete = allow_delete
        self.report = Report(f"{target.host}:{target.port} ({target.mode})")
        self.wire = Wire()
        self.caps: dict[str, list[str]] | None = None  # None: CAPA not supported
        self.caps_after: dict[str, list[str]] | None = None
        self.count = 0
        self.octets = 0
        self.sizes: dict[int, int] = {}
        self.uidls: dict[int, bytes] = {}
        self.raw: dict[int, list[bytes]] = {}
        self.worked: set[str] = set()
        self.main: Connection | None = None

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def check(self, rfc: str, check_id: str, title: str) -> Iterator[None]:
        """Record the outcome of the block as a check."""
        try:
            yield
        except _Skip as exc:
            self.report.checks.append(Check(rfc, check_id, title, Status.SKIP, str(exc)))
        except _Fail as exc:
            self.report.checks.append(Check(rfc, check_id, title, Status.FAIL, str(exc)))
        except ConnectionLost as exc:
            self.report.checks.append(Check(rfc, check_id, title, Status.FAIL, str(exc)))
            if self.main is not None:
                self.main.close()
                self.main = None
        except (ValueError, IndexError) as exc:
            detail = f"a reply the check cannot parse ({exc})"
            self.report.checks.append(Check(rfc, check_id, title, Status.FAIL, detail))
        else:
            self.report.checks.append(Check(rfc, check_id, title, Status.PASS))

    def _open(self) -> Connection:
        """Connect, read the greeting, and in ``starttls`` mode do STLS."""
        conn = Connection(self.target, self.wire)
        try:
            greeting = conn.reply()
            _ok(greeting, "greeting")
            if self.target.mode == "starttls":
                _ok(conn.starttls(), "STLS")
        except BaseException:
            conn.close()
            raise
        return conn

    def _login(self, conn: Connection) -> None:
        _ok(conn.command(b"USER " + self.target.user.encode()), "USER")
        _ok(conn.command(b"PASS " + self.target.password.encode()), "PASS")

    def _session(self) -> Connection:
        """Return the main session, logged in (a new one if the last was lost)."""
        if self.main is None:
            conn = self._open()
            try:
                self._login(conn)
            except BaseException:
                conn.close()
                raise
            self.main = conn
        return self.main

    def _end(self, conn: Connection) -> None:
        """End a side session: RSET, QUIT, close, whatever state it is in."""
        with contextlib.suppress(ConnectionLost):
            conn.command(b"RSET")
            conn.command(b"QUIT")
        conn.close()

    def _expect_errors(self, commands: list[bytes], *, login: bool, when: str) -> None:
        """Check that each command gets -ERR: before login on a side session, after on the main.

        A server may close the connection after a few bad commands (Dovecot does after
        three before login): the command is then sent again on a new connection.
        """
        side: Connection | None = None
        try:
            for command in commands:
                for attempt in (1, 2):
                    if login:
                        conn = self._session()
                    else:
                        side = side or self._open()
                        conn = side
                    try:
                        reply = conn.command(command)
                        break
                    except ConnectionLost:
                        conn.close()
                        self.main = None if login else self.main
                        side = side if login else None
                        if attempt == 2:
                            raise
                _err(reply, f"{command.decode()} {when}".strip())
        finally:
            if side is not None:
                self._end(side)

    def _advertised(self, name: str, *, after: bool = False) -> bool:
        caps = self.caps_after if after else self.caps
        return caps is None or name in caps

    def _need(self, name: str) -> None:
        if self.caps is not None and name not in self.caps and name not in (self.caps_after or {}):
            raise _Skip(f"{name} not advertised in CAPA")

    # ------------------------------------------------------------------ the run

    def run(self) -> Report:
        """Run every check; return the report."""
        with contextlib.suppress(_Abort):
            self._authorization()
            self._transaction()
            self._deletion()
            self._pipelining()
            self._quit_and_update()
            self._side_sessions()
            self._extensions()
        if self.main is not None:
            self.main.close()
        return self.report

    def _authorization(self) -> None:
        conn: Connection | None = None
        with self.check(_1939, "greeting", "the greeting is +OK"):
            conn = Connection(self.target, self.wire)
            _ok(conn.reply(), "greeting")
        if conn is None:
            raise _Abort
        try:
            if self.report.checks[-1].status is not Status.PASS:
                raise _Abort
            self._first_session(conn)
        finally:
            if self.main is not conn:
                conn.close()

    def _first_session(self, conn: Connection) -> None:
        with self.check(_2449, "capa", "CAPA before login: +OK and well-formed lines"):
            reply, lines = conn.multi(b"CAPA")
            if not reply.ok:
                raise _Skip("CAPA not supported (-ERR): RFC 2449 checks assume the RFC 1939 set")
            self.caps, bad = _parse_capa(lines)
            _expect(not bad, f"malformed capability lines: {', '.join(bad)}")
        if self.target.mode == "starttls":
            with self.check(_2595, "stls-capa", "after STLS, CAPA again and no STLS in it"):
                _expect(self._advertised("STLS"), "--starttls, but STLS is not advertised")
                _ok(conn.starttls(), "STLS")
                self.worked.add("STLS")
                reply, lines = conn.multi(b"CAPA")
                _ok(reply, "CAPA after STLS")
                self.caps, _bad = _parse_capa(lines)
                _expect("STLS" not in self.caps, "STLS still advertised inside TLS")
            if self.report.checks[-1].status is not Status.PASS:
                raise _Abort
        with self.check(_1939, "authorization-state", "-ERR for STAT/LIST/RETR/PASS before login"):
            commands = [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"PASS x"]
            self._expect_errors(commands, login=False, when="before USER")
        with self.check(_1939, "unknown-command", "-ERR for an unknown command"):
            self._expect_errors([b"XCONFORMANCE"], login=False, when="before login")
        with self.check(_1939, "user-pass", "USER and PASS log in"):
            self._login(conn)
            self.worked.add("USER")
            self.main = conn
        if self.main is None:
            raise _Abort
        with self.check(_2449, "capa-after-login", "CAPA after login: well-formed"):
            if self.caps is None:
                raise _Skip("CAPA not supported")
            reply, lines = conn.multi(b"CAPA")
            _ok(reply, "CAPA after login")
            self.caps_after, bad = _parse_capa(lines)
            _expect(not bad, f"malformed capability lines: {', '.join(bad)}")
        with self.check(_2595, "stls-not-after-login", "STLS not advertised after login"):
            advertised = self.caps is not None and "STLS" in self.caps
            if not advertised and self.target.mode != "starttls":
                raise _Skip("STLS not advertised in CAPA")
            _expect(
                self.caps_after is not None and "STLS" not in self.caps_after,
                "STLS advertised in the TRANSACTION state",
            )

    def _transaction(self) -> None:
        with self.check(_1939, "transaction-state", "-ERR for USER/PASS after login"):
            commands = [b"USER " + self.target.user.encode(), b"PASS x"]
            self._expect_errors(commands, login=True, when="after login")
        with self.check(_1939, "stat", "STAT: +OK count octets"):
            reply = self._session().command(b"STAT")
            _ok(reply, "STAT")
            found = _STAT.fullmatch(reply.text)
            _expect(found is not None, f"STAT reply {reply.line!r} is not '+OK nn mm'")
            assert found is not None
            self.count, self.octets = int(found[1]), int(found[2])
        with self.check(_1939, "list", "LIST: one 'n size' per message, matching STAT"):
            reply, lines = self._session().multi(b"LIST")
            _ok(reply, "LIST")
            for line in lines:
                found = _SCAN.fullmatch(line.rstrip(b"\r\n"))
                _expect(found is not None, f"LIST line {line!r} is not 'n size'")
                assert found is not None
                self.sizes[int(found[1])] = int(found[2])
            _expect(
                list(self.sizes) == list(range(1, self.count + 1)),
                f"LIST numbers {list(self.sizes)[:10]} are not 1..{self.count} (STAT's count)",
            )
            _expect(
                sum(self.sizes.values()) == self.octets,
                f"LIST sizes add up to {sum(self.sizes.values())}, STAT says {self.octets}",
            )
        if self.count == 0:
            if self.report.status("stat") is Status.PASS:
                raise _empty_maildrop(self)
            raise _Abort
        with self.check(_1939, "list-arg", "LIST n: '+OK n size' as in the listing"):
            conn = self._session()
            for number, size in list(self.sizes.items())[:MAX_RETRIEVED]:
                reply = conn.command(b"LIST %d" % number)
                _ok(reply, f"LIST {number}")
                found = _SCAN.fullmatch(reply.text)
                _expect(
                    found is not None and (int(found[1]), int(found[2])) == (number, size),
                    f"LIST {number} says {reply.line!r}, the listing {number} {size}",
                )
        with self.check(_1939, "bad-number", "-ERR for message numbers that do not exist"):
            past = self.count + 1
            commands = [
                b"LIST 0",
                b"LIST %d" % past,
                b"RETR %d" % past,
                b"RETR 0",
                b"DELE %d" % past,
                b"LIST x",
                b"RETR",
                b"LIST 99999999999999999999",
            ]
            self._expect_errors(commands, login=True, when="")
        with self.check(_1939, "unknown-command-transaction", "-ERR for an unknown command"):
            self._expect_errors([b"XCONFORMANCE"], login=True, when="after login")
        with self.check(_1939, "noop", "NOOP: +OK"):
            _ok(self._session().command(b"NOOP"), "NOOP")
        self._retrieve()
        self._top()
        self._uidl()

    def _retrieve(self) -> None:
        with self.check(_1939, "retr", "RETR: +OK, the message, '.' CRLF"):
            conn = self._session()
            for number in list(self.sizes)[:MAX_RETRIEVED]:
                conn.bare_lf = False
                reply, lines = conn.multi(b"RETR %d" % number)
                _ok(reply, f"RETR {number}")
                _expect(not conn.bare_lf, f"RETR {number}: a line ends in a bare LF, not CRLF")
                self.raw[number] = lines
        if not self.raw:
            return
        with self.check(_1939, "retr-size", "RETR sends exactly the octets LIST counts"):
            wrong = [
                f"{n}: LIST {self.sizes[n]}, RETR {len(unstuff(raw))}"
                for n, raw in self.raw.items()
                if len(unstuff(raw)) != self.sizes[n]
            ]
            _expect(not wrong, "; ".join(wrong[:5]))
        with self.check(_1939, "retr-stuffing", "RETR doubles a leading '.' (byte-stuffing)"):
            dotted = [
                (n, line) for n, raw in self.raw.items() for line in raw if line.startswith(b".")
            ]
            if not dotted:
                raise _Skip("no message has a line beginning with '.' (deliver the seed messages)")
            single = [(n, line) for n, line in dotted if not line.startswith(b"..")]
            _expect(
                not single,
                "not stuffed: "
                + "; ".join(f"RETR {n}: {line.rstrip()[:40]!r}" for n, line in single[:3]),
            )

    def _top(self) -> None:
        candidates = []
        for number, raw in self.raw.items():
            content = unstuff(raw)
            if content.startswith(b"\r\n"):
                header_len = 2
            else:
                separator = content.find(b"\r\n\r\n")
                header_len = len(content) if separator < 0 else separator + 4
            header = content[:header_len]
            body = _crlf_lines(content[header_len:])
            candidates.append((len(body), number, header, body))
        candidates.sort()
        with self.check(_1939, "top-0", "TOP n 0: the header and the blank line only"):
            self._need("TOP")
            if not candidates:
                raise _Skip("no message retrieved")
            conn = self._session()
            for _lines, number, header, _body in candidates:
                reply, raw = conn.multi(b"TOP %d 0" % number)
                _ok(reply, f"TOP {number} 0")
                got = unstuff(raw)
                _expect(
                    got == header,
                    f"TOP {number} 0 sent {len(got)} octets, the header is "
                    f"{len(header)}: {got[-40:]!r}",
                )
            self.worked.add("TOP")
        with self.check(_1939, "top-lines", "TOP n k: the header and exactly k body lines"):
            self._need("TOP")
            longest = candidates[-1] if candidates else None
            if longest is None or longest[0] < 2:
                raise _Skip("no message with two body lines or more (deliver the seeds)")
            _lines, number, header, body = longest
            conn = self._session()
            for k in range(1, len(body)):
                reply, raw = conn.multi(b"TOP %d %d" % (number, k))
                _ok(reply, f"TOP {number} {k}")
                got = unstuff(raw)
                want = header + b"".join(body[:k])
                _expect(
                    got == want,
                    f"TOP {number} {k} sent {len(got[len(header) :].splitlines())} body lines "
                    f"({len(got)} octets), expected {k} ({len(want)} octets)",
                )
        with self.check(_1939, "top-beyond", "TOP n k, k past the body: the whole message"):
            self._need("TOP")
            if not candidates:
                raise _Skip("no message retrieved")
            _lines, number, header, body = candidates[-1]
            reply, raw = self._session().multi(b"TOP %d %d" % (number, len(body) + 10))
            _ok(reply, f"TOP {number} {len(body) + 10}")
            _expect(
                unstuff(raw) == header + b"".join(body),
                f"TOP {number} {len(body) + 10} is not the whole message",
            )

    def _uidl(self) -> None:
        with self.check(_1939, "uidl", "UIDL: 'n uid', 1-70 chars 0x21-0x7E, unique"):
            self._need("UIDL")
            conn = self._session()
            reply, lines = conn.multi(b"UIDL")
            _ok(reply, "UIDL")
            for line in lines:
                found = _UIDL.fullmatch(line.rstrip(b"\r\n"))
                _expect(found is not None, f"UIDL line {line[:90]!r} is not 'n uid'")
                assert found is not None
                self.uidls[int(found[1])] = found[2]
            _expect(list(self.uidls) == list(self.sizes), "UIDL numbers differ from LIST's")
            _expect(len(set(self.uidls.values())) == len(self.uidls), "two messages share a UIDL")
            for number, uid in list(self.uidls.items())[:MAX_RETRIEVED]:
                reply = conn.command(b"UIDL %d" % number)
                _ok(reply, f"UIDL {number}")
                _expect(
                    reply.text.split(b" ")[:2] == [b"%d" % number, uid],
                    f"UIDL {number} says {reply.line!r}, the listing {uid!r}",
                )
            self.worked.add("UIDL")

    def _deletion(self) -> None:
        number = 1
        size = self.sizes.get(number, 0)
        with self.check(_1939, "dele", "DELE n: STAT and LIST leave it out"):
            conn = self._session()
            _ok(conn.command(b"DELE %d" % number), f"DELE {number}")
            reply = conn.command(b"STAT")
            _ok(reply, "STAT after DELE")
            want = b"%d %d" % (self.count - 1, self.octets - size)
            _expect(
                reply.text.split(b" ")[:2] == want.split(b" "),
                f"STAT after DELE {number}: {reply.line!r}, expected +OK {want.decode()}",
            )
            reply, lines = conn.multi(b"LIST")
            _ok(reply, "LIST after DELE")
            listed = [int(line.split(b" ")[0]) for line in lines]
            _expect(
                listed == list(range(2, self.count + 1)),
                f"LIST after DELE {number} lists {listed[:10]}",
            )
        with self.check(_1939, "deleted-err", "-ERR for a deleted message"):
            conn = self._session()
            commands = [b"DELE %d", b"LIST %d", b"RETR %d"]
            if self._advertised("TOP"):
                commands.append(b"TOP %d 0")
            if self._advertised("UIDL"):
                commands.append(b"UIDL %d")
            for command in commands:
                _err(conn.command(command % number), (command % number).decode() + " after DELE")
            if self._advertised("UIDL"):
                reply, lines = conn.multi(b"UIDL")
                _ok(reply, "UIDL after DELE")
                _expect(
                    not any(line.startswith(b"%d " % number) for line in lines),
                    f"UIDL lists message {number} after DELE",
                )
        with self.check(_1939, "rset", "RSET: the deleted message is back"):
            conn = self._session()
            _ok(conn.command(b"RSET"), "RSET")
            reply = conn.command(b"STAT")
            _expect(
                reply.text.split(b" ")[:2] == [b"%d" % self.count, b"%d" % self.octets],
                f"STAT after RSET: {reply.line!r}, expected +OK {self.count} {self.octets}",
            )
            _ok(conn.command(b"LIST %d" % number), f"LIST {number} after RSET")

    def _pipelining(self) -> None:
        if self.main is not None and self.report.status("rset") is not Status.PASS:
            # A message may still be marked deleted there: never QUIT that session.
            self.main.close()
            self.main = None
        with self.check(_2449, "pipelining", "PIPELINING: replies in order for a batch"):
            if self.caps is None or "PIPELINING" not in self.caps:
                raise _Skip("PIPELINING not advertised in CAPA")
            conn = self._session()
            batch = [b"NOOP", b"STAT", b"LIST 1", b"XCONFORMANCE", b"LIST 1"]
            conn.send(b"".join(command + b"\r\n" for command in batch))
            replies = [conn.reply() for _ in batch]
            stat = b"%d %d" % (self.count, self.octets)
            _expect(replies[0].ok, f"NOOP: {replies[0].line!r}")
            _expect(
                replies[1].ok and replies[1].text.startswith(stat), f"STAT: {replies[1].line!r}"
            )
            _expect(
                replies[2].ok and replies[2].text.startswith(b"1 "), f"LIST: {replies[2].line!r}"
            )
            _expect(not replies[3].ok, f"XCONFORMANCE: {replies[3].line!r}")
            _expect(replies[4] == replies[2], f"LIST again: {replies[4].line!r}")
            self.worked.add("PIPELINING")

    def _quit_and_update(self) -> None:
        with self.check(_1939, "quit", "QUIT: +OK, then the server closes"):
            conn = self._session()
            _ok(conn.command(b"RSET"), "RSET")
            reply = conn.command(b"QUIT")
            _ok(reply, "QUIT")
            closed = conn.at_eof()
            conn.close()
            self.main = None
            _expect(closed, "the connection stays open after QUIT")
        with self.check(_1939, "uidl-stable", "UIDLs are the same in a new session"):
            self._need("UIDL")
            if not self.uidls:
                raise _Skip("no UIDL listing")
            conn = self._open()
            try:
                self._login(conn)
                reply, lines = conn.multi(b"UIDL")
                _ok(reply, "UIDL")
                again = {int(x.split(b" ")[0]): x.split(b" ")[1].rstrip() for x in lines}
                _expect(again == self.uidls, "UIDLs changed between two sessions")
            finally:
                self._end(conn)
        with self.check(_1939, "update", "QUIT after DELE removes the message (UPDATE)"):
            if not self.allow_delete:
                raise _Skip("deletes a message: needs --allow-delete")
            self._need("UIDL")
            conn = self._open()
            try:
                self._login(conn)
                _ok(conn.command(b"DELE %d" % self.count), f"DELE {self.count}")
                _ok(conn.command(b"QUIT"), "QUIT")
            finally:
                conn.close()
            conn = self._open()
            try:
                self._login(conn)
                reply, lines = conn.multi(b"UIDL")
                _ok(reply, "UIDL")
                after = [x.split(b" ")[1].rstrip() for x in lines]
                before = [self.uidls[n] for n in sorted(self.uidls)][:-1]
                _expect(after == before, "after DELE and QUIT the listing is not the rest")
            finally:
                self._end(conn)

    def _side_sessions(self) -> None:
        bad: Reply | None = None
        with self.check(_1939, "bad-password", "a wrong password gets -ERR"):
            conn = self._open()
            try:
                _ok(conn.command(b"USER " + self.target.user.encode()), "USER")
                bad = conn.command(b"PASS " + self.target.password.encode() + b"-wrong")
                _err(bad, "PASS with a wrong password")
            finally:
                self._end(conn)
        with self.check(_3206, "auth-resp-code", "a wrong password gets [AUTH] (PASS, AUTH)"):
            if self.caps is None or "AUTH-RESP-CODE" not in self.caps:
                raise _Skip("AUTH-RESP-CODE not advertised in CAPA")
            _expect(bad is not None, "no -ERR to a wrong password to look at")
            assert bad is not None
            _expect(bad.text.startswith(b"[AUTH]"), f"wrong password: {bad.line!r}")
            if "PLAIN" in [m.upper() for m in self.caps.get("SASL", [])]:
                wrong = b"\0" + self.target.user.encode() + b"\0" + self.target.password.encode()
                conn = self._open()
                try:
                    sasl = conn.command(b"AUTH PLAIN " + base64.b64encode(wrong + b"-wrong"))
                finally:
                    self._end(conn)
                _err(sasl, "AUTH PLAIN with a wrong password")
                _expect(sasl.text.startswith(b"[AUTH]"), f"AUTH PLAIN, wrong: {sasl.line!r}")
        with self.check(_2595, "stls", "STLS: +OK, TLS, CAPA again without STLS"):
            if self.target.mode == "starttls":
                raise _Skip("checked on every connection (--starttls)")
            if self.caps is None or "STLS" not in self.caps:
                raise _Skip("STLS not advertised in CAPA")
            conn = Connection(self.target, self.wire)
            try:
                _ok(conn.reply(), "greeting")
                _ok(conn.starttls(), "STLS")
                reply, lines = conn.multi(b"CAPA")
                _ok(reply, "CAPA after STLS")
                caps, _bad = _parse_capa(lines)
                _expect("STLS" not in caps, "STLS still advertised inside TLS")
                _err(conn.command(b"STLS"), "STLS inside TLS")
                self.worked.add("STLS")
            finally:
                self._end(conn)
        self._sasl()

    def _sasl(self) -> None:
        mechanisms = [m.upper() for m in (self.caps or {}).get("SASL", [])]
        plain = base64.b64encode(
            b"\0" + self.target.user.encode() + b"\0" + self.target.password.encode()
        )
        for check_id, title, steps in (
            ("auth-plain", "AUTH PLAIN with an initial response logs in", [b"AUTH PLAIN " + plain]),
            ("auth-cancel", "AUTH PLAIN, then '*': -ERR", [b"AUTH PLAIN", b"*"]),
            ("auth-bad-base64", "AUTH PLAIN, then bad base64: -ERR", [b"AUTH PLAIN", b"%%%%"]),
        ):
            with self.check(_5034, check_id, title):
                if "PLAIN" not in mechanisms:
                    raise _Skip("SASL PLAIN not advertised in CAPA")
                conn = self._open()
                try:
                    reply = conn.command(steps[0])
                    if len(steps) == 1:
                        _ok(reply, "AUTH PLAIN")
                        _ok(conn.command(b"STAT"), "STAT after AUTH")
                        self.worked.add("SASL")
                    else:
                        _expect(
                            reply.continuation, f"AUTH PLAIN: expected '+ ', got {reply.line!r}"
                        )
                        _err(conn.command(steps[1]), f"the answer {steps[1].decode()}")
                        _err(conn.command(b"STAT"), "STAT after a failed AUTH")
                finally:
                    self._end(conn)

    def _extensions(self) -> None:
        caps = self.caps or {}
        after = self.caps_after or {}
        with self.check(_2449, "implementation", "IMPLEMENTATION has a text"):
            if "IMPLEMENTATION" not in caps:
                raise _Skip("IMPLEMENTATION not advertised")
            _expect(bool(caps["IMPLEMENTATION"]), "IMPLEMENTATION without a text")
        for name, pre, post in (
            ("EXPIRE", _EXPIRE_PRE, _EXPIRE_POST),
            ("LOGIN-DELAY", _DELAY_PRE, _DELAY_POST),
        ):
            with self.check(_2449, name.lower(), f"{name} grammar before and after login"):
                if name not in caps and name not in after:
                    raise _Skip(f"{name} not advertised")
                if name in caps:
                    value = " ".join(caps[name])
                    _expect(bool(pre.fullmatch(value)), f"before login: {name} {value!r}")
                if name in after:
                    value = " ".join(after[name])
                    _expect(bool(post.fullmatch(value)), f"after login: {name} {value!r}")
        with self.check(_2449, "resp-codes", "response codes are '[' code *('/' code) ']'"):
            if "RESP-CODES" not in caps:
                raise _Skip("RESP-CODES not advertised")
            bad = [
                line
                for line in self.wire.status_lines
                if line.startswith((b"+OK [", b"-ERR ["))
                and not _RESP_CODE.match(line.split(b" ", 1)[1])
            ]
            _expect(not bad, f"malformed: {bad[:3]!r}")
            self.worked.add("RESP-CODES")
        with self.check(_3206, "sys-codes", "SYS codes are SYS/TEMP or SYS/PERM"):
            sys = [line for line in self.wire.status_lines if b"[SYS" in line.upper()]
            if not sys:
                raise _Skip("no SYS response code seen in this run")
            bad = [x for x in sys if not re.search(rb"\[SYS/(?:TEMP|PERM)[]/]", x, re.I)]
            _expect(not bad, f"malformed: {bad[:3]!r}")
        with self.check(_6856, "utf8", "UTF8: grammar, and the command answers +OK"):
            if "UTF8" not in caps:
                raise _Skip("UTF8 not advertised")
            _expect(caps["UTF8"] in ([], ["USER"]), f"UTF8 {' '.join(caps['UTF8'])!r}")
            conn = self._open()
            try:
                _ok(conn.command(b"UTF8"), "UTF8")
                self.worked.add("UTF8")
            finally:
                self._end(conn)
        with self.check(
            _6856, "utf8-saslprep", "UTF8 USER: the credentials typed in fullwidth forms log in"
        ):
            # RFC 6856 §2: a server with "UTF8 USER" SHOULD SASLprep the USER and PASS
            # arguments (RFC 4013), whose NFKC maps fullwidth forms to ASCII.
            if "USER" not in caps.get("UTF8", []):
                raise _Skip("UTF8 USER not advertised")
            user, password = _fullwidth(self.target.user), _fullwidth(self.target.password)
            if user is None or password is None:
                raise _Skip("the user name or password is not printable ASCII")
            conn = self._open()
            try:
                _ok(conn.command(b"UTF8"), "UTF8")
                _ok(conn.command(b"USER " + user.encode()), "USER in fullwidth letters")
                _ok(conn.command(b"PASS " + password.encode()), "PASS in fullwidth letters")
            finally:
                self._end(conn)
        with self.check(_6856, "lang", "LANG lists 'tag description' lines; LANG tag: +OK"):
            if "LANG" not in caps:
                raise _Skip("LANG not advertised")
            conn = self._open()
            try:
                reply, lines = conn.multi(b"LANG")
                _ok(reply, "LANG")
                _expect(bool(lines), "LANG lists no language")
                bad = [x for x in lines if not _LANG_LINE.fullmatch(x.rstrip(b"\r\n"))]
                _expect(not bad, f"malformed LANG lines: {bad[:3]!r}")
                tags = [x.split(b" ")[0] for x in lines if not x.startswith(b"* ")]
                if tags:
                    _ok(conn.command(b"LANG " + tags[-1]), f"LANG {tags[-1].decode()}")
                self.worked.add("LANG")
            finally:
                self._end(conn)
        with self.check(_2449, "advertised-works", "every capability advertised works"):
            known = {"TOP", "UIDL", "USER", "PIPELINING", "STLS", "SASL", "UTF8", "LANG"}
            broken = sorted(name for name in known & set(caps) - self.worked if self._checked(name))
            _expect(not broken, f"advertised but failed: {', '.join(broken)}")

    def _checked(self, capability: str) -> bool:
        """Whether the checks of ``capability`` ran (a skipped check proves nothing)."""
        ids = {
            "TOP": ["top-0"],
            "UIDL": ["uidl"],
            "USER": ["user-pass"],
            "PIPELINING": ["pipelining"],
            "STLS": ["stls", "stls-capa"],
            "SASL": ["auth-plain"],
            "UTF8": ["utf8"],
            "LANG": ["lang"],
        }[capability]
        return any(c.id in ids and c.status is not Status.SKIP for c in self.report.checks)


def _empty_maildrop(suite: Suite) -> _Abort:
    """Record that the maildrop is empty: the suite needs messages."""
    suite.report.checks.append(
        Check(
            _1939,
            "maildrop",
            "the maildrop has messages to check",
            Status.FAIL,
            "STAT says 0 messages: deliver the seed messages first",
        )
    )
    return _Abort()


def run_suite(target: Target, *, allow_delete: bool = False) -> Report:
    """Run the conformance checks against ``target``; return the report."""
    return Suite(target, allow_delete=allow_delete).run()
