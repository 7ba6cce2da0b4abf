"""The log events (pobox._logevents) in every log_format, in-process and from a real server.

In-process: each event's text and JSON say the same, one line per record whatever a stranger
puts in a user name.  Against a real ``pobox serve`` (plain, STLS and POP3S listeners, --trace
on): every session line names its session, Login lines say TLS and its version, a refused
login is counted as refused, a failed handshake leaves one line, JSON parses line by line, and
fail2ban-regex with Debian's stock dovecot filter and pobox's own matches the failures only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import ssl
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from pobox import _logevents as events
from pobox.log import JsonFormatter, SanitizingFormatter, SessionLog, sanitize
from tests.helpers.process import ServeProcess, pobox_serve
from tests.integration.wire import Wire
from tests.log.test_forgery import DOVECOT_FILTER, matched_ips, pobox_filter
from tests.tls.helpers import Pki

#: User names a stranger may send: line breaks, escapes, separators, quotes, a long one.
HOSTILE = [
    "a\r\nNov 23 21:30:00 mail dovecot: pop3-login: Authentication failed: rip=192.0.2.66",
    "x\x1b[2K\ry",
    "u\u2028v\u2029w\x85z",
    'q"uo\\te\'s"}, {"rip": "192.0.2.66"',
    "\x00\x7f\u202e\ud800",
    "long" + "é" * 5000,
]


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, io.StringIO, logging.Logger]]:
    """A logger writing each record both as JSON and as text, to two buffers."""
    as_json, as_text = io.StringIO(), io.StringIO()
    logger = logging.getLogger("pobox.test.events")
    json_handler, text_handler = logging.StreamHandler(as_json), logging.StreamHandler(as_text)
    json_handler.setFormatter(JsonFormatter())
    text_handler.setFormatter(SanitizingFormatter("%(message)s"))
    logger.handlers[:] = [json_handler, text_handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield as_json, as_text, logger
    logger.handlers[:] = []


def session_log(
    logger: logging.Logger, tls_version: str | None = None, tls_by: str = ""
) -> SessionLog:
    """A session log with fixed addresses and session id."""
    return SessionLog(
        logger, "SID", rip="192.0.2.1", lip="198.51.100.2", tls_version=tls_version, tls_by=tls_by
    )


class TestJsonFormat:
    """JsonFormatter with the events' fields."""

    @pytest.mark.parametrize("name", HOSTILE, ids=range(len(HOSTILE)))
    def test_hostile_user_one_json_line(
        self, capture: tuple[io.StringIO, io.StringIO, logging.Logger], name: str
    ) -> None:
        """A hostile user name gives one JSON line whose fields are the sanitised strings."""
        as_json, as_text, logger = capture
        events.auth_failed(session_log(logger), name, "PLAIN")

        lines = as_json.getvalue().split("\n")
        assert "" == lines.pop()
        assert 1 == len(lines)
        assert lines[0].isascii()
        record = json.loads(lines[0])
        assert "auth_failed" == record["event"]
        assert sanitize(name) == record["user"]
        assert ("SID", "192.0.2.1", "198.51.100.2") == (
            record["session"],
            record["rip"],
            record["lip"],
        )
        assert (False, None, "PLAIN") == (record["tls"], record["tls_version"], record["method"])
        assert as_text.getvalue() == record["message"] + "\n"  # both formats say the same

    def test_keys(self, capture: tuple[io.StringIO, io.StringIO, logging.Logger]) -> None:
        """A login record has the documented keys, time in UTC ISO 8601."""
        as_json, _, logger = capture
        log = session_log(logger, tls_version="TLSv1.3")
        events.login(log, "alice", "SCRAM-SHA-256")

        record = json.loads(as_json.getvalue())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record.pop("time"))
        assert {
            "level": "info",
            "event": "login",
            "logger": "pobox.test.events",
            "service": "pop3-login",
            "session": "SID",
            "user": "alice",
            "rip": "192.0.2.1",
            "lip": "198.51.100.2",
            "tls": True,
            "tls_version": "TLSv1.3",
            "method": "SCRAM-SHA-256",
            "message": "pop3-login: Login: user=<alice>, method=SCRAM-SHA-256, rip=192.0.2.1, "
            "lip=198.51.100.2, TLS (TLSv1.3), session=<SID>",
        } == record

    def test_counters(self, capture: tuple[io.StringIO, io.StringIO, logging.Logger]) -> None:
        """The logout line's counters are fields of their own, the user in the session's."""
        as_json, as_text, logger = capture
        log = session_log(logger)
        log.user = "alice"
        events.disconnected(
            log, "Logged out", top=(1, 2), retr=(3, 4), deleted=5, messages=6, size=7
        )

        record = json.loads(as_json.getvalue())
        assert ("pop3", "alice", "disconnected") == (
            record["service"],
            record["user"],
            record["event"],
        )
        assert [1, 2, 3, 4, 5, 6, 7] == [
            record[k]
            for k in (
                *("top_count", "top_bytes", "retr_count", "retr_bytes"),
                *("del_count", "messages", "size"),
            )
        ]
        assert (
            "pop3(alice)<SID>: Disconnected: Logged out top=1/2, retr=3/4, del=5/6, size=7\n"
            == as_text.getvalue()
        )

    def test_exception_folded(
        self, capture: tuple[io.StringIO, io.StringIO, logging.Logger]
    ) -> None:
        """A traceback goes in one "exception" string, on the record's one line."""
        as_json, _, logger = capture
        try:
            raise ValueError("bad\nline")
        except ValueError:
            session_log(logger).exception("Internal error")
        lines = as_json.getvalue().splitlines()
        assert 1 == len(lines)
        assert json.loads(lines[0])["exception"].endswith("ValueError: bad | line")


