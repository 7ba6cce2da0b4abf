"""ServerConnection driven with bytes: RFC 1939, RFC 2449 and RFC 3206 in every state."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

from typing import Any

import pytest

from pobox.protocol import (
    FLUSH,
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    CommitDeletions,
    ConnectionClosed,
    DeletionsCommitted,
    EndOfMessage,
    LocalProtocolError,
    LoginAccepted,
    LoginRejected,
    MessageData,
    MessageUnavailable,
    RetrieveMessage,
    ServerConnection,
    State,
    Trace,
)

from .helpers import Msg, logged_in, pieces, retrieve, run

#: Three messages of 10, 20 and 30 octets: 60 in all.
THREE = [Msg(10, "u1"), Msg(20, "u2"), Msg(30, "u3")]

CAPA_AUTHORIZATION = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\n"
    b"IMPLEMENTATION pobox\r\n"
    b".\r\n"
)
CAPA_TRANSACTION = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
    b"IMPLEMENTATION pobox\r\n"
    b".\r\n"
)


def fresh(**kwargs: Any) -> ServerConnection:
    """A connection in AUTHORIZATION with the greeting already taken."""
    conn = ServerConnection(**kwargs)
    run(conn)
    return conn


def authenticating(**kwargs: Any) -> ServerConnection:
    """A connection in AUTHENTICATING (USER alice, PASS secret), output drained."""
    conn = fresh(**kwargs)
    events, _ = run(conn, b"USER alice\r\nPASS secret\r\n")
    assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
    return conn


def start_retr(stored: bytes, command: bytes = b"RETR 1\r\n", size: int | None = None):
    """Log in on one message holding ``stored`` and send ``command``; return the connection."""
    conn = logged_in([Msg(len(stored) if size is None else size, "u1")])
    events, out = run(conn, command)
    assert PAUSED == events[-1]
    assert b"" == out
    return conn


def retr_wire(stored: bytes, cuts: tuple[int, ...] = (), size: int | None = None) -> bytes:
    """What the client reads for RETR 1 of ``stored`` streamed in pieces cut at ``cuts``."""
    conn = start_retr(stored, size=size)
    _, out = retrieve(conn, stored, cuts)
    return out


def top_wire(stored: bytes, lines: bytes, cuts: tuple[int, ...] = ()) -> bytes:
    """What the client reads for ``TOP 1 <lines>`` of ``stored`` cut at ``cuts``."""
    conn = start_retr(stored, b"TOP 1 " + lines + b"\r\n")
    _, out = retrieve(conn, stored, cuts)
    return out


class TestGreeting:
    """The greeting (RFC 1939 §4) and its checks."""

    def test_default_greeting(self):
        """A new connection has the default greeting waiting to be sent."""
        conn = ServerConnection()

        assert b"+OK pobox ready.\r\n" == conn.data_to_send()
        assert State.AUTHORIZATION == conn.state

    def test_custom_greeting(self):
        """The greeting text follows +OK."""
        assert b"+OK <1.2@host> hi\r\n" == ServerConnection(greeting="<1.2@host> hi").data_to_send()

    def test_empty_greeting(self):
        """An empty greeting is a bare +OK."""
        assert b"+OK\r\n" == ServerConnection(greeting="").data_to_send()

    def test_greeting_of_512_octets_is_accepted(self):
        """A greeting that makes a status line of exactly 512 octets is accepted."""
        out = ServerConnection(greeting="g" * 506).data_to_send()

        assert 512 == len(out)

    @pytest.mark.parametrize("greeting", ["g" * 507, "é" * 254])
    def test_greeting_over_512_octets_is_refused(self, greeting):
        """A greeting that makes the status line longer than 512 octets is a ValueError."""
        with pytest.raises(ValueError, match="506"):
            ServerConnection(greeting=greeting)

    @pytest.mark.parametrize("greeting", ["a\r\nb", "a\nb", "a\rb"])
    def test_greeting_with_line_break_is_refused(self, greeting):
        """A greeting holding CR or LF is a ValueError."""
        with pytest.raises(ValueError, match="one line"):
            ServerConnection(greeting=greeting)

    def test_output_is_taken_once(self):
        """data_to_send returns each byte once."""
        conn = ServerConnection()
        conn.data_to_send()

        assert b"" == conn.data_to_send()


class TestAuthorization:
    """Commands in AUTHORIZATION (RFC 1939 §4, §7)."""

    def test_user(self):
        """USER with a name is accepted."""
        assert ([NEED_DATA], b"+OK\r\n") == run(fresh(), b"USER alice\r\n")

    def test_pass_after_user_asks_the_shell(self):
        """PASS after USER emits AuthenticateUser and pauses."""
        conn = fresh()

        events, out = run(conn, b"USER alice\r\nPASS secret\r\n")

        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        assert b"+OK\r\n" == out
        assert State.AUTHENTICATING == conn.state

    def test_pass_takes_the_rest_of_the_line(self):
        """The password is everything after "PASS ", spaces included (RFC 1939 §7)."""
        events, _ = run(fresh(), b"USER alice\r\nPASS  my secret\tpass \r\n")

        assert AuthenticateUser("alice", b" my secret\tpass ") == events[0]

    def test_last_user_wins(self):
        """A second USER replaces the first."""
        events, _ = run(fresh(), b"USER alice\r\nUSER bob\r\nPASS x\r\n")

        assert AuthenticateUser("bob", b"x") == events[0]

    def test_utf8_user_name(self):
        """A UTF-8 user name is decoded."""
        events, _ = run(fresh(), "USER jürgen\r\nPASS x\r\n".encode())

        assert AuthenticateUser("jürgen", b"x") == events[0]

    def test_password_is_not_in_repr(self):
        """AuthenticateUser's repr does not show the password."""
        assert "hunter2" not in repr(AuthenticateUser("alice", b"hunter2"))

    @pytest.mark.parametrize("line", [b"USER", b"USER ", b"USER a b"])
    def test_user_needs_exactly_one_argument(self, line):
        """USER without a name, or with two, is refused."""
        _, out = run(fresh(), line + b"\r\n")

        assert b"-ERR USER takes exactly one argument: a user name.\r\n" == out

    def test_user_name_must_be_utf8(self):
        """A user name that is not UTF-8 is refused."""
        _, out = run(fresh(), b"USER \xff\xfe\r\n")

        assert b"-ERR User name is not valid UTF-8.\r\n" == out

    def test_pass_without_user(self):
        """PASS before any USER is refused and the session stays in AUTHORIZATION."""
        conn = fresh()

        events, out = run(conn, b"PASS secret\r\n")

        assert [NEED_DATA] == events
        assert b"-ERR No user name given; send USER first.\r\n" == out
        assert State.AUTHORIZATION == conn.state

    @pytest.mark.parametrize("line", [b"PASS", b"PASS "])
    def test_pass_without_password(self, line):
        """PASS with nothing after it is refused."""
        _, out = run(fresh(), b"USER alice\r\n" + line + b"\r\n")

        assert b"+OK\r\n-ERR PASS takes one argument: the password.\r\n" == out

    def test_quit(self):
        """QUIT says goodbye and closes without an UPDATE."""
        conn = fresh()

        events, out = run(conn, b"QUIT\r\n")

        assert [ConnectionClosed("quit")] == events
        assert b"+OK Logging out.\r\n" == out
        assert State.CLOSED == conn.state

    def test_capa(self):
        """CAPA lists USER in AUTHORIZATION."""
        assert ([NEED_DATA], CAPA_AUTHORIZATION) == run(fresh(), b"CAPA\r\n")

    def test_capa_without_implementation(self):
        """CAPA leaves IMPLEMENTATION out when there is none."""
        _, out = run(fresh(implementation=None), b"CAPA\r\n")

        assert (
            b"+OK Capability list follows\r\n"
            b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\n.\r\n"
        ) == out

    def test_capa_without_user(self):
        """CAPA leaves USER out when plaintext login is disabled."""
        _, out = run(fresh(user_enabled=False), b"CAPA\r\n")

        assert CAPA_TRANSACTION == out

    @pytest.mark.parametrize("line", [b"USER alice", b"PASS secret"])
    def test_user_disabled(self, line):
        """USER and PASS are refused with [AUTH] when plaintext login is disabled."""
        _, out = run(fresh(user_enabled=False), line + b"\r\n")

        assert (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n"
        ) == out

    @pytest.mark.parametrize(
        "line",
        [
            b"STAT",
            b"LIST",
            b"LIST 1",
            b"RETR 1",
            b"DELE 1",
            b"NOOP",
            b"RSET",
            b"TOP 1 1",
            b"UIDL",
            b"UIDL 1",
        ],
    )
    def test_transaction_commands(self, line):
        """TRANSACTION commands are refused before login."""
        conn = fresh()

        _, out = run(conn, line + b"\r\n")

        assert b"-ERR Not logged in.\r\n" == out
        assert State.AUTHORIZATION == conn.state

    @pytest.mark.parametrize("line", [b"APOP alice 0123456789abcdef", b"AUTH PLAIN", b"STLS"])
    def test_unoffered_commands(self, line):
        """Known commands pobox does not offer yet are refused."""
        _, out = run(fresh(), line + b"\r\n")

        assert b"-ERR Command not available.\r\n" == out


