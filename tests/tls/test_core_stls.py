"""STLS in the sans-IO core (RFC 2595 §4): bytes in, bytes and events out."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

from typing import Any

import pytest

from pobox.protocol import (
    NEED_DATA,
    PAUSED,
    AuthenticateUser,
    LocalProtocolError,
    ServerConnection,
    StartTLS,
    State,
    TlsStarted,
    Trace,
)
from tests.protocol.helpers import logged_in, run

CAPA_PLAIN = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\nSTLS\r\n"
    b"IMPLEMENTATION pobox\r\n"
    b".\r\n"
)
CAPA_TLS = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUSER\r\n"
    b"IMPLEMENTATION pobox\r\n"
    b".\r\n"
)


def fresh(**kwargs: Any) -> ServerConnection:
    """A connection offering STLS, in AUTHORIZATION, greeting taken."""
    conn = ServerConnection(tls_available=True, **kwargs)
    run(conn)
    return conn


def in_tls(**kwargs: Any) -> ServerConnection:
    """A connection after a successful STLS, all output so far taken."""
    conn = fresh(**kwargs)
    run(conn, b"STLS\r\n")
    conn.send(TlsStarted())
    run(conn)
    return conn


class TestCapa:
    """CAPA advertises STLS only where STLS would work."""

    def test_offered_before_tls(self):
        """A plain connection with TLS available lists STLS."""
        assert ([NEED_DATA], CAPA_PLAIN) == run(fresh(), b"CAPA\r\n")

    def test_not_without_tls(self):
        """Without TLS configured there is no STLS capability."""
        conn = ServerConnection()
        run(conn)

        _, out = run(conn, b"CAPA\r\n")

        assert b"STLS" not in out

    def test_not_after_stls(self):
        """After the handshake the recomputed list has no STLS (RFC 2595 §4)."""
        assert ([NEED_DATA], CAPA_TLS) == run(in_tls(), b"CAPA\r\n")

    def test_not_on_implicit_tls(self):
        """A connection that is TLS from the start does not offer STLS."""
        assert ([NEED_DATA], CAPA_TLS) == run(fresh(secure=True), b"CAPA\r\n")

    def test_not_in_transaction(self):
        """STLS is an AUTHORIZATION-state capability only."""
        conn = logged_in(tls_available=True)

        _, out = run(conn, b"CAPA\r\n")

        assert b"STLS" not in out


class TestStls:
    """The STLS command and the handshake answer."""

    def test_begins_negotiation(self):
        """STLS answers +OK and asks the shell for the handshake, then waits."""
        conn = fresh()

        events, out = run(conn, b"STLS\r\n")

        assert [StartTLS(0), PAUSED] == events
        assert b"+OK Begin TLS negotiation now.\r\n" == out
        assert State.STARTING_TLS is conn.state

    def test_case_insensitive(self):
        """The keyword is case-insensitive like every POP3 keyword."""
        _, out = run(fresh(), b"stls\r\n")

        assert b"+OK Begin TLS negotiation now.\r\n" == out

    def test_tls_started_resumes(self):
        """TlsStarted returns to AUTHORIZATION, with no greeting repeated."""
        conn = fresh()
        run(conn, b"STLS\r\n")

        conn.send(TlsStarted())

        assert ([NEED_DATA], b"") == run(conn)
        assert State.AUTHORIZATION is conn.state
        assert conn.secure

    def test_pipelined_commands_discarded(self):
        """Commands pipelined after STLS are never executed (CVE-2011-0411)."""
        conn = fresh()

        events, out = run(conn, b"STLS\r\nCAPA\r\nUSER mallory\r\n")
        conn.send(TlsStarted())
        after, out_after = run(conn)

        assert [StartTLS(20), PAUSED] == events
        assert b"+OK Begin TLS negotiation now.\r\n" == out
        assert ([NEED_DATA], b"") == (after, out_after)

    def test_bytes_fed_during_handshake_discarded(self):
        """Bytes fed before TlsStarted (a shell bug) are dropped too."""
        conn = fresh()
        run(conn, b"STLS\r\n")
        conn.receive_data(b"CAPA\r\n")

        conn.send(TlsStarted())

        assert ([NEED_DATA], b"") == run(conn)

    def test_user_before_stls_forgotten(self):
        """A USER given in plaintext does not survive the handshake."""
        conn = fresh()
        run(conn, b"USER alice\r\n")
        run(conn, b"STLS\r\n")
        conn.send(TlsStarted())

        _, out = run(conn, b"PASS secret\r\n")

        assert b"-ERR No user name given; send USER first.\r\n" == out

    def test_login_after_tls(self):
        """USER/PASS work inside TLS."""
        conn = in_tls()

        events, out = run(conn, b"USER alice\r\nPASS secret\r\n")

        assert [AuthenticateUser("alice", b"secret"), PAUSED] == events
        assert b"+OK\r\n" == out

    def test_tls_enables_plaintext_login(self):
        """TlsStarted sets whether USER is allowed: a refused USER becomes accepted."""
        conn = fresh(user_enabled=False)
        _, before = run(conn, b"USER alice\r\n")
        run(conn, b"STLS\r\n")

        conn.send(TlsStarted(user_enabled=True))
        _, after = run(conn, b"USER alice\r\n")

        assert (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n"
            == before
        )
        assert b"+OK\r\n" == after

    def test_refused_when_already_tls(self):
        """A second STLS is refused and the session goes on."""
        conn = in_tls()

        assert ([NEED_DATA], b"-ERR Already using TLS.\r\n") == run(conn, b"STLS\r\n")

    def test_refused_on_implicit_tls(self):
        """STLS on an implicit-TLS connection is refused."""
        assert ([NEED_DATA], b"-ERR Already using TLS.\r\n") == run(fresh(secure=True), b"STLS\r\n")

    def test_refused_after_login(self):
        """STLS after login is refused (RFC 2595 §4: AUTHORIZATION only)."""
        conn = logged_in(tls_available=True)

        assert ([NEED_DATA], b"-ERR Already logged in.\r\n") == run(conn, b"STLS\r\n")

    def test_refused_without_tls(self):
        """Without TLS configured STLS is an unavailable command."""
        conn = ServerConnection()
        run(conn)

        assert ([NEED_DATA], b"-ERR Command not available.\r\n") == run(conn, b"STLS\r\n")

    def test_arguments_refused(self):
        """STLS takes no argument."""
        assert ([NEED_DATA], b"-ERR Too many arguments.\r\n") == run(fresh(), b"STLS now\r\n")

    def test_eof_during_handshake(self):
        """A close during the handshake ends the session without more output."""
        conn = fresh()
        run(conn, b"STLS\r\n")

        conn.close("tls-failed")

        events, out = run(conn)
        assert b"" == out
        assert State.CLOSED is conn.state
        assert "tls-failed" == conn.close_reason
        assert 1 == len(events)

    @pytest.mark.parametrize("state", [State.AUTHORIZATION, State.TRANSACTION])
    def test_tls_started_out_of_place(self, state):
        """TlsStarted without a pending STLS raises and changes nothing."""
        conn = fresh() if state is State.AUTHORIZATION else logged_in(tls_available=True)

        with pytest.raises(LocalProtocolError, match="not expected"):
            conn.send(TlsStarted())

        assert state is conn.state

    def test_trace_notes_discarded_bytes(self):
        """The --trace log says how many pipelined bytes were dropped."""
        conn = fresh(trace=True)

        events, _ = run(conn, b"STLS\r\nCAPA\r\n")

        assert Trace("C", "<6 bytes after STLS, discarded>") in events
