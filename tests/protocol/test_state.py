"""The state tables of pobox.protocol._state, checked through ServerConnection."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import itertools

import pytest

from pobox.protocol import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    DeletionsCommitted,
    LocalProtocolError,
    LoginAccepted,
    LoginRejected,
    ServerConnection,
    State,
    Verb,
)
from pobox.protocol._state import ALLOWED, TRANSITIONS, Trigger

from .helpers import Msg, logged_in, run

#: The shell's answers, and the trigger each one fires.
ANSWERS = {
    Trigger.LOGIN_ACCEPTED: lambda: LoginAccepted([Msg(5, "u1")]),
    Trigger.LOGIN_REJECTED: LoginRejected,
    Trigger.COMMITTED: DeletionsCommitted,
}


def in_state(state: State) -> ServerConnection:
    """A connection in ``state``, all output and events so far drained."""
    if state is State.AUTHORIZATION:
        conn = ServerConnection()
        run(conn)
    elif state is State.AUTHENTICATING:
        conn = ServerConnection()
        run(conn, b"USER alice\r\nPASS secret\r\n")
    elif state is State.SASL:
        conn = ServerConnection(sasl_mechanisms=["PLAIN"])
        run(conn, b"AUTH PLAIN\r\n")
    elif state is State.STARTING_TLS:
        conn = ServerConnection(tls_available=True)
        run(conn, b"STLS\r\n")
    elif state is State.TRANSACTION:
        conn = logged_in([Msg(5, "u1")])
    elif state is State.UPDATE:
        conn = logged_in([Msg(5, "u1")])
        run(conn, b"DELE 1\r\nQUIT\r\n")
    else:
        conn = ServerConnection()
        conn.close("timeout")
        run(conn)
    assert state is conn.state
    return conn


class TestTables:
    """The tables themselves, against the RFC written out by hand."""

    def test_transitions(self):
        """TRANSITIONS holds exactly the RFC 1939 moves plus CLOSE from everywhere."""
        expected = {
            (State.AUTHORIZATION, Trigger.PASS): State.AUTHENTICATING,
            (State.AUTHENTICATING, Trigger.LOGIN_ACCEPTED): State.TRANSACTION,
            (State.AUTHENTICATING, Trigger.LOGIN_REJECTED): State.AUTHORIZATION,
            (State.AUTHORIZATION, Trigger.QUIT): State.CLOSED,
            (State.AUTHORIZATION, Trigger.STLS): State.STARTING_TLS,
            (State.STARTING_TLS, Trigger.TLS_STARTED): State.AUTHORIZATION,
            (State.AUTHORIZATION, Trigger.AUTH): State.SASL,
            (State.SASL, Trigger.SASL_CHECK): State.AUTHENTICATING,
            (State.SASL, Trigger.SASL_ABORT): State.AUTHORIZATION,
            (State.AUTHENTICATING, Trigger.SASL_CHALLENGE): State.SASL,
            (State.SASL, Trigger.CLOSE): State.CLOSED,
            (State.TRANSACTION, Trigger.QUIT): State.UPDATE,
            (State.UPDATE, Trigger.COMMITTED): State.CLOSED,
            (State.AUTHORIZATION, Trigger.CLOSE): State.CLOSED,
            (State.AUTHENTICATING, Trigger.CLOSE): State.CLOSED,
            (State.STARTING_TLS, Trigger.CLOSE): State.CLOSED,
            (State.TRANSACTION, Trigger.CLOSE): State.CLOSED,
            (State.UPDATE, Trigger.CLOSE): State.CLOSED,
            (State.CLOSED, Trigger.CLOSE): State.CLOSED,
        }

        assert expected == TRANSITIONS

    def test_allowed(self):
        """ALLOWED gives AUTHORIZATION and TRANSACTION their RFC 1939 commands, others none."""
        assert {
            State.AUTHORIZATION: {
                Verb.USER,
                Verb.PASS,
                Verb.APOP,
                Verb.AUTH,
                Verb.QUIT,
                Verb.CAPA,
                Verb.STLS,
                Verb.UTF8,
                Verb.LANG,
            },
            State.SASL: set(),
            State.AUTHENTICATING: set(),
            State.STARTING_TLS: set(),
            State.TRANSACTION: {
                Verb.STAT,
                Verb.LIST,
                Verb.RETR,
                Verb.DELE,
                Verb.NOOP,
                Verb.RSET,
                Verb.TOP,
                Verb.UIDL,
                Verb.QUIT,
                Verb.CAPA,
                Verb.LANG,
            },
            State.UPDATE: set(),
            State.CLOSED: set(),
        } == {state: set(verbs) for state, verbs in ALLOWED.items()}


class TestShellTriggers:
    """The shell's answers fire triggers; out of place they raise LocalProtocolError."""

    @pytest.mark.parametrize(
        ("state", "trigger"),
        [
            (s, t)
            for s, t in itertools.product(State, ANSWERS)
            if (s, t)
            not in {
                (State.AUTHENTICATING, Trigger.LOGIN_ACCEPTED),
                (State.AUTHENTICATING, Trigger.LOGIN_REJECTED),
                (State.UPDATE, Trigger.COMMITTED),
            }
        ],
    )
    def test_illegal(self, state, trigger):
        """An answer the state does not wait for raises and changes nothing."""
        conn = in_state(state)

        with pytest.raises(LocalProtocolError, match=f"not expected in state {state.value}"):
            conn.send(ANSWERS[trigger]())

        assert state is conn.state
        assert b"" == conn.data_to_send()

    @pytest.mark.parametrize(
        ("state", "trigger", "after"),
        [
            (State.AUTHENTICATING, Trigger.LOGIN_ACCEPTED, State.TRANSACTION),
            (State.AUTHENTICATING, Trigger.LOGIN_REJECTED, State.AUTHORIZATION),
            (State.UPDATE, Trigger.COMMITTED, State.CLOSED),
        ],
    )
    def test_legal(self, state, trigger, after):
        """An answer the state waits for moves it on."""
        conn = in_state(state)

        conn.send(ANSWERS[trigger]())

        assert after is conn.state