class TestAuthenticating:
    """AUTHENTICATING: nothing is read until the shell answers."""

    def test_pipelined_commands_wait_for_the_answer(self):
        """Commands after PASS are not read until LoginAccepted, then answered in order."""
        conn = fresh()

        events, out = run(conn, b"USER alice\r\nPASS secret\r\nSTAT\r\nNOOP\r\n")
        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        assert b"+OK\r\n" == out

        assert ([PAUSED], b"") == run(conn, b"LIST\r\n")

        conn.send(LoginAccepted([Msg(5, "a")]))
        events, out = run(conn)

        assert [NEED_DATA] == events
        assert (
            b"+OK Logged in.\r\n+OK 1 5\r\n+OK\r\n+OK 1 messages (5 octets)\r\n1 5\r\n.\r\n"
        ) == out

    def test_pipelined_commands_after_a_rejection(self):
        """Commands after a rejected PASS are read in AUTHORIZATION."""
        conn = authenticating()
        run(conn, b"STAT\r\n")

        conn.send(LoginRejected())

        assert (
            [NEED_DATA],
            b"-ERR [AUTH] Authentication failed.\r\n-ERR Not logged in.\r\n",
        ) == run(conn)


class TestLogin:
    """The shell's answer to AuthenticateUser (RFC 3206 response codes)."""

    def test_accepted(self):
        """LoginAccepted moves to TRANSACTION and says so."""
        conn = authenticating()

        conn.send(LoginAccepted(THREE))

        assert ([NEED_DATA], b"+OK Logged in.\r\n") == run(conn)
        assert State.TRANSACTION == conn.state
        assert "alice" == conn.username

    def test_rejected(self):
        """LoginRejected says -ERR [AUTH] and goes back to AUTHORIZATION."""
        conn = authenticating()

        conn.send(LoginRejected())

        assert ([NEED_DATA], b"-ERR [AUTH] Authentication failed.\r\n") == run(conn)
        assert State.AUTHORIZATION == conn.state
        assert conn.username is None

    def test_rejected_needs_user_again(self):
        """After a rejection, PASS alone is refused: USER must come again."""
        conn = authenticating()
        conn.send(LoginRejected())
        run(conn)

        _, out = run(conn, b"PASS secret\r\n")
        assert b"-ERR No user name given; send USER first.\r\n" == out

        events, out = run(conn, b"USER alice\r\nPASS secret\r\n")
        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events

    def test_rejected_in_use(self):
        """LoginRejected with IN-USE says -ERR [IN-USE]."""
        conn = authenticating()

        conn.send(LoginRejected("Maildrop is locked by another session.", "IN-USE"))

        assert b"-ERR [IN-USE] Maildrop is locked by another session.\r\n" == run(conn)[1]

    def test_rejected_without_code(self):
        """LoginRejected without a response code says a plain -ERR."""
        conn = authenticating()

        conn.send(LoginRejected("No.", None))

        assert b"-ERR No.\r\n" == run(conn)[1]


class TestTransaction:
    """Commands in TRANSACTION (RFC 1939 §5, §7; RFC 2449 §5)."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"STAT", b"+OK 3 60\r\n"),
            (b"LIST", b"+OK 3 messages (60 octets)\r\n1 10\r\n2 20\r\n3 30\r\n.\r\n"),
            (b"LIST 2", b"+OK 2 20\r\n"),
            (b"UIDL", b"+OK\r\n1 u1\r\n2 u2\r\n3 u3\r\n.\r\n"),
            (b"UIDL 3", b"+OK 3 u3\r\n"),
            (b"NOOP", b"+OK\r\n"),
            (b"RSET", b"+OK maildrop has 3 messages (60 octets)\r\n"),
            (b"DELE 2", b"+OK Message 2 marked to be deleted.\r\n"),
            (b"CAPA", CAPA_TRANSACTION),
            (b"USER bob", b"-ERR Already logged in.\r\n"),
            (b"PASS secret", b"-ERR Already logged in.\r\n"),
            (b"APOP bob 0123", b"-ERR Already logged in.\r\n"),
            (b"STLS", b"-ERR Already logged in.\r\n"),
        ],
    )
    def test_command(self, line, expected):
        """Each command gets its exact reply and the session stays in TRANSACTION."""
        conn = logged_in(THREE)

        events, out = run(conn, line + b"\r\n")

        assert expected == out
        assert [NEED_DATA] == events
        assert State.TRANSACTION == conn.state

    def test_retr_asks_the_shell(self):
        """RETR n emits RetrieveMessage(n) and pauses."""
        conn = logged_in(THREE)

        assert ([RetrieveMessage(2, None), PAUSED], b"") == run(conn, b"RETR 2\r\n")
        assert conn.wants_message_data

    def test_top_asks_the_shell(self):
        """TOP n k emits RetrieveMessage(n, k) and pauses."""
        conn = logged_in(THREE)

        assert ([RetrieveMessage(3, 4), PAUSED], b"") == run(conn, b"TOP 3 4\r\n")

    def test_quit_asks_for_the_update(self):
        """QUIT emits CommitDeletions and pauses in UPDATE."""
        conn = logged_in(THREE)

        assert ([CommitDeletions(()), PAUSED], b"") == run(conn, b"QUIT\r\n")
        assert State.UPDATE == conn.state

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"STAT", b"+OK 0 0\r\n"),
            (b"LIST", b"+OK 0 messages (0 octets)\r\n.\r\n"),
            (b"UIDL", b"+OK\r\n.\r\n"),
            (b"RETR 1", b"-ERR There's no message 1.\r\n"),
            (b"LIST 1", b"-ERR There's no message 1.\r\n"),
        ],
    )
    def test_empty_maildrop(self, line, expected):
        """An empty maildrop lists nothing and has no message 1."""
        assert expected == run(logged_in([]), line + b"\r\n")[1]

    def test_not_retrieving(self):
        """wants_message_data is false when nothing is being retrieved."""
        assert not logged_in(THREE).wants_message_data


class TestArguments:
    """Bad arguments get -ERR and the session goes on."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"RETR 0", b"-ERR There's no message 0.\r\n"),
            (b"RETR 000", b"-ERR There's no message 0.\r\n"),
            (b"RETR 4", b"-ERR There's no message 4.\r\n"),
            (b"RETR 0004", b"-ERR There's no message 0004.\r\n"),
            (b"RETR -1", b"-ERR Invalid message number: -1\r\n"),
            (b"RETR +1", b"-ERR Invalid message number: +1\r\n"),
            (b"RETR 1.0", b"-ERR Invalid message number: 1.0\r\n"),
            (b"RETR 0x1", b"-ERR Invalid message number: 0x1\r\n"),
            (b"RETR x", b"-ERR Invalid message number: x\r\n"),
            ("RETR \u0661".encode(), b"-ERR Invalid message number: ??\r\n"),
            (b"RETR 99999999999999999999", b"-ERR There's no message 99999999999999999999.\r\n"),
            (
                b"RETR 999999999999999999999999",
                b"-ERR There's no message 999999999999999999999999.\r\n",
            ),
            (b"RETR", b"-ERR RETR takes one argument: a message number.\r\n"),
            (b"RETR 1 2", b"-ERR RETR takes one argument: a message number.\r\n"),
            (b"DELE", b"-ERR DELE takes one argument: a message number.\r\n"),
            (b"DELE 1 2", b"-ERR DELE takes one argument: a message number.\r\n"),
            (b"DELE 0", b"-ERR There's no message 0.\r\n"),
            (b"DELE x", b"-ERR Invalid message number: x\r\n"),
            (b"LIST 1 2", b"-ERR Too many arguments.\r\n"),
            (b"LIST 0", b"-ERR There's no message 0.\r\n"),
            (b"LIST x", b"-ERR Invalid message number: x\r\n"),
            (b"UIDL 1 2", b"-ERR Too many arguments.\r\n"),
            (b"UIDL 9", b"-ERR There's no message 9.\r\n"),
            (b"TOP", b"-ERR TOP takes two arguments: a message number and a line count.\r\n"),
            (b"TOP 1", b"-ERR TOP takes two arguments: a message number and a line count.\r\n"),
            (
                b"TOP 1 2 3",
                b"-ERR TOP takes two arguments: a message number and a line count.\r\n",
            ),
            (b"TOP 1 x", b"-ERR Invalid line count.\r\n"),
            (b"TOP 1 -1", b"-ERR Invalid line count.\r\n"),
            (b"TOP x 1", b"-ERR Invalid message number: x\r\n"),
            (b"TOP 0 1", b"-ERR There's no message 0.\r\n"),
            (b"STAT x", b"-ERR Too many arguments.\r\n"),
            (b"NOOP x", b"-ERR Too many arguments.\r\n"),
            (b"RSET x", b"-ERR Too many arguments.\r\n"),
            (b"QUIT now", b"-ERR Too many arguments.\r\n"),
            (b"CAPA x", b"-ERR Too many arguments.\r\n"),
        ],
    )
    def test_bad_argument(self, line, expected):
        """The command is refused with its exact -ERR and the next command is answered."""
        conn = logged_in(THREE)

        events, out = run(conn, line + b"\r\nNOOP\r\n")

        assert expected + b"+OK\r\n" == out
        assert [NEED_DATA] == events
        assert State.TRANSACTION == conn.state
        assert frozenset() == conn.deleted

    def test_trailing_space_is_no_argument(self):
        """A space after a command without arguments is not an argument."""
        assert b"+OK 3 60\r\n" == run(logged_in(THREE), b"STAT \r\n")[1]

    def test_extra_spaces_between_arguments(self):
        """Arguments may be separated by several spaces."""
        assert b"+OK 2 20\r\n" == run(logged_in(THREE), b"LIST  2 \r\n")[1]

    def test_long_invalid_argument_is_cut(self):
        """An invalid argument is echoed as at most 40 printable ASCII octets."""
        _, out = run(logged_in(THREE), b"RETR " + b"x" * 100 + b"\r\n")

        assert b"-ERR Invalid message number: " + b"x" * 40 + b"\r\n" == out

    def test_eight_bit_argument_is_not_echoed(self):
        """8-bit octets of an invalid argument are echoed as "?", so the reply stays ASCII."""
        _, out = run(logged_in(THREE), b"RETR 1\xe9\xff\r\n")

        assert b"-ERR Invalid message number: 1??\r\n" == out

    @pytest.mark.parametrize(
        "line",
        [
            b"RETR " + b"\x80" * 248,
            b"RETR " + b"\xff" * 248,
            b"LIST " + b"x" * 248,
            b"UIDL " + b"9" * 248,
            b"RETR " + b"1" * 248,
            b"TOP " + b"9" * 100 + b" " + b"9" * 148,
            b"DELE " + b"a" * 248,
        ],
    )
    def test_status_line_is_at_most_512_octets(self, line):
        """Whatever the argument, the status line is at most 512 octets (RFC 2449 §4)."""
        assert 255 == len(line + b"\r\n")

        _, out = run(logged_in(THREE), line + b"\r\n")

        status = out.split(b"\r\n")[0] + b"\r\n"
        assert len(status) <= 512
        assert status.startswith(b"-ERR ")
        assert status.isascii()