class TestTextShapes:
    """The Dovecot-shaped text of the events."""

    @pytest.mark.parametrize(
        ("version", "by", "element"),
        [
            (None, "", ""),
            ("TLSv1.3", "", "TLS (TLSv1.3), "),
            ("TLSv1.2", "haproxy", "TLS (haproxy, TLSv1.2), "),
            ("", "haproxy", "TLS (haproxy), "),
            ("", "", "TLS, "),
        ],
    )
    def test_login_says_tls(
        self,
        capture: tuple[io.StringIO, io.StringIO, logging.Logger],
        version: str | None,
        by: str,
        element: str,
    ) -> None:
        """Login lines say TLS and its version between lip= and session=, as Dovecot does."""
        _, as_text, logger = capture
        events.login(session_log(logger, tls_version=version, tls_by=by), "alice", "PLAIN")
        expected = (
            "pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.1, lip=198.51.100.2, "
            f"{element}session=<SID>\n"
        )
        assert expected == as_text.getvalue()

    def test_failure_lines_keep_their_shape(
        self, capture: tuple[io.StringIO, io.StringIO, logging.Logger]
    ) -> None:
        """The lines fail2ban filters match per attempt do not change with TLS."""
        _, as_text, logger = capture
        log = session_log(logger, tls_version="TLSv1.3")
        events.auth_failed(log, "bob", "LOGIN")
        events.login_throttled(log, None, "PLAIN")
        assert [
            "pop3-login: Authentication failed: user=<bob>, method=LOGIN, rip=192.0.2.1, "
            "lip=198.51.100.2, session=<SID>",
            "pop3-login: Login refused, too many failures: user=<>, method=PLAIN, "
            "rip=192.0.2.1, lip=198.51.100.2, session=<SID>",
        ] == as_text.getvalue().splitlines()

    @pytest.mark.parametrize(
        ("failures", "refusals", "expected"),
        [
            (2, 1, "Disconnected (auth failed, 2 attempts in 3 secs): user=<bob>, method=APOP, "),
            (0, 1, "Disconnected (login refused, 1 attempts in 3 secs): user=<bob>, method=APOP, "),
            (0, 0, "Disconnected (no auth attempts in 3 secs): Logged out, "),
        ],
    )
    def test_disconnect_counts_what_happened(
        self,
        capture: tuple[io.StringIO, io.StringIO, logging.Logger],
        failures: int,
        refusals: int,
        expected: str,
    ) -> None:
        """Failures win over refusals; a refused login is never "no auth attempts"."""
        _, as_text, logger = capture
        events.disconnected_before_login(
            session_log(logger),
            secs=3,
            reason="Logged out",
            failures=failures,
            refusals=refusals,
            user="bob",
            method="APOP",
        )
        assert (
            f"pop3-login: {expected}rip=192.0.2.1, lip=198.51.100.2, session=<SID>\n"
            == as_text.getvalue()
        )


