"""Properties of the core over generated input (Hypothesis, STYLE.md §3.14)."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pobox.protocol import (
    NEED_DATA,
    EndOfMessage,
    MessageData,
    ServerConnection,
    Trace,
)

from .helpers import Msg, Shell, drive, logged_in, pieces, run

SETTINGS = settings(max_examples=150, deadline=None)


def octets(max_size: int) -> st.SearchStrategy[bytes]:
    """Any bytes, drawn as integers.

    Not ``st.binary()``: Hypothesis keys its cache with tuples of choices, and a bytes choice
    ``b""`` hashes like an integer ``0`` or ``False`` drawn in another example, so the tuples
    get compared and ``python -bb`` (scripts/test) raises BytesWarning inside Hypothesis.
    """
    return st.lists(st.integers(min_value=0, max_value=255), max_size=max_size).map(bytes)


#: Messages of any bytes at all.
binary_messages = octets(400)
#: Messages made of the octets that matter to framing: dots, CR, LF.
text_messages = st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"Subject: x", b" ", b"\x00"]),
    max_size=60,
).map(b"".join)
messages = st.one_of(binary_messages, text_messages)
cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)

COMMANDS = [
    b"USER alice",
    b"PASS secret",
    b"PASS wrong",
    b"QUIT",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"LIST 2",
    b"UIDL",
    b"UIDL 1",
    b"RETR 1",
    b"TOP 2 1",
    b"TOP 1 0",
    b"DELE 1",
    b"DELE 3",
    b"RSET",
    b"NOOP",
    b"retr 0",
    b"LIST 99999999999999999999999",
    b"APOP a b",
    b"BOGUS",
    b"",
]
#: Input that looks like a POP3 dialogue, with junk mixed in.
dialogues = st.lists(
    st.one_of(
        st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
        st.sampled_from(COMMANDS).map(lambda c: c + b"\n"),
        st.sampled_from([b"\r", b"\n", b"\x00", b" ", b"\xff", b"x" * 300]),
        octets(20),
    ),
    max_size=30,
).map(b"".join)
inputs = st.one_of(octets(600), dialogues)

SNAPSHOT = [Msg(25, "u1"), Msg(7, "u2"), Msg(100, "u3")]


def wire_size(stored: bytes) -> int:
    """The RFC 1939 size of ``stored``: its octets plus one CR for each bare LF."""
    bare_lfs = sum(1 for i, b in enumerate(stored) if b == 0x0A and stored[i - 1 : i] != b"\r")
    return len(stored) + bare_lfs


def crlf(stored: bytes) -> bytes:
    """``stored`` with every bare LF made CRLF, written independently of the core."""
    out = bytearray()
    for i, b in enumerate(stored):
        if b == 0x0A and stored[i - 1 : i] != b"\r":
            out += b"\r"
        out.append(b)
    return bytes(out)


def unstuff(wire: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing of a multi-line body ending in ".CRLF"; check it too."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    assert body == b"" or body.endswith(b"\r\n")
    assert b"\n" not in body.replace(b"\r\n", b""), "no bare LF on the wire"
    lines = body.split(b"\r\n")
    for line in lines:
        assert not line.startswith(b".") or line.startswith(b".."), "unstuffed dot line"
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def top_model(stored: bytes, n: int) -> bytes:
    """What TOP n sends for ``stored`` (before ".CRLF"), by RFC 1939 §7 written out plainly."""
    complete = crlf(stored).split(b"\r\n")
    tail = complete.pop()
    kept = b""
    body_lines: int | None = None  # None while in the header
    for line in complete:
        if body_lines is not None and body_lines >= n:
            break
        kept += line + b"\r\n"
        if body_lines is not None:
            body_lines += 1
        elif line == b"":
            body_lines = 0
    else:
        if body_lines is None or body_lines < n:
            kept += tail
    stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in kept.split(b"\r\n"))
    return stuffed + (b"\r\n" if kept and not kept.endswith(b"\r\n") else b"")


def retrieve_all(command: bytes, stored: bytes, cut_at: list[int], *, stop_early: bool) -> bytes:
    """Send ``command`` and stream ``stored`` in pieces; return the client's bytes."""
    conn = logged_in([Msg(wire_size(stored), "u1")])
    run(conn, command)
    for piece in pieces(stored, cut_at):
        if stop_early and not conn.wants_message_data:
            break
        conn.send(MessageData(piece))
    conn.send(EndOfMessage())
    events, out = run(conn)
    assert [NEED_DATA] == events
    return out