class TestDeletion:
    """DELE and RSET: marks, not removals (RFC 1939 §5, §6)."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"STAT", b"+OK 2 40\r\n"),
            (b"LIST", b"+OK 2 messages (40 octets)\r\n1 10\r\n3 30\r\n.\r\n"),
            (b"UIDL", b"+OK\r\n1 u1\r\n3 u3\r\n.\r\n"),
            (b"LIST 3", b"+OK 3 30\r\n"),
            (b"UIDL 3", b"+OK 3 u3\r\n"),
            (b"LIST 2", b"-ERR Message 2 is deleted.\r\n"),
            (b"UIDL 2", b"-ERR Message 2 is deleted.\r\n"),
            (b"RETR 2", b"-ERR Message 2 is deleted.\r\n"),
            (b"TOP 2 0", b"-ERR Message 2 is deleted.\r\n"),
            (b"DELE 2", b"-ERR Message 2 is deleted.\r\n"),
        ],
    )
    def test_after_dele(self, line, expected):
        """A deleted message is left out or refused, and numbers do not shift."""
        conn = logged_in(THREE)
        run(conn, b"DELE 2\r\n")

        assert ([NEED_DATA], expected) == run(conn, line + b"\r\n")

    def test_delete_all(self):
        """Deleting every message leaves an empty listing."""
        conn = logged_in(THREE)

        _, out = run(conn, b"DELE 1\r\nDELE 2\r\nDELE 3\r\nSTAT\r\nLIST\r\n")

        assert (
            b"+OK Message 1 marked to be deleted.\r\n"
            b"+OK Message 2 marked to be deleted.\r\n"
            b"+OK Message 3 marked to be deleted.\r\n"
            b"+OK 0 0\r\n"
            b"+OK 0 messages (0 octets)\r\n.\r\n"
        ) == out
        assert frozenset({1, 2, 3}) == conn.deleted

    def test_rset_undeletes(self):
        """RSET unmarks every message."""
        conn = logged_in(THREE)
        run(conn, b"DELE 1\r\nDELE 3\r\n")

        _, out = run(conn, b"RSET\r\nSTAT\r\nLIST 3\r\n")

        assert b"+OK maildrop has 3 messages (60 octets)\r\n+OK 3 60\r\n+OK 3 30\r\n" == out
        assert frozenset() == conn.deleted

    def test_deleted_property(self):
        """deleted holds the 1-based numbers marked."""
        conn = logged_in(THREE)

        run(conn, b"DELE 3\r\nDELE 1\r\n")

        assert frozenset({1, 3}) == conn.deleted


class TestUpdate:
    """QUIT in TRANSACTION: the UPDATE state (RFC 1939 §6)."""

    def test_quit_commits_deletions(self):
        """QUIT asks to remove the marked messages, by 1-based number, in order."""
        conn = logged_in(THREE)
        run(conn, b"DELE 3\r\nDELE 1\r\n")

        assert ([CommitDeletions((1, 3)), PAUSED], b"") == run(conn, b"QUIT\r\n")

    def test_committed(self):
        """DeletionsCommitted(failed=0) says goodbye and closes."""
        conn = logged_in(THREE)
        run(conn, b"QUIT\r\n")

        conn.send(DeletionsCommitted(failed=0))

        assert ([ConnectionClosed("quit")], b"+OK Logging out.\r\n") == run(conn)
        assert State.CLOSED == conn.state
        assert "quit" == conn.close_reason

    def test_commit_failed(self):
        """DeletionsCommitted(failed>0) says -ERR [SYS/TEMP] and closes."""
        conn = logged_in(THREE)
        run(conn, b"DELE 1\r\nDELE 2\r\nQUIT\r\n")

        conn.send(DeletionsCommitted(failed=2))

        assert (
            [ConnectionClosed("quit")],
            b"-ERR [SYS/TEMP] Logging out, but 2 message(s) could not be deleted.\r\n",
        ) == run(conn)

    def test_commands_after_quit_are_never_read(self):
        """Commands pipelined after QUIT get no answer, before or after the commit."""
        conn = logged_in(THREE)

        events, _ = run(conn, b"QUIT\r\nSTAT\r\nNOOP\r\n")
        assert [CommitDeletions(()), PAUSED] == events
        assert ([PAUSED], b"") == run(conn, b"RSET\r\n")

        conn.send(DeletionsCommitted())

        assert ([ConnectionClosed("quit")], b"+OK Logging out.\r\n") == run(conn)


class TestClosed:
    """CLOSED: nothing more happens."""

    def test_closed_ignores_input(self):
        """Once closed, input is ignored and next_event keeps saying ConnectionClosed."""
        conn = fresh()
        run(conn, b"QUIT\r\n")

        assert ([ConnectionClosed("quit")], b"") == run(conn, b"USER alice\r\nCAPA\r\n")
        assert ([ConnectionClosed("quit")], b"") == run(conn, b"")

    def test_input_after_close_is_not_buffered(self):
        """Bytes received after the close are dropped, not kept in memory."""
        conn = fresh()
        conn.close("timeout")

        conn.receive_data(b"NOOP\r\n" * 1000)

        assert 0 == len(conn._framer._buf)

    def test_close(self):
        """close() ends the session at once with its reason."""
        conn = logged_in(THREE)

        conn.close("timeout")

        assert ([ConnectionClosed("timeout")], b"") == run(conn, b"STAT\r\n")
        assert State.CLOSED == conn.state

    def test_close_twice_keeps_the_first_reason(self):
        """A second close() does not change the reason."""
        conn = fresh()
        conn.close("timeout")

        conn.close("shutdown")

        assert [ConnectionClosed("timeout")] == run(conn)[0]

    def test_close_without_update(self):
        """close() in TRANSACTION with marks never asks for CommitDeletions."""
        conn = logged_in(THREE)
        run(conn, b"DELE 1\r\n")

        conn.close("timeout")

        assert ([ConnectionClosed("timeout")], b"") == run(conn, b"QUIT\r\n")


class TestCommandSyntax:
    """Keywords, line endings and junk (RFC 1939 §3)."""

    @pytest.mark.parametrize("line", [b"stat", b"Stat", b"sTaT", b"STAT"])
    def test_keywords_are_case_insensitive(self, line):
        """A keyword is recognised in any case."""
        assert b"+OK 3 60\r\n" == run(logged_in(THREE), line + b"\r\n")[1]

    def test_lowercase_retr(self):
        """retr 1 is RETR 1."""
        assert [RetrieveMessage(1, None), PAUSED] == run(logged_in(THREE), b"retr 1\r\n")[0]

    def test_lowercase_login(self):
        """user/pass in lower case log in."""
        events, out = run(fresh(), b"user alice\r\npass secret\r\n")

        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        assert b"+OK\r\n" == out

    def test_bare_lf_line_ends(self):
        """A bare LF ends a command line too."""
        conn = fresh()

        events, out = run(conn, b"USER alice\nPASS secret\n")
        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        conn.send(LoginAccepted(THREE))

        assert b"+OK\r\n" == out
        assert b"+OK Logged in.\r\n+OK 3 60\r\n+OK\r\n" == run(conn, b"STAT\nNOOP\r\n")[1]

    def test_only_one_cr_is_line_end(self):
        """Only the CR right before LF belongs to the line end: another CR is junk."""
        assert b"-ERR Invalid characters in command.\r\n" == run(fresh(), b"CAPA\r\r\n")[1]

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"HELO", b"-ERR Unknown command.\r\n"),
            (b"XYZZY 1 2", b"-ERR Unknown command.\r\n"),
            (b"STATUS", b"-ERR Unknown command.\r\n"),
            (b" CAPA", b"-ERR Unknown command.\r\n"),
            (b"CAPA\t", b"-ERR Unknown command.\r\n"),
            (b"\xff\xfe", b"-ERR Unknown command.\r\n"),
            (b"", b"-ERR Empty command.\r\n"),
            (b"   ", b"-ERR Empty command.\r\n"),
            (b"\t", b"-ERR Empty command.\r\n"),
            (b"\r", b"-ERR Empty command.\r\n"),
            (b"\x00", b"-ERR Invalid characters in command.\r\n"),
            (b"CAPA\x00", b"-ERR Invalid characters in command.\r\n"),
            (b"USER al\x00ice", b"-ERR Invalid characters in command.\r\n"),
            (b"\x1b[A", b"-ERR Invalid characters in command.\r\n"),
            (b"CA\x7fPA", b"-ERR Invalid characters in command.\r\n"),
            (b"USER a\rb", b"-ERR Invalid characters in command.\r\n"),
            (b"\x04", b"-ERR Invalid characters in command.\r\n"),
        ],
    )
    def test_junk(self, line, expected):
        """Unknown keywords, empty lines and control octets get -ERR; the session goes on."""
        conn = fresh()

        events, out = run(conn, line + b"\r\nUSER bob\r\n")

        assert expected + b"+OK\r\n" == out
        assert [NEED_DATA] == events
        assert State.AUTHORIZATION == conn.state

    def test_tab_inside_arguments(self):
        """A TAB inside the line is not junk: it separates arguments."""
        _, out = run(fresh(), b"USER a\tb\r\n")

        assert b"-ERR USER takes exactly one argument: a user name.\r\n" == out


class TestLineLength:
    """At most 255 octets per command line, CRLF included (RFC 2449 §4)."""

    def test_255_octets_accepted(self):
        """A line of exactly 255 octets with CRLF is read."""
        line = b"USER " + b"a" * 248 + b"\r\n"
        assert 255 == len(line)

        events, _ = run(fresh(), line + b"PASS x\r\n")

        assert AuthenticateUser("a" * 248, b"x") == events[0]

    def test_256_octets_refused(self):
        """A line of 256 octets with CRLF is too long; the next line is read."""
        line = b"USER " + b"a" * 249 + b"\r\n"
        assert 256 == len(line)

        assert (
            [NEED_DATA],
            b"-ERR Line too long.\r\n+OK\r\n",
        ) == run(fresh(), line + b"USER bob\r\n")

    def test_255_octets_with_bare_lf(self):
        """With a bare LF the limit is still 255 octets, LF included."""
        ok_line = b"USER " + b"a" * 249 + b"\n"
        long_line = b"USER " + b"a" * 250 + b"\n"

        assert b"+OK\r\n-ERR Line too long.\r\n" == run(fresh(), ok_line + long_line)[1]

    def test_long_line_in_pieces(self):
        """A long line arriving in pieces is refused once, when its end arrives."""
        conn = fresh()

        assert ([NEED_DATA], b"") == run(conn, b"USER " + b"a" * 200)
        assert ([NEED_DATA], b"") == run(conn, b"a" * 200)
        assert ([NEED_DATA], b"") == run(conn, b"a" * 200)

        assert b"-ERR Line too long.\r\n+OK\r\n" == run(conn, b"\r\nUSER bob\r\n")[1]

    def test_ten_megabytes_without_newline(self):
        """A 10 MB line fed in pieces keeps the buffer small and yields one -ERR."""
        conn = fresh()
        piece = b"A" * 4096

        for _ in range(10 * 1024 * 1024 // len(piece)):
            conn.receive_data(piece)
            assert len(conn._framer._buf) <= 255 + 4096
            assert [NEED_DATA] == run(conn)[0]
            assert len(conn._framer._buf) <= 255

        assert ([NEED_DATA], b"-ERR Line too long.\r\n+OK\r\n") == run(conn, b"\r\nUSER x\r\n")

    def test_ten_megabytes_in_one_read(self):
        """A 10 MB line in a single read is dropped as soon as it is looked at."""
        conn = fresh()

        assert ([NEED_DATA], b"") == run(conn, b"A" * (10 * 1024 * 1024))

        assert len(conn._framer._buf) <= 255
        assert b"-ERR Line too long.\r\n" == run(conn, b"\n")[1]

    def test_long_line_then_eof(self):
        """EOF in the middle of a long line closes without a reply."""
        conn = fresh()

        assert ([NEED_DATA], b"") == run(conn, b"A" * 1000)
        assert ([ConnectionClosed("eof")], b"") == run(conn, b"")


class TestBadCommandLimit:
    """10 bad commands in a row close the session."""

    def test_ten_bad_commands_close(self):
        """The 10th bad command in a row is answered and closes the session."""
        conn = fresh()

        events, out = run(conn, b"BOGUS\r\n" * 10 + b"USER bob\r\n")

        assert [ConnectionClosed("too-many-bad-commands")] == events
        assert b"-ERR Unknown command.\r\n" * 9 + b"-ERR Too many bad commands.\r\n" == out
        assert State.CLOSED == conn.state

    def test_nine_bad_commands_do_not_close(self):
        """Nine bad commands in a row leave the session open."""
        conn = fresh()

        events, out = run(conn, b"BOGUS\r\n" * 9 + b"USER bob\r\n")

        assert [NEED_DATA] == events
        assert b"-ERR Unknown command.\r\n" * 9 + b"+OK\r\n" == out

    def test_good_command_resets_the_count(self):
        """A good command between bad ones starts the count again."""
        conn = logged_in(THREE)

        events, out = run(conn, b"BOGUS\r\n" * 9 + b"NOOP\r\n" + b"BOGUS\r\n" * 9)

        assert [NEED_DATA] == events
        assert (
            b"-ERR Unknown command.\r\n" * 9 + b"+OK\r\n" + b"-ERR Unknown command.\r\n" * 9 == out
        )

        events, _ = run(conn, b"BOGUS\r\n")
        assert [ConnectionClosed("too-many-bad-commands")] == events

    def test_every_kind_of_bad_command_counts(self):
        """Unknown, empty, too long, wrong state, and malformed arguments all count."""
        conn = fresh()
        lines = [b"BOGUS", b"", b"x" * 300, b"STAT", b"USER", b"\x00", b"CAPA x"]
        lines += [b"APOP a b", b"PASS", b"QUIT 1"]

        events, out = run(conn, b"USER a\r\n" + b"".join(line + b"\r\n" for line in lines))

        assert [ConnectionClosed("too-many-bad-commands")] == events
        assert out.endswith(
            b"-ERR PASS takes one argument: the password.\r\n-ERR Too many bad commands.\r\n"
        )

    def test_missing_message_is_not_a_bad_command(self):
        """A well-formed command about a missing message ends a run of bad ones."""
        conn = logged_in(THREE)

        events, _ = run(conn, b"BOGUS\r\n" * 9 + b"RETR 9\r\n" + b"BOGUS\r\n" * 9)

        assert [NEED_DATA] == events

    def test_custom_limit(self):
        """max_bad_commands sets the limit."""
        conn = fresh(max_bad_commands=2)

        events, out = run(conn, b"BOGUS\r\nBOGUS\r\n")

        assert [ConnectionClosed("too-many-bad-commands")] == events
        assert b"-ERR Unknown command.\r\n-ERR Too many bad commands.\r\n" == out

    def test_limit_in_transaction_keeps_deletions(self):
        """Closing for bad commands in TRANSACTION never commits deletions."""
        conn = logged_in(THREE)

        events, _ = run(conn, b"DELE 1\r\n" + b"RETR x\r\n" * 10)

        assert [ConnectionClosed("too-many-bad-commands")] == events


class TestRetr:
    """RETR: the message on the wire (RFC 1939 §3, §7)."""

    def test_status_and_terminator(self):
        """RETR says +OK <size> octets, then the message, then ".CRLF"."""
        assert b"+OK 9 octets\r\nab\r\ncd\r\n.\r\n" == retr_wire(b"ab\r\ncd\r\n", size=9)

    def test_size_comes_from_the_snapshot(self):
        """The octet count is the snapshot's size, as storage computed it."""
        assert b"+OK 1234 octets\r\nab\r\n.\r\n" == retr_wire(b"ab\r\n", size=1234)

    @pytest.mark.parametrize(
        ("stored", "wire"),
        [
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"a\r\nb\r\n", b"a\r\nb\r\n"),
            (b"a\nb\r\nc\n", b"a\r\nb\r\nc\r\n"),
            (b"a\rb\r\n", b"a\rb\r\n"),
            (b"a\r\r\n", b"a\r\r\n"),
            (b"\n\n", b"\r\n\r\n"),
            (b"a\n\rb\n", b"a\r\n\rb\r\n"),
            (b".\n", b"..\r\n"),
            (b".a\n..b\nc.\n.\n", b"..a\r\n...b\r\nc.\r\n..\r\n"),
            (b"a\r\n.\r\n", b"a\r\n..\r\n"),
            (b"a\r.b\n", b"a\r.b\r\n"),
            (b"abc", b"abc\r\n"),
            (b"abc\r", b"abc\r\r\n"),
            (b"a\n.", b"a\r\n..\r\n"),
            (b".", b"..\r\n"),
            (b"", b""),
            (b"\r", b"\r\r\n"),
            (bytes(range(128, 256)) + b"\n", bytes(range(128, 256)) + b"\r\n"),
            (b"\x00\x01\x7f\n", b"\x00\x01\x7f\r\n"),
        ],
    )
    def test_wire_form(self, stored, wire):
        """LF becomes CRLF, CRLF and bare CR stay, dot lines are stuffed, the end is added."""
        assert b"+OK 0 octets\r\n" + wire + b".\r\n" == retr_wire(stored, size=0)

    @pytest.mark.parametrize(
        ("stored", "cuts", "wire"),
        [
            (b"a\n.b\n", (2,), b"a\r\n..b\r\n"),
            (b"a\r\n.b\r\n", (3,), b"a\r\n..b\r\n"),
            (b"a\r\n.b\r\n", (2,), b"a\r\n..b\r\n"),
            (b"a\r\n.b\r\n", (2, 3), b"a\r\n..b\r\n"),
            (b"a\r\r\n", (2,), b"a\r\r\n"),
            (b"a\r\rb\n", (2, 3), b"a\r\rb\r\n"),
            (b"ab\r", (3,), b"ab\r\r\n"),
            (b"..\n..\n", (1, 4), b"...\r\n...\r\n"),
            (b"a.\n", (1,), b"a.\r\n"),
            (b"a\n.", (2,), b"a\r\n..\r\n"),
        ],
    )
    def test_chunk_boundaries(self, stored, cuts, wire):
        """A CRLF or a line-start dot split across chunks is handled like in one chunk."""
        assert b"+OK 0 octets\r\n" + wire + b".\r\n" == retr_wire(stored, cuts, size=0)

    @pytest.mark.parametrize("stored", [b".a\r\n.\r\n..\n\r\n.", b"x\r\r\n.\n\r", b"\n.\r.\n"])
    def test_byte_at_a_time(self, stored):
        """Streaming one byte per MessageData gives the same bytes as one chunk."""
        whole = retr_wire(stored)

        assert whole == retr_wire(stored, tuple(range(len(stored))))

    def test_empty_chunks(self):
        """Empty MessageData chunks change nothing."""
        conn = start_retr(b"ab\n")

        for data in (b"", b"a", b"", b"b\r", b"", b"\n", b""):
            conn.send(MessageData(data))
        conn.send(EndOfMessage())

        assert b"+OK 3 octets\r\nab\r\n.\r\n" == conn.data_to_send()

    def test_streamed_as_it_comes(self):
        """Each chunk is ready to write as soon as it is sent."""
        conn = start_retr(b"ab\ncd\n")

        conn.send(MessageData(b"ab\n"))
        assert b"+OK 6 octets\r\nab\r\n" == conn.data_to_send()
        conn.send(MessageData(b"cd\n"))
        assert b"cd\r\n" == conn.data_to_send()
        conn.send(EndOfMessage())
        assert b".\r\n" == conn.data_to_send()

    def test_pipelined_commands_wait(self):
        """Commands after RETR are read after EndOfMessage, in order."""
        conn = logged_in([Msg(3, "u1")])

        assert [RetrieveMessage(1, None), PAUSED] == run(conn, b"RETR 1\r\nNOOP\r\n")[0]
        assert [PAUSED] == run(conn, b"STAT\r\n")[0]

        assert (
            [NEED_DATA],
            b"+OK 3 octets\r\nab\r\n.\r\n+OK\r\n+OK 1 3\r\n",
        ) == retrieve(conn, b"ab\n")
        assert not conn.wants_message_data

    def test_unavailable_before_data(self):
        """MessageUnavailable before any data is -ERR [SYS/TEMP] and the session goes on."""
        conn = start_retr(b"ab\n")

        conn.send(MessageUnavailable())

        assert (
            [NEED_DATA],
            b"-ERR [SYS/TEMP] Message is no longer available.\r\n+OK\r\n",
        ) == run(conn, b"NOOP\r\n")
        assert State.TRANSACTION == conn.state

    def test_unavailable_with_own_text(self):
        """MessageUnavailable's text and response code are used."""
        conn = start_retr(b"ab\n")

        conn.send(MessageUnavailable("Gone.", None))

        assert b"-ERR Gone.\r\n" == conn.data_to_send()

    def test_unavailable_after_data(self):
        """MessageUnavailable after some data closes the connection: the client has half."""
        conn = start_retr(b"abcdef\n")
        conn.send(MessageData(b"abc"))

        conn.send(MessageUnavailable())

        assert ([ConnectionClosed("message-failed")], b"+OK 7 octets\r\nabc") == run(conn)
        assert State.CLOSED == conn.state