# ----------------------------------------------------------------- a real server

HOST = "127.0.0.1"
#: Who does what in the scripted workload (each from an address of its own).
FAIL_PLAIN, FAIL_STLS, FAIL_POP3S = "127.0.0.51", "127.0.0.52", "127.0.0.53"
OK_PLAIN, OK_STLS, OK_POP3S = "127.0.0.61", "127.0.0.62", "127.0.0.63"
LOCKED, BAD_POP3S, BAD_STLS = "127.0.0.64", "127.0.0.65", "127.0.0.66"
#: Connections the workload makes; each ends with one "Disconnected" line.
CONNECTIONS = 9


async def plain(port: int, source: str) -> Wire:
    """Connect from ``source`` and read the greeting."""
    wire = Wire(*await asyncio.open_connection(HOST, port, local_addr=(source, 0)))
    assert (await wire.line()).startswith(b"+OK")
    return wire


async def stls(port: int, source: str, ctx: ssl.SSLContext) -> Wire:
    """Connect from ``source`` and start TLS with STLS."""
    wire = await plain(port, source)
    assert (await wire.command(b"STLS")).startswith(b"+OK")
    await wire.writer.start_tls(ctx, server_hostname="localhost")
    return wire


async def pop3s(port: int, source: str, ctx: ssl.SSLContext) -> Wire:
    """Connect from ``source`` to the implicit-TLS port and read the greeting."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=ctx, server_hostname="localhost", local_addr=(source, 0)
    )
    wire = Wire(reader, writer)
    assert (await wire.line()).startswith(b"+OK")
    return wire


async def fail_and_quit(wire: Wire) -> None:
    """A wrong password, then QUIT."""
    assert b"+OK\r\n" == await wire.command(b"USER alice")
    assert (await wire.command(b"PASS wrong")).startswith(b"-ERR [AUTH]")
    assert (await wire.command(b"QUIT")).startswith(b"+OK")
    await wire.close()


async def login_and_quit(wire: Wire) -> None:
    """Log in as alice, then QUIT."""
    assert b"+OK\r\n" == await wire.command(b"USER alice")
    assert b"+OK Logged in.\r\n" == await wire.command(b"PASS secret")
    assert (await wire.command(b"QUIT")).startswith(b"+OK")
    await wire.close()


async def workload(proc: ServeProcess, pki: Pki) -> None:
    """The scripted sessions: failures, logins, a locked refusal, failed handshakes."""
    started = await proc.wait_log(r"started, listening on")
    port, ssl_port = (int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", started))
    ctx = pki.client_context()
    await fail_and_quit(await plain(port, FAIL_PLAIN))
    await fail_and_quit(await stls(port, FAIL_STLS, ctx))
    await fail_and_quit(await pop3s(ssl_port, FAIL_POP3S, ctx))
    await login_and_quit(await plain(port, OK_PLAIN))
    await login_and_quit(await stls(port, OK_STLS, ctx))
    holder = await pop3s(ssl_port, OK_POP3S, ctx)
    assert b"+OK\r\n" == await holder.command(b"USER alice")
    assert b"+OK Logged in.\r\n" == await holder.command(b"PASS secret")
    locked = await plain(port, LOCKED)
    assert b"+OK\r\n" == await locked.command(b"USER alice")
    assert (await locked.command(b"PASS secret")).startswith(b"-ERR [IN-USE]")
    assert (await locked.command(b"QUIT")).startswith(b"+OK")
    await locked.close()
    assert (await holder.command(b"QUIT")).startswith(b"+OK")
    await holder.close()
    # Handshakes that fail: not TLS at all on the POP3S port, and after STLS.
    raw = Wire(*await asyncio.open_connection(HOST, ssl_port, local_addr=(BAD_POP3S, 0)))
    await raw.send(b"USER alice\r\n" * 40)
    await raw.read_all()
    await raw.close()
    after = await plain(port, BAD_STLS)
    assert (await after.command(b"STLS")).startswith(b"+OK")
    await after.send(b"\x16\x03\x01\x00\x10not a client hello at all\r\n")
    await after.read_all()
    await after.close()
    await proc.wait_count("Disconnected", CONNECTIONS)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA and a certificate for localhost."""
    return Pki.create(tmp_path / "pki")