class TestCommandTriggers:
    """PASS and QUIT fire triggers only where the table has them; elsewhere, no exception."""

    def test_pass_in_authorization(self):
        """PASS after USER moves AUTHORIZATION to AUTHENTICATING."""
        conn = in_state(State.AUTHORIZATION)

        run(conn, b"USER a\r\nPASS b\r\n")

        assert State.AUTHENTICATING is conn.state

    def test_quit_in_authorization(self):
        """QUIT moves AUTHORIZATION to CLOSED."""
        conn = in_state(State.AUTHORIZATION)

        run(conn, b"QUIT\r\n")

        assert State.CLOSED is conn.state

    def test_quit_in_transaction(self):
        """QUIT moves TRANSACTION to UPDATE."""
        conn = in_state(State.TRANSACTION)

        run(conn, b"QUIT\r\n")

        assert State.UPDATE is conn.state

    def test_pass_in_transaction(self):
        """PASS in TRANSACTION is a -ERR reply, not a transition."""
        conn = in_state(State.TRANSACTION)

        assert ([NEED_DATA], b"-ERR Already logged in.\r\n") == run(conn, b"PASS x\r\n")
        assert State.TRANSACTION is conn.state

    @pytest.mark.parametrize("state", [State.AUTHENTICATING, State.UPDATE])
    @pytest.mark.parametrize("line", [b"USER a", b"PASS b", b"QUIT", b"STAT", b"BOGUS"])
    def test_unread_while_waiting(self, state, line):
        """While the shell works, commands are left unread: no reply, no exception."""
        conn = in_state(state)

        assert ([PAUSED], b"") == run(conn, line + b"\r\n")
        assert state is conn.state

    @pytest.mark.parametrize("line", [b"USER a", b"PASS b", b"QUIT", b"STAT"])
    def test_ignored_when_closed(self, line):
        """Once CLOSED, commands are ignored."""
        conn = in_state(State.CLOSED)

        assert ([ConnectionClosed("timeout")], b"") == run(conn, line + b"\r\n")


class TestClose:
    """CLOSE is legal from every state and never passes through UPDATE."""

    @pytest.mark.parametrize("state", [s for s in State if s is not State.CLOSED])
    def test_close_from(self, state):
        """close() moves any open state to CLOSED with its reason, sending nothing."""
        conn = in_state(state)

        conn.close("shutdown")

        assert State.CLOSED is conn.state
        assert ([ConnectionClosed("shutdown")], b"") == run(conn)

    def test_close_when_closed(self):
        """close() in CLOSED is allowed and keeps the first reason."""
        conn = in_state(State.CLOSED)

        conn.close("shutdown")

        assert ([ConnectionClosed("timeout")], b"") == run(conn)

    @pytest.mark.parametrize("state", [s for s in State if s is not State.CLOSED])
    def test_eof_from(self, state):
        """EOF is a CLOSE: from AUTHORIZATION and TRANSACTION at once, else once answered."""
        conn = in_state(state)

        events, _ = run(conn, b"")

        if state in (State.AUTHENTICATING, State.STARTING_TLS, State.UPDATE):
            assert [PAUSED] == events
        else:
            assert [ConnectionClosed("eof")] == events
            assert State.CLOSED is conn.state