class TestLastChunk:
    """``MessageData(last=True)`` ends the message as ``EndOfMessage`` after it would."""

    STORED = (
        b"",
        b"ab",
        b"ab\r",
        b".a\n.\n",
        b"A: 1\r\n\r\n.b\r\nc\r",
        b"A: 1\n\nx\n.\ny",
    )

    @staticmethod
    def answered(stored: bytes, command: bytes, *, last: bool) -> tuple[bytes, object]:
        conn = start_retr(stored, command)
        *head, tail = pieces(stored, (3,)) or [b""]
        for piece in head:
            conn.send(MessageData(piece))
        if last:
            conn.send(MessageData(tail, last=True))
        else:
            conn.send(MessageData(tail))
            conn.send(EndOfMessage())
        events, out = run(conn, b"NOOP\r\n")
        assert [NEED_DATA] == events
        return out, conn.stats

    @pytest.mark.parametrize("command", [b"RETR 1\r\n", b"TOP 1 0\r\n", b"TOP 1 1\r\n"])
    @pytest.mark.parametrize("stored", STORED)
    def test_same_as_end_of_message(self, stored, command):
        """Same octets (a held CR, the CRLF added, ``.CRLF``), same counts, next command read."""
        out, stats = self.answered(stored, command, last=True)

        assert (out, stats) == self.answered(stored, command, last=False)
        assert out.endswith(b".\r\n+OK\r\n")

    def test_nothing_after_it(self):
        """The retrieval is over: an EndOfMessage after the last chunk raises."""
        conn = start_retr(b"ab\n")
        conn.send(MessageData(b"ab\n", last=True))

        with pytest.raises(LocalProtocolError, match="without a RetrieveMessage"):
            conn.send(EndOfMessage())
        assert b"+OK 3 octets\r\nab\r\n.\r\n" == conn.data_to_send()