def serve(tmp_path: Path, pki: Pki, log_format: str) -> AbstractAsyncContextManager[ServeProcess]:
    """``pobox serve`` with plain and implicit-TLS listeners, --trace on, in ``log_format``."""
    return pobox_serve(
        tmp_path / "srv",
        log_format=log_format,
        trace=True,
        ssl_listen=["127.0.0.1:0"],
        auth_failures_per_ip=100,
        ssl_cert=str(pki.cert_pem),
        ssl_key=str(pki.key_pem),
    )


#: pobox's timestamp ("2026-11-23 21:30:00,123 INFO ") or Dovecot's syslog shape.
STAMP = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |\w{3} [ \d]\d [\d:]{8} \S+ dovecot: )"
)
PRE_LOGIN = re.compile(r"^pop3-login: .*session=<([\w-]{12})>")
POST_LOGIN = re.compile(r"^pop3\([^)]*\)<([\w-]{12})>: ")


def session_lines(text: str) -> list[str]:
    """The session lines of a text log, their timestamp taken off."""
    lines = [STAMP.sub("", line, count=1) for line in text.splitlines()]
    return [line for line in lines if line.startswith(("pop3-login:", "pop3("))]


def for_address(lines: list[str], rip: str) -> list[str]:
    """Every line of the sessions that came from ``rip`` (found by their session ids)."""
    ids = {session_of(line) for line in lines if f"rip={rip}," in line} - {None}
    return [line for line in lines if session_of(line) in ids]


def _session(line: str) -> re.Match[str] | None:
    return PRE_LOGIN.match(line) or POST_LOGIN.match(line)


def session_of(line: str) -> str | None:
    """The session id a session line names (``None``: it names none)."""
    match = _session(line)
    return match.group(1) if match else None