class TestRetrRoundTrip:
    """Any stored message survives RETR: CRLF line ends, stuffing undone, size exact."""

    @SETTINGS
    @given(stored=messages, cut_at=cuts)
    def test_round_trip(self, stored, cut_at):
        """Unstuffed, the body is the message with CRLF line ends, plus a CRLF if it lacked one."""
        out = retrieve_all(b"RETR 1\r\n", stored, cut_at, stop_early=False)

        status, _, wire = out.partition(b"\r\n")
        expected = crlf(stored) + (b"\r\n" if stored and not stored.endswith(b"\n") else b"")
        assert expected == unstuff(wire)
        assert f"+OK {wire_size(stored)} octets".encode() == status

    @SETTINGS
    @given(stored=messages, cut_at=cuts)
    def test_size_matches_the_wire(self, stored, cut_at):
        """The octet count equals the unstuffed body without the CRLF added at the end."""
        out = retrieve_all(b"RETR 1\r\n", stored, cut_at, stop_early=False)

        body = unstuff(out.partition(b"\r\n")[2])
        added = 2 if stored and not stored.endswith(b"\n") else 0
        assert wire_size(stored) == len(body) - added


class TestTop:
    """TOP n of any message, in any pieces, is the header, the blank line and n lines."""

    @SETTINGS
    @given(
        stored=st.one_of(messages, text_messages.map(lambda m: b"A: 1\r\nB: 2\n\n" + m)),
        n=st.integers(min_value=0, max_value=6),
        cut_at=cuts,
        stop_early=st.booleans(),
    )
    def test_top(self, stored, n, cut_at, stop_early):
        """The output matches a plain model, whether or not the shell stops early."""
        out = retrieve_all(f"TOP 1 {n}\r\n".encode(), stored, cut_at, stop_early=stop_early)

        assert b"+OK\r\n" + top_model(stored, n) + b".\r\n" == out


class TestSplitting:
    """How the input is split into reads never changes the session."""

    @SETTINGS
    @given(data=inputs, cut_at=st.lists(st.integers(0, 600), max_size=20), trace=st.booleans())
    def test_same_result_in_authorization(self, data, cut_at, trace):
        """Whole, one byte at a time, or in random pieces: same events, same output."""
        self._check(lambda: ServerConnection(trace=trace), data, cut_at)

    @SETTINGS
    @given(data=inputs, cut_at=st.lists(st.integers(0, 600), max_size=20), trace=st.booleans())
    def test_same_result_in_transaction(self, data, cut_at, trace):
        """The same holds after login."""
        self._check(lambda: logged_in(SNAPSHOT, trace=trace), data, cut_at)

    @staticmethod
    def _check(new, data: bytes, cut_at: list[int]) -> None:
        def bounded(conn: ServerConnection) -> None:
            # receive_data only appends, so this bound at each NEED_DATA means the buffer
            # never holds more than 255 octets plus the read being fed.
            assert len(conn._framer._buf) <= 255

        shell = Shell(messages=SNAPSHOT)
        whole = drive(new(), [data], shell, on_idle=bounded)
        one_by_one = drive(new(), [data[i : i + 1] for i in range(len(data))], shell)
        split = drive(new(), pieces(data, cut_at), shell, on_idle=bounded)

        assert whole == one_by_one
        assert whole == split


class TestReplies:
    """Whatever one command line says, the reply starts with a proper status line."""

    @SETTINGS
    @given(
        verb=st.sampled_from(
            b"USER PASS APOP AUTH STLS CAPA QUIT STAT LIST RETR DELE NOOP RSET TOP UIDL".split()
        ),
        upper=st.booleans(),
        args=st.lists(
            st.one_of(
                st.sampled_from([b"1", b"0", b"3", b"-1", b"9" * 30, b"x"]),
                octets(60).filter(lambda b: b"\n" not in b),
            ),
            max_size=4,
        ),
        logged=st.booleans(),
    )
    def test_status_line(self, verb, upper, args, logged):
        """The first reply line is +OK or -ERR, ASCII, and at most 512 octets (RFC 2449 §4)."""
        line = b" ".join([verb if upper else verb.lower(), *args])[:253] + b"\r\n"
        conn = logged_in(SNAPSHOT) if logged else ServerConnection()
        if not logged:
            conn.data_to_send()

        _, out = drive(conn, [line], Shell(messages=SNAPSHOT))

        status = out.split(b"\r\n")[0]
        assert status.startswith((b"+OK", b"-ERR"))
        assert status.isascii()
        assert len(status) + 2 <= 512


class TestPasswordMasking:
    """No password ever reaches a Trace line."""

    @SETTINGS
    @given(
        keyword=st.sampled_from([b"PASS ", b"pass ", b"PaSs\t", b" PASS ", b"PASS", b"PASS  "]),
        password=octets(80).filter(lambda b: b"\n" not in b),
        with_user=st.booleans(),
        logged=st.booleans(),
    )
    def test_masked(self, keyword, password, with_user, logged):
        """Whatever the spelling of PASS and the password, Trace shows neither the password."""
        secret = b"pw-" + password
        conn = logged_in(SNAPSHOT, trace=True) if logged else ServerConnection(trace=True)
        prefix = b"USER alice\r\n" if with_user else b""

        events, _ = drive(conn, [prefix + keyword + secret + b"\r\n"], Shell(messages=SNAPSHOT))

        traces = [e.line for e in events if isinstance(e, Trace)]
        assert [] == [t for t in traces if "pw-" in t]