class TestTop:
    """TOP: the header, the blank line and n body lines (RFC 1939 §7)."""

    MESSAGE = b"From: a\r\nSubject: b\r\n\r\nl1\r\nl2\r\nl3\r\n"

    @pytest.mark.parametrize(
        ("lines", "wire"),
        [
            (b"0", b"From: a\r\nSubject: b\r\n\r\n"),
            (b"1", b"From: a\r\nSubject: b\r\n\r\nl1\r\n"),
            (b"2", b"From: a\r\nSubject: b\r\n\r\nl1\r\nl2\r\n"),
            (b"3", MESSAGE),
            (b"10", MESSAGE),
            (b"99999999999999999999", MESSAGE),
            (b"99999999999999999999999", MESSAGE),
        ],
    )
    def test_lines(self, lines, wire):
        """TOP n gives the header, the blank line and at most n body lines."""
        assert b"+OK\r\n" + wire + b".\r\n" == top_wire(self.MESSAGE, lines)

    @pytest.mark.parametrize(
        ("stored", "lines", "wire"),
        [
            (b"From: a\r\n\r\n", b"5", b"From: a\r\n\r\n"),
            (b"From: a\r\nTo: b\r\n", b"0", b"From: a\r\nTo: b\r\n"),
            (b"From: a", b"0", b"From: a\r\n"),
            (b"From: a\r\n\r\nbody", b"3", b"From: a\r\n\r\nbody\r\n"),
            (b"A: 1\n\nx\ny\n", b"1", b"A: 1\r\n\r\nx\r\n"),
            (b"A: 1\n\n.x\n.y\n", b"1", b"A: 1\r\n\r\n..x\r\n"),
            (b".A: 1\n\n", b"0", b"..A: 1\r\n\r\n"),
            (b"\r\nbody\r\n", b"0", b"\r\n"),
            (b"A: 1\r\n \r\nB: 2\r\n\r\nx\r\n", b"0", b"A: 1\r\n \r\nB: 2\r\n\r\n"),
            (b"A: 1\r\n\r\n\r\n\r\nx\r\n", b"2", b"A: 1\r\n\r\n\r\n\r\n"),
            (b"A: 1\r\n\r\nb\r", b"1", b"A: 1\r\n\r\nb\r\r\n"),
            (b"", b"1", b""),
        ],
    )
    def test_shapes(self, stored, lines, wire):
        """No body, no blank line, no final newline, bare LFs and dots are all handled."""
        assert b"+OK\r\n" + wire + b".\r\n" == top_wire(stored, lines)

    @pytest.mark.parametrize("lines", [b"0", b"1", b"2", b"5"])
    def test_chunked_is_the_same(self, lines):
        """Any split of the message gives the same TOP output as one chunk."""
        stored = b"A: 1\n\r\n\r\nx\r\n.y\nz"
        whole = top_wire(stored, lines)

        for cut in range(len(stored)):
            assert whole == top_wire(stored, lines, (cut,))
        assert whole == top_wire(stored, lines, tuple(range(len(stored))))

    def test_wants_message_data_turns_false(self):
        """wants_message_data turns false once the n lines are in."""
        conn = start_retr(self.MESSAGE, b"TOP 1 1\r\n")

        conn.send(MessageData(b"From: a\r\nSubject: b\r\n\r\n"))
        assert conn.wants_message_data
        conn.send(MessageData(b"l1\r\nl2"))
        assert not conn.wants_message_data

        conn.send(EndOfMessage())
        assert not conn.wants_message_data
        assert b"+OK\r\nFrom: a\r\nSubject: b\r\n\r\nl1\r\n.\r\n" == conn.data_to_send()

    def test_data_after_done_is_dropped(self):
        """MessageData after the n lines adds nothing."""
        conn = start_retr(self.MESSAGE, b"TOP 1 0\r\n")
        conn.send(MessageData(b"A: 1\r\n\r\n"))
        conn.data_to_send()

        conn.send(MessageData(b"lots\r\nmore\r\n"))

        assert b"" == conn.data_to_send()

    @pytest.mark.parametrize(("lines", "tail"), [(b"0", b""), (b"1", b"body\r\n")])
    def test_stop_early_after_a_held_cr(self, lines, tail):
        """A CR held at the end of a chunk is cut with the body when the shell stops early."""
        conn = start_retr(self.MESSAGE, b"TOP 1 " + lines + b"\r\n")

        conn.send(MessageData(b"A: 1\r\n\r\nbody\r"))
        if lines == b"1":
            conn.send(MessageData(b"\nmore\r"))
        assert not conn.wants_message_data
        conn.send(EndOfMessage())

        assert b"+OK\r\nA: 1\r\n\r\n" + tail + b".\r\n" == conn.data_to_send()

    def test_unavailable(self):
        """MessageUnavailable answers TOP with -ERR too."""
        conn = start_retr(self.MESSAGE, b"TOP 1 1\r\n")

        conn.send(MessageUnavailable())

        assert b"-ERR [SYS/TEMP] Message is no longer available.\r\n" == conn.data_to_send()