@pytest.mark.external
class TestServerLog:
    """The log of a real server after the scripted workload."""

    @pytest.mark.parametrize("log_format", ["pobox", "dovecot"])
    async def test_text_log(self, tmp_path: Path, pki: Pki, log_format: str) -> None:
        """Session ids everywhere, TLS in Login lines, refusals and handshakes as they were."""
        async with serve(tmp_path, pki, log_format) as proc:
            await workload(proc, pki)
            text = proc.text()
        lines = session_lines(text)

        assert 40 < len(lines)  # trace lines, pre- and post-login, are session lines
        assert [] == [line for line in lines if not _session(line)]
        assert any(line.startswith("pop3-login: C: USER alice, session=<") for line in lines)
        assert any(line.startswith("pop3(alice)<") and ": C: QUIT" in line for line in lines)
        logins = {
            rip: [ln for ln in for_address(lines, rip) if ": Login: " in ln]
            for rip in (OK_PLAIN, OK_STLS, OK_POP3S)
        }
        assert re.search(rf"rip={OK_PLAIN}, lip=127\.0\.0\.1, session=<", logins[OK_PLAIN][0])
        for rip in (OK_STLS, OK_POP3S):
            tls = rf"rip={rip}, lip=127\.0\.0\.1, TLS \(TLSv1\.[23]\), session=<"
            assert re.search(tls, logins[rip][0])
        refused = for_address(lines, LOCKED)
        events_of_locked = [
            re.sub(r" in \d+ secs", " in N secs", line[: line.index("session=<") + 9])
            for line in refused
            if "C: " not in line and "S: " not in line
        ]
        assert [
            f"pop3-login: Login refused, maildrop locked: user=<alice>, method=PLAIN, "
            f"rip={LOCKED}, lip=127.0.0.1, session=<",
            f"pop3-login: Disconnected (login refused, 1 attempts in N secs): user=<alice>, "
            f"method=PLAIN, rip={LOCKED}, lip=127.0.0.1, session=<",
        ] == events_of_locked
        for rip in (BAD_POP3S, BAD_STLS):
            failed = [ln for ln in lines if "TLS handshaking failed" in ln and f"rip={rip}," in ln]
            assert 1 == len(failed)
            assert re.match(
                r"pop3-login: Disconnected \(no auth attempts in \d+ secs\): TLS handshaking "
                r"failed: \S",
                failed[0],
            )
            assert re.search(rf"rip={rip}, lip=127\.0\.0\.1, session=<[\w-]{{12}}>$", failed[0])
        assert 1 == text.count(f"rip={BAD_POP3S}")  # once per connection, nothing else about it
        stock = matched_ips(proc.log, DOVECOT_FILTER)
        own = matched_ips(proc.log, pobox_filter(tmp_path))
        failures = [FAIL_PLAIN, FAIL_STLS, FAIL_POP3S]
        assert failures == sorted(stock)  # one per failed connection...
        assert failures == sorted(own)  # ...one per failed attempt, and nothing else

    async def test_json_log(self, tmp_path: Path, pki: Pki) -> None:
        """Each line of the JSON log is one object; each session record names its session."""
        async with serve(tmp_path, pki, "json") as proc:
            await workload(proc, pki)
            text = proc.text()
        records = [json.loads(line) for line in text.splitlines()]

        sessions = [r for r in records if r["logger"] == "pobox.session"]
        assert 40 < len(sessions)
        assert [] == [r for r in sessions if not re.fullmatch(r"[\w-]{12}", r["session"])]
        assert [] == [r for r in sessions if not r["message"].startswith(("pop3-login: ", "pop3("))]
        by_event: dict[str, list[dict[str, object]]] = {}
        for r in sessions:
            by_event.setdefault(r["event"], []).append(r)
        logins = {r["rip"]: r for r in by_event["login"]}
        assert {OK_PLAIN, OK_STLS, OK_POP3S} == set(logins)
        assert (False, None) == (logins[OK_PLAIN]["tls"], logins[OK_PLAIN]["tls_version"])
        for rip in (OK_STLS, OK_POP3S):
            assert (True, "alice", "PLAIN") == (
                logins[rip]["tls"],
                logins[rip]["user"],
                logins[rip]["method"],
            )
            assert str(logins[rip]["tls_version"]).startswith("TLSv1.")
        failed = {r["rip"]: r for r in by_event["auth_failed"]}
        assert {FAIL_PLAIN: False, FAIL_STLS: True, FAIL_POP3S: True} == {
            rip: r["tls"] for rip, r in failed.items()
        }
        assert [LOCKED] == [r["rip"] for r in by_event["maildrop_locked"]]
        ended = {r["session"]: r for r in by_event["disconnected"]}
        assert CONNECTIONS == len(ended)
        locked_end = [r for r in ended.values() if r["rip"] == LOCKED]
        assert [(1, 0)] == [(r["login_refusals"], r["auth_failures"]) for r in locked_end]
        logouts = [r for r in ended.values() if r["service"] == "pop3"]
        assert {"alice"} == {r["user"] for r in logouts}
        assert 3 == len(logouts)
        assert {"Logged out"} == {r["reason"] for r in logouts}
        assert all(isinstance(r["size"], int) for r in logouts)
        handshakes = [r for r in ended.values() if "TLS handshaking failed" in str(r["reason"])]
        assert {BAD_POP3S, BAD_STLS} == {r["rip"] for r in handshakes}
        traces = by_event["trace"]
        assert {"C", "S"} == {r["direction"] for r in traces}
        assert any(r["service"] == "pop3-login" and r["line"] == "USER alice" for r in traces)

    async def test_hostile_names_json(self, tmp_path: Path, pki: Pki) -> None:
        """Whatever a stranger sends as a user name, the JSON log stays one object per line."""
        async with serve(tmp_path, pki, "json") as proc:
            started = await proc.wait_log(r"started, listening on")
            port = int(re.findall(r"127\.0\.0\.1:(\d+)", started)[0])
            for name in HOSTILE:
                raw = name.encode("utf-8", "surrogatepass")[:150]
                wire = await plain(port, "127.0.0.71")
                assert (await wire.command(b"AUTH PLAIN")).startswith(b"+")
                reply = await wire.command(base64.b64encode(b"\0" + raw + b"\0x"))
                assert reply.startswith(b"-ERR")
                await wire.send(b"QUIT\r\n")
                await wire.read_all()
                await wire.close()
            await proc.wait_count("Disconnected", len(HOSTILE))
            text = proc.text()
        records = [json.loads(line) for line in text.splitlines()]
        assert text.isascii()
        failed = [r for r in records if r["event"] == "auth_failed"]
        assert len(HOSTILE) == len(failed)
        assert [] == [r for r in records if not all(str(v).isprintable() for v in r.values())]