class TestPipelining:
    """PIPELINING (RFC 2449 §6.6): batches answered in order; FLUSH bounds the output."""

    def test_batch_answered_in_order(self):
        """Many commands in one read are answered in order, byte for byte."""
        conn = fresh()

        events, out = run(conn, b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        conn.send(LoginAccepted(THREE))
        events, out2 = run(
            conn,
            b"LIST\r\nUIDL 2\r\nDELE 1\r\nSTAT\r\nLIST 1\r\nRSET\r\nNOOP\r\nTOP 2 0\r\nSTAT\r\n",
        )

        assert CAPA_AUTHORIZATION + b"+OK\r\n" == out
        assert [RetrieveMessage(2, 0), PAUSED] == events
        assert (
            b"+OK Logged in.\r\n"
            b"+OK 3 60\r\n"
            b"+OK 3 messages (60 octets)\r\n1 10\r\n2 20\r\n3 30\r\n.\r\n"
            b"+OK 2 u2\r\n"
            b"+OK Message 1 marked to be deleted.\r\n"
            b"+OK 2 50\r\n"
            b"-ERR Message 1 is deleted.\r\n"
            b"+OK maildrop has 3 messages (60 octets)\r\n"
            b"+OK\r\n"
        ) == out2
        assert ([NEED_DATA], b"+OK\r\nS: x\r\n\r\n.\r\n+OK 3 60\r\n") == retrieve(
            conn, b"S: x\n\nbody\n"
        )

    def test_flush_when_output_piles_up(self):
        """Over 256 KiB of pending output, next_event says FLUSH before the next command."""
        conn = logged_in([Msg(1000, f"uid-{i:06}") for i in range(30_000)])

        events, _ = run(conn, b"LIST\r\nNOOP\r\n")
        assert [FLUSH] == events

    def test_flush_until_written(self):
        """FLUSH repeats until data_to_send is called, then reading resumes."""
        conn = logged_in([Msg(1000, f"uid-{i:06}") for i in range(30_000)])
        conn.receive_data(b"LIST\r\nNOOP\r\n")

        assert FLUSH == conn.next_event()
        assert FLUSH == conn.next_event()
        listing = conn.data_to_send()

        assert listing.startswith(b"+OK 30000 messages (30000000 octets)\r\n1 1000\r\n")
        assert listing.endswith(b"\r\n30000 1000\r\n.\r\n")
        assert ([NEED_DATA], b"+OK\r\n") == run(conn)

    @pytest.mark.parametrize(("extra", "answered"), [(0, 1), (1, 0)])
    def test_flush_threshold(self, extra, answered):
        """With 262144 octets pending the next command is still read; with one more, FLUSH."""
        # UIDL of one message is "+OK\r\n" "1 <uid>\r\n" ".\r\n": 12 octets plus the uid.
        conn = logged_in([Msg(1, "x" * (262_144 - 12 + extra))])

        events, out = run(conn, b"UIDL\r\nNOOP\r\nNOOP\r\n")

        assert [FLUSH] == events
        assert b"+OK\r\n" * answered == out[262_144 + extra :]
        assert ([NEED_DATA], b"+OK\r\n" * (2 - answered)) == run(conn)


class TestEof:
    """The client closing its side."""

    def test_quit_then_eof_in_authorization(self):
        """QUIT followed by EOF is still answered."""
        conn = fresh()
        conn.receive_data(b"QUIT\r\n")
        conn.receive_data(b"")

        assert ([ConnectionClosed("quit")], b"+OK Logging out.\r\n") == run(conn)

    def test_quit_then_eof_in_transaction(self):
        """QUIT followed by EOF still enters UPDATE."""
        conn = logged_in(THREE)
        run(conn, b"DELE 2\r\n")
        conn.receive_data(b"QUIT\r\n")
        conn.receive_data(b"")

        assert ([CommitDeletions((2,)), PAUSED], b"") == run(conn)
        conn.send(DeletionsCommitted())
        assert ([ConnectionClosed("quit")], b"+OK Logging out.\r\n") == run(conn)

    def test_eof_in_transaction(self):
        """EOF without QUIT closes with reason "eof" and no CommitDeletions."""
        conn = logged_in(THREE)
        run(conn, b"DELE 1\r\n")

        assert ([ConnectionClosed("eof")], b"") == run(conn, b"")
        assert "eof" == conn.close_reason
        assert State.CLOSED == conn.state

    def test_eof_after_commands(self):
        """Commands before the EOF are answered first."""
        conn = logged_in(THREE)

        conn.receive_data(b"STAT\r\nDELE 1\r\n")

        assert (
            [ConnectionClosed("eof")],
            b"+OK 3 60\r\n+OK Message 1 marked to be deleted.\r\n",
        ) == run(conn, b"")

    def test_partial_line_at_eof(self):
        """A line without its line end at EOF is dropped."""
        conn = logged_in(THREE)
        conn.receive_data(b"QUIT")
        conn.receive_data(b"")

        assert ([ConnectionClosed("eof")], b"") == run(conn)

    def test_eof_in_authorization(self):
        """EOF in AUTHORIZATION closes with reason "eof"."""
        assert ([ConnectionClosed("eof")], b"") == run(fresh(), b"")

    def test_eof_while_authenticating(self):
        """EOF during the password check is seen after the shell answers."""
        conn = authenticating()

        assert ([PAUSED], b"") == run(conn, b"")
        conn.send(LoginAccepted(THREE))

        assert ([ConnectionClosed("eof")], b"+OK Logged in.\r\n") == run(conn)

    def test_eof_while_retrieving(self):
        """EOF during RETR is seen after EndOfMessage."""
        conn = start_retr(b"ab\n")

        assert ([PAUSED], b"") == run(conn, b"")

        assert ([ConnectionClosed("eof")], b"+OK 3 octets\r\nab\r\n.\r\n") == retrieve(
            conn, b"ab\n"
        )


class TestTrace:
    """trace=True: the dialogue as Trace events, passwords masked."""

    def test_session(self):
        """Client lines are C traces, status lines are S traces, PASS is masked."""
        conn = ServerConnection(trace=True)

        events, _ = run(conn, b"USER alice\r\nPASS secret\r\n")
        conn.send(LoginAccepted(THREE))
        events2, _ = run(conn, b"LIST\r\n")

        assert [
            Trace("S", "+OK pobox ready."),
            Trace("C", "USER alice"),
            Trace("S", "+OK"),
            Trace("C", "PASS ***"),
            AuthenticateUser("alice", b"secret"),
            PAUSED,
        ] == events
        assert [
            Trace("S", "+OK Logged in."),
            Trace("C", "LIST"),
            Trace("S", "+OK 3 messages (60 octets)"),
            NEED_DATA,
        ] == events2

    def test_message_body_is_not_traced(self):
        """RETR traces its status line, not the message."""
        conn = logged_in([Msg(12, "u")], trace=True)

        events, _ = run(conn, b"RETR 1\r\n")
        events2, _ = retrieve(conn, b"body-secret\n")

        assert [Trace("C", "RETR 1"), RetrieveMessage(1, None), PAUSED] == events
        assert [Trace("S", "+OK 12 octets"), NEED_DATA] == events2

    def test_line_too_long(self):
        """An over-long line is traced as a note, not as its bytes."""
        events, _ = run(ServerConnection(trace=True), b"x" * 300 + b"\r\n")

        assert [
            Trace("S", "+OK pobox ready."),
            Trace("C", "<line too long, discarded>"),
            Trace("S", "-ERR Line too long."),
            NEED_DATA,
        ] == events

    def test_undecodable_line(self):
        """A line that is not UTF-8 is traced with replacement characters."""
        events, _ = run(ServerConnection(trace=True), b"\xff\r\n")

        assert Trace("C", "\ufffd") == events[1]

    def test_bare_pass(self):
        """PASS alone has nothing to mask."""
        events, _ = run(ServerConnection(trace=True), b"USER a\r\nPASS\r\n")

        assert Trace("C", "PASS") in events

    @pytest.mark.parametrize(
        ("line", "shown"),
        [
            (b"PASS hunter2", "PASS ***"),
            (b"pass hunter2", "pass ***"),
            (b"Pass hunter2 with spaces", "Pass ***"),
            (b"PASS  hunter2", "PASS ***"),
            (b"PASS\thunter2", "PASS ***"),
            (b" PASS hunter2", " PASS ***"),
            (b"\tpass hunter2", "\tpass ***"),
            (b"PASShunter2", "PASS ***"),
            (b"PASS hunter2\x00", "PASS ***"),
            (b"PASS " + "hünter2".encode(), "PASS ***"),
        ],
    )
    @pytest.mark.parametrize("with_user", [True, False])
    def test_password_never_traced(self, line, shown, with_user):
        """No Trace line holds the password, however PASS is written."""
        conn = ServerConnection(trace=True)
        prefix = b"USER alice\r\n" if with_user else b""

        events, _ = run(conn, prefix + line + b"\r\n")

        traces = [e.line for e in events if isinstance(e, Trace)]
        assert shown in traces
        assert not [t for t in traces if "nter2" in t]

    def test_password_never_traced_in_transaction(self):
        """PASS after login is refused and still masked."""
        conn = logged_in(THREE, trace=True)

        events, _ = run(conn, b"PASS hunter2\r\n")

        assert [Trace("C", "PASS ***"), Trace("S", "-ERR Already logged in."), NEED_DATA] == events

    def test_no_trace_by_default(self):
        """Without trace=True there are no Trace events."""
        events, _ = run(ServerConnection(), b"x" * 300 + b"\r\nUSER a\r\n")

        assert [NEED_DATA] == events


class TestMisuse:
    """The shell breaking the rules gets LocalProtocolError."""

    @pytest.mark.parametrize(
        "event", [LoginAccepted([]), LoginRejected(), DeletionsCommitted()], ids=repr
    )
    def test_answer_nobody_asked_for(self, event):
        """A Login*/DeletionsCommitted event with no question pending raises."""
        conn = fresh()

        with pytest.raises(LocalProtocolError, match="not expected in state AUTHORIZATION"):
            conn.send(event)
        assert State.AUTHORIZATION == conn.state
        assert b"" == conn.data_to_send()

    @pytest.mark.parametrize(
        "event", [MessageData(b"x"), EndOfMessage(), MessageUnavailable()], ids=repr
    )
    def test_message_event_without_retrieval(self, event):
        """Message events without a RetrieveMessage raise."""
        conn = logged_in(THREE)

        with pytest.raises(LocalProtocolError, match="without a RetrieveMessage"):
            conn.send(event)
        assert b"" == conn.data_to_send()

    def test_end_of_message_twice(self):
        """A second EndOfMessage raises."""
        conn = start_retr(b"ab\n")
        conn.send(EndOfMessage())

        with pytest.raises(LocalProtocolError):
            conn.send(EndOfMessage())

    def test_login_accepted_twice(self):
        """LoginAccepted in TRANSACTION raises and changes nothing."""
        conn = logged_in(THREE)

        with pytest.raises(LocalProtocolError):
            conn.send(LoginAccepted([]))
        assert b"+OK 3 60\r\n" == run(conn, b"STAT\r\n")[1]

    def test_message_data_while_authenticating(self):
        """MessageData during the password check raises."""
        with pytest.raises(LocalProtocolError):
            authenticating().send(MessageData(b"x"))


class TestStats:
    """The counters of the end-of-session log line."""

    def test_at_login(self):
        """messages_at_login and size_at_login describe the snapshot."""
        stats = logged_in(THREE).stats

        assert (3, 60) == (stats.messages_at_login, stats.size_at_login)

    def test_fresh(self):
        """A new session counts nothing."""
        stats = ServerConnection().stats

        assert (0, 0, 0, 0, 0, 0, 0, 0) == (
            stats.top_count,
            stats.top_bytes,
            stats.retr_count,
            stats.retr_bytes,
            stats.deleted_count,
            stats.deleted_bytes,
            stats.messages_at_login,
            stats.size_at_login,
        )

    def test_retr(self):
        """RETR counts messages and the octets after the status line."""
        conn = start_retr(b"ab\n.c\n")
        retrieve(conn, b"ab\n.c\n")
        run(conn, b"RETR 1\r\n")
        retrieve(conn, b"ab\n.c\n", (2,))

        assert (2, 2 * len(b"ab\r\n..c\r\n.\r\n")) == (conn.stats.retr_count, conn.stats.retr_bytes)
        assert (0, 0) == (conn.stats.top_count, conn.stats.top_bytes)

    def test_top(self):
        """TOP counts messages and the octets after the status line."""
        conn = start_retr(b"A: 1\n\nx\ny\n", b"TOP 1 1\r\n")
        retrieve(conn, b"A: 1\n\nx\ny\n")

        assert (1, len(b"A: 1\r\n\r\nx\r\n.\r\n")) == (conn.stats.top_count, conn.stats.top_bytes)
        assert (0, 0) == (conn.stats.retr_count, conn.stats.retr_bytes)

    def test_unavailable_counts_nothing(self):
        """A failed retrieval is not counted."""
        conn = start_retr(b"ab\n")
        conn.send(MessageUnavailable())

        assert (0, 0) == (conn.stats.retr_count, conn.stats.retr_bytes)

    def test_dele_and_rset(self):
        """DELE counts messages and their sizes; RSET zeroes them."""
        conn = logged_in(THREE)

        run(conn, b"DELE 1\r\nDELE 3\r\n")
        assert (2, 40) == (conn.stats.deleted_count, conn.stats.deleted_bytes)

        run(conn, b"RSET\r\nDELE 2\r\n")
        assert (1, 20) == (conn.stats.deleted_count, conn.stats.deleted_bytes)

    def test_failed_dele_counts_nothing(self):
        """A refused DELE is not counted."""
        conn = logged_in(THREE)

        run(conn, b"DELE 1\r\nDELE 1\r\nDELE 9\r\n")

        assert (1, 10) == (conn.stats.deleted_count, conn.stats.deleted_bytes)


class TestOnCommand:
    """``on_command`` hears each command's keyword as the core takes it up (for metrics)."""

    def test_keywords_in_order(self):
        """Known verbs by name, in any case; unknown or malformed lines as ``other``."""
        heard: list[str] = []
        conn = logged_in(THREE, on_command=heard.append)
        heard.clear()  # USER, PASS of logged_in

        run(conn, b"stat\r\nXYZZY\r\n\r\nLIST 1\r\nDELE 1\r\nNOOP extra\r\n")

        assert ["STAT", "other", "other", "LIST", "DELE", "NOOP"] == heard

    def test_login_and_sasl_responses(self):
        """USER and PASS are heard; a SASL response line is no command."""
        heard: list[str] = []
        conn = fresh(on_command=heard.append, sasl_mechanisms=["PLAIN"])

        run(conn, b"USER alice\r\nAUTH PLAIN\r\n")
        run(conn, b"AGFsaWNlAHNlY3JldA==\r\n")

        assert ["USER", "AUTH"] == heard

    def test_overlong_line_unheard(self):
        """A line over 255 octets is dropped unheard (it was never read whole)."""
        heard: list[str] = []
        conn = fresh(on_command=heard.append)

        run(conn, b"NOOP " + b"x" * 300 + b"\r\nNOOP\r\n")

        assert ["NOOP"] == heard


class TestHelpers:
    """The helpers these tests stand on."""

    def test_pieces(self):
        """pieces() splits at every cut, ignoring duplicates and ends."""
        assert [b"a", b"bc", b"d"] == pieces(b"abcd", [3, 1, 1, 0, 4, 9])


class TestCloseDropsQueuedWork:
    """close() ends the session for good: nothing queued before it runs after it."""

    def test_pipelined_quit_then_close_commits_nothing(self) -> None:
        """A QUIT queued behind a traced line yields no CommitDeletions once closed."""
        conn = ServerConnection(trace=True)
        conn.receive_data(b"USER a\r\nPASS b\r\n")
        while not isinstance(conn.next_event(), AuthenticateUser):
            pass
        conn.send(LoginAccepted([Msg(3, "u1")]))
        conn.receive_data(b"DELE 1\r\n")
        while conn.next_event() is not NEED_DATA:
            pass
        conn.receive_data(b"QUIT\r\n")
        # QUIT queues its trace line and then CommitDeletions; close after the first.
        assert Trace("C", "QUIT") == conn.next_event()
        conn.close("timeout")
        events = []
        while True:
            event = conn.next_event()
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
        assert not any(isinstance(e, CommitDeletions) for e in events)
        assert ConnectionClosed("timeout") == events[-1]

    def test_message_data_after_close_is_refused(self) -> None:
        """A retrieval cut by close() accepts no more data."""
        conn = ServerConnection()
        conn.receive_data(b"USER a\r\nPASS b\r\n")
        conn.next_event()
        conn.send(LoginAccepted([Msg(3, "u1")]))
        conn.receive_data(b"RETR 1\r\n")
        assert RetrieveMessage(1) == conn.next_event()
        conn.close("timeout")
        with pytest.raises(LocalProtocolError):
            conn.send(MessageData(b"x\n"))


class TestReplyTextIsOneLine:
    """Text the shell puts in a reply can never split the status line."""

    def test_crlf_in_rejection_text(self) -> None:
        """CR and LF in LoginRejected text become spaces."""
        conn = ServerConnection()
        conn.data_to_send()
        conn.receive_data(b"USER a\r\nPASS b\r\n")
        conn.next_event()
        conn.send(LoginRejected("bad\r\n+OK injected", "AUTH"))
        assert b"+OK\r\n-ERR [AUTH] bad  +OK injected\r\n" == conn.data_to_send()


class TestOutputSize:
    """output_size tells the shell how much data_to_send() holds, without taking it."""

    def test_output_size_is_the_pending_octets(self):
        """After STAT, output_size counts its reply's octets; taking them makes it 0."""
        conn = logged_in([Msg(5, "a")])
        conn.receive_data(b"STAT\r\n")
        conn.next_event()
        assert (9, b"+OK 1 5\r\n", 0) == (conn.output_size, conn.data_to_send(), conn.output_size)
